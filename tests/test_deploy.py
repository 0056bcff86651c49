"""Deployment: export.py to ONNX and OpenVINO (fp32, fp16, INT8) of tiny runs of each method, the exported model
run by predict.py and the Detector (exported.py), and what a damaged or wrong exported model answers."""
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dinomaly import checkpoints, class_finder, cli, exported, models, predict, quantize
from dinomaly import run as run_module
from dinomaly import dataset as ds
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly.errors import UserError

import dinomaly2_2d
import dinomaly_mvtec_uni
import dinomaly_sep
from conftest import ROOT, TINY, TINY_CFG, WITHOUT_TORCH, runtime_pins
from conftest import exit_status_of as call
from prepare_data.make_demo_data import make_demo_data

SIZE, CROP = 64, 56
SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", str(SIZE), "--crop_size", str(CROP),
         "--num_workers", "0", "--device", "cpu", "--total_iters", "2", "--batch_size", "4", "--classes", "weave",
         "nut"]
SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("data")), size=SIZE, seed=0, n_train=6, n_test_good=2,
                          n_test_bad=2)["mvtec"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Tiny runs of each method on two demo classes: Dinomaly (with class prototypes), Dinomaly2 (recentred
    targets), one model per class, and a CRR run (random weights, the segmentation network: the fused map)."""
    save = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        for module, name in [(dinomaly_mvtec_uni, "dinomaly"), (dinomaly2_2d, "dinomaly2"), (dinomaly_sep, "sep")]:
            cli.run_script(module, ["--data_path", data, *SMALL, "--save_dir", str(save), "--save_name", name])
    crr = save / "crr"
    crr.mkdir()
    torch.manual_seed(0)
    torch.save(models.ViTill(TINY_CFG).state_dict(), crr / "model.pth")
    torch.save(models.SegmentationNet(base_width=2 * 32 // 8).state_dict(), crr / "Seg_model_last.pth")
    (crr / "config.json").write_text(json.dumps({"model": dict(encoder=TINY, image_size=SIZE, crop_size=CROP,
                                                             mask_ratio=0.25, test_mask="on", attn_eps=0.0)}))
    return {"dinomaly": save / "dinomaly", "dinomaly2": save / "dinomaly2", "per_class": save / "sep" / "weave",
            "crr": crr}


def pytorch_outputs(folder, x):
    """The map, score and pooled features of the run's model in PyTorch (CRR: masking off, as exported)."""
    seg = folder / "Seg_model_last.pth"
    model, _ = checkpoints.load_trained(str(folder / "model.pth"), {}, "crr" if seg.exists() else "dinomaly")
    model.eval().mask_in_eval = False
    segnet = checkpoints.load_segmentation_net(str(seg), 32).eval() if seg.exists() else None
    mean, std = torch.tensor(ds.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(ds.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        return AnomalyMapper(model, segnet)((torch.from_numpy(x) - mean) / std, features=True)


REPORTS = {}  # what each export of the `exports` fixture printed: {(method, format): stdout}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each run exported to ONNX and OpenVINO in fp32: {(method, format): path}; what each export printed in
    REPORTS."""
    out = tmp_path_factory.mktemp("exports")
    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        for method, folder in runs.items():
            for fmt, suffix in SUFFIX.items():
                path = out / f"{method}{suffix}"
                with contextlib.redirect_stdout(io.StringIO()) as printed:
                    assert call(cli.export_main, ["--checkpoint", folder, "--out", path]) == 0
                paths[(method, fmt)] = path
                REPORTS[(method, fmt)] = printed.getvalue()
    run_module.setup_logging(None)  # messages to this stdout again, not to the last export's
    return paths


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("method", ["dinomaly", "dinomaly2", "per_class", "crr"])
def test_fp32_exports_equal_pytorch(method, fmt, runs, exports):
    folder, path = runs[method], exports[(method, fmt)]
    x = torch.rand(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(1)).numpy()
    want_map, want_score, features = pytorch_outputs(folder, x)
    graph = exported.Graph(path)
    got = graph(x)
    np.testing.assert_allclose(got["anomaly_map"], want_map.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["score"], want_score.numpy(), atol=1e-4, rtol=0)
    meta = graph.metadata
    assert (meta["image_size"], meta["crop_size"], meta["format"], meta["precision"]) == (SIZE, CROP, fmt, "fp32")
    assert meta["mean"] == list(ds.IMAGENET_MEAN) and meta["std"] == list(ds.IMAGENET_STD)
    assert meta["map"] == ("fused" if method == "crr" else "reconstruction")
    if method == "crr":  # no thresholds.json in this run folder
        assert meta["thresholds"] is None and "class_distances" not in got
        return
    assert meta["thresholds"] == json.loads((folder / "thresholds.json").read_text())
    if method in ("dinomaly", "dinomaly2"):  # two classes and their prototypes: the graph finds the class
        prototypes = class_finder.load(str(folder / class_finder.FILE))
        want = class_finder.classify(prototypes, features)
        found = class_finder.matches(dict(classes=meta["classes"], radius=meta["class_radius"]),
                                     got["class_distances"])
        assert [m.class_name for m in found] == [m.class_name for m in want]
        assert [m.confidence for m in found] == pytest.approx([m.confidence for m in want], abs=1e-5)
    else:  # one model per class: a one-class run, nothing to find
        assert "classes" not in meta and "class_distances" not in got


def test_the_export_reports_its_check_on_the_runs_images(runs, exports):
    out, xml = REPORTS[("dinomaly", "openvino")], exports[("dinomaly", "openvino")]
    n = len((runs["dinomaly"] / "scores.csv").read_text().splitlines()) - 1  # 2 classes x 4 test images
    assert n == 8 and f"openvino fp32 against PyTorch on {n} images of the run's scores.csv: largest score " \
                      f"difference" in out
    assert "image AUROC" in out and "the thresholds still hold" in out
    assert xml.with_suffix(".bin").is_file() and not [p for p in os.listdir(xml.parent) if p.startswith("export_")]


def test_an_fp32_export_beyond_the_tolerance_fails_in_one_line(runs, tmp_path, capsys, monkeypatch):
    real = exported.Graph.__call__

    def off(self, images):  # a runtime that computes the score 2e-4 too high
        out = real(self, images)
        out["score"] = out["score"] + 2e-4
        return out

    monkeypatch.setattr(exported.Graph, "__call__", off)
    assert call(cli.export_main, ["--checkpoint", runs["per_class"], "--out", tmp_path / "m.onnx"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the onnx fp32 export differs from PyTorch by 0.0002 in the score")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------- prediction

def read_rows(folder):
    with open(folder / "predictions.csv", newline="") as f:
        return {os.path.basename(r["image_path"]) + r["image_path"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_predict_on_an_exported_model_writes_what_the_checkpoint_writes(fmt, runs, exports, data, tmp_path):
    images = [os.path.join(data, c, "test") for c in ("weave", "nut")]
    assert call(cli.predict_main, ["--checkpoint", runs["dinomaly"], "--input", *images, "--out",
                                   tmp_path / "ckpt", "--num_workers", "0", "--device", "cpu"]) == 0
    assert call(cli.predict_main, ["--checkpoint", exports[("dinomaly", fmt)], "--input", *images, "--out",
                                   tmp_path / "exp", "--num_workers", "0"]) == 0
    assert_same_predictions(tmp_path / "ckpt", tmp_path / "exp")


def assert_same_predictions(checkpoint_out, exported_out):
    """predict.py's outputs of an exported model equal those of its checkpoint: rows, scores (1e-4), thresholds,
    classes, decisions and masks (but where a value sits on its threshold and may round to either side)."""
    want, got = read_rows(checkpoint_out), read_rows(exported_out)
    assert len(want) == 8 and want.keys() == got.keys()
    for key, w in want.items():
        g = got[key]
        assert abs(float(g["score"]) - float(w["score"])) < 1e-4
        for column in ("threshold", "class", "overlay", "mask"):
            assert g[column] == w[column]
        # an F1-max threshold is a test image's score: that image alone may round to either side
        on_threshold = abs(float(w["score"]) - float(w["threshold"])) < 1e-5 * float(w["threshold"])
        if on_threshold:
            continue
        assert g["decision"] == w["decision"]
        assert float(g["class_confidence"]) == pytest.approx(float(w["class_confidence"]), abs=1e-4)
        with Image.open(checkpoint_out / w["mask"]) as a, Image.open(exported_out / g["mask"]) as b:
            a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and (a != b).mean() < 1e-3  # map values on the mask level may round either way
        with Image.open(exported_out / g["overlay"]) as picture:
            assert picture.size[0] > SIZE and picture.size[1] > SIZE


def test_the_detector_of_an_exported_model(runs, exports, data):
    image = os.path.join(data, "nut", "test", "good", "000.png")
    want = predict.Detector(str(runs["dinomaly"]), device="cpu")(image)
    d = predict.Detector(str(exports[("dinomaly", "openvino")]))
    assert isinstance(d, exported.ExportedDetector)
    got = d(image)
    assert got.score == pytest.approx(want.score, abs=1e-4) and got.is_anomalous == want.is_anomalous
    assert got.class_name == want.class_name == "nut" and got.threshold == want.threshold
    assert got.anomaly_map.shape == want.anomaly_map.shape == (SIZE, SIZE)
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-4)
    assert np.array_equal(got.seen, want.seen)
    one = predict.Detector(str(exports[("dinomaly", "onnx")]), class_name="weave", threshold=0.5)
    assert one.prototypes is None and one(image).threshold == 0.5 and one(image).class_name == "weave"


# ----------------------------------------------------------------------------------------------- without PyTorch

def test_an_exported_model_runs_without_pytorch(runs, exports, data, tmp_path):
    """predict.py and Detector on an ONNX and an OpenVINO export in a process where PyTorch, timm and torchvision
    cannot be imported: the same predictions.csv, decisions and masks as the checkpoint (in PyTorch, here), the
    same Detector result, and nothing imported beyond what requirements-runtime.txt installs (and the runtimes'
    own dependencies)."""
    images = [os.path.join(data, c, "test") for c in ("weave", "nut")]
    image = os.path.join(data, "nut", "test", "good", "000.png")
    assert call(cli.predict_main, ["--checkpoint", runs["dinomaly"], "--input", *images, "--out", tmp_path / "ckpt",
                                   "--num_workers", "0", "--device", "cpu"]) == 0
    want = predict.Detector(str(runs["dinomaly"]), device="cpu")(image)
    script = WITHOUT_TORCH + f"""
import json, runpy
import onnxruntime, openvino
runtimes = set(sys.modules)
for fmt, path in {[(f, str(exports[("dinomaly", f)])) for f in SUFFIX]!r}:
    sys.argv = ["predict.py", "--checkpoint", path, "--input", *{images!r}, "--out", {str(tmp_path)!r} + "/" + fmt]
    runpy.run_path("predict.py", run_name="__main__")  # exits only on failure
sys.argv[2], sys.argv[-1] = {str(runs["dinomaly"])!r}, {str(tmp_path / "run")!r}
try:  # a run folder needs PyTorch: one line, exit status 2
    runpy.run_path("predict.py", run_name="__main__")
    sys.exit("a run folder was predicted without PyTorch")
except SystemExit as e:
    assert e.code == 2, e.code
from dinomaly import cli
try:  # so does export
    cli.export_main(["--checkpoint", sys.argv[2], "--out", {str(tmp_path / "m.onnx")!r}])
    sys.exit("a run was exported without PyTorch")
except SystemExit as e:
    assert e.code == 2, e.code
from dinomaly import Detector
r = Detector({str(exports[("dinomaly", "openvino")])!r})({image!r})
print(json.dumps(dict(score=r.score, anomalous=bool(r.is_anomalous), class_name=r.class_name, map=r.anomaly_map.tolist(),
                      loaded=sorted({{m.partition(".")[0] for m in set(sys.modules) - runtimes}}))))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"error: {runs['dinomaly']} is a run (a checkpoint): it needs PyTorch, and torch is not installed here; "
            f"pip install -r requirements.txt, or export the run") in done.stderr
    assert "error: dinomaly-export needs PyTorch, and torch is not installed here" in done.stderr
    for fmt in SUFFIX:
        assert_same_predictions(tmp_path / "ckpt", tmp_path / fmt)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["score"] == pytest.approx(want.score, abs=1e-4) and got["anomalous"] == want.is_anomalous
    assert got["class_name"] == want.class_name == "nut"
    np.testing.assert_allclose(np.array(got["map"], np.float32), want.anomaly_map, atol=1e-4)
    from importlib.metadata import packages_distributions
    owners = packages_distributions()
    third_party = [m for m in got["loaded"] if m not in sys.stdlib_module_names and m != "dinomaly" and
                   not m.startswith("__")]  # __main__, __mp_main__: the script's own
    needed = {owners[m][0].lower() for m in third_party}
    assert {"pillow", "opencv-python-headless", "numpy"} <= needed <= set(runtime_pins()), needed


def test_reading_threads_keep_the_order_and_skip_what_they_cannot_read(exports, data, tmp_path, capsys):
    """--num_workers threads read ahead (batches of 3 here): the same predictions.csv as reading in the main
    thread, in the images' order, an unreadable file in the middle skipped with its warning."""
    images = sorted(os.path.join(d, n) for c in ("weave", "nut") for d, _, names in
                    os.walk(os.path.join(data, c, "test")) for n in names)
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not a png")
    images = images[:4] + [str(broken)] + images[4:]
    tables = {}
    for workers in ("0", "2"):
        out = tmp_path / workers
        assert call(cli.predict_main, ["--checkpoint", exports[("dinomaly", "onnx")], "--input", *images, "--out",
                                       out, "--num_workers", workers, "--batch_size", "3"]) == 0
        assert f"skipped {broken}: cannot read image {broken}" in capsys.readouterr().err
        tables[workers] = (out / "predictions.csv").read_text()
    assert tables["0"] == tables["2"]
    assert [r.split(",")[0] for r in tables["2"].splitlines()[1:]] == images[:4] + images[5:]


def test_the_runtime_requirements_pin_what_the_tests_run_with():
    from importlib.metadata import version
    pins = runtime_pins()
    assert {"numpy", "pillow", "opencv-python-headless", "onnxruntime", "openvino"} <= set(pins)
    assert not {"torch", "timm", "torchvision"} & set(pins)
    for package, pinned in pins.items():
        assert version(package) == pinned, package


def test_the_input_transform_without_pytorch_equals_the_reference_transform(tmp_path):
    """images.prepare (NumPy, what an exported model is given) equals the reference code's torchvision transform
    (Resize, ToTensor, CenterCrop, Normalize) on images of odd sizes and modes, to float tolerance."""
    T = pytest.importorskip("torchvision.transforms")
    from dinomaly import images
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8)),
                Image.fromarray(rng.integers(0, 256, (61, 29), np.uint8)),  # grey
                Image.fromarray(rng.integers(0, 65536, (40, 40), np.uint16)),  # 16-bit grey
                Image.fromarray(rng.integers(0, 256, (30, 45, 4), np.uint8))]  # RGBA
    for k, picture in enumerate(pictures):
        path = tmp_path / f"{k}.png"
        picture.save(path)
        for size, crop in [(64, 56), (33, 28), (32, 32)]:
            reference = T.Compose([T.Resize((size, size)), T.ToTensor(), T.CenterCrop(crop),
                                   T.Normalize(ds.IMAGENET_MEAN, ds.IMAGENET_STD)])
            want = reference(images.load_image(str(path))).numpy()
            got = images.prepare(images.as_rgb(str(path)), size, crop)
            assert got.dtype == np.float32 and got.shape == want.shape == (3, crop, crop)
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- bad input

def error_line(capsys):
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_damaged_or_foreign_exported_models_are_one_line(runs, exports, data, tmp_path, capsys):
    image = os.path.join(data, "nut", "test", "good", "000.png")
    xml = exports[("dinomaly", "openvino")]

    def predict_with(path, *more):
        return call(cli.predict_main, ["--checkpoint", path, "--input", image, "--out", tmp_path / "p",
                                       "--num_workers", "0", *more])

    damaged = tmp_path / "damaged.xml"
    damaged.write_text(xml.read_text()[:500])
    shutil.copy(xml.with_suffix(".bin"), damaged.with_suffix(".bin"))
    assert predict_with(damaged) == 2
    assert error_line(capsys).startswith(f"error: cannot read the OpenVINO model {damaged} (")
    ov = exported.import_openvino()  # an .xml of someone else's: the same graph without our metadata
    foreign = tmp_path / "foreign.xml"
    ov.save_model(ov.Core().read_model(str(exports[("dinomaly", "onnx")])), str(foreign))
    assert predict_with(foreign) == 2
    assert error_line(capsys) == (f"error: {foreign} has no Dinomaly metadata (sizes, thresholds): it was not "
                                  f"written by export.py; export the run with export.py --checkpoint <run> --out "
                                  f"{foreign}")
    lonely = tmp_path / "lonely.xml"
    shutil.copy(xml, lonely)
    assert predict_with(lonely) == 2
    assert error_line(capsys).startswith(f"error: the weights of {lonely} are missing: {lonely.with_suffix('.bin')} "
                                         f"not found")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exports[("dinomaly", "onnx")].read_bytes()[:1000])
    assert predict_with(broken) == 2
    assert error_line(capsys).startswith(f"error: cannot read the ONNX model {broken} (")
    assert predict_with(xml, "--seg_checkpoint", runs["crr"] / "Seg_model_last.pth") == 2
    assert error_line(capsys) == (f"error: {xml} is an exported model: --seg_checkpoint is fixed in its graph; pass "
                                  f"the run folder instead, or export the run again with what you want")
    assert predict_with(xml, "--crop_size", "42") == 2
    assert "--crop_size is fixed in its graph" in error_line(capsys)
    assert predict_with(tmp_path / "missing.xml") == 2
    assert error_line(capsys).startswith(f"error: exported model not found: {tmp_path / 'missing.xml'}")
    assert not (tmp_path / "p" / "predictions.csv").exists()


def test_an_image_of_the_wrong_size_to_the_fixed_shape_graph_is_one_line(exports, tmp_path, capsys):
    d = predict.Detector(str(exports[("dinomaly", "openvino")]))
    with pytest.raises(UserError) as e:
        d.predict_prepared(torch.zeros(1, 3, 64, 64), [(64, 64)])
    assert str(e.value) == (f"{exports[('dinomaly', 'openvino')]} takes images of shape [B, 3, 56, 56] (fixed when "
                            f"it was exported), not [1, 3, 64, 64]; resize to image_size 64 and centre-crop to 56, "
                            f"or export the run again at this size")


def test_missing_openvino_says_what_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert call(cli.export_main, ["--checkpoint", runs["dinomaly"], "--out", tmp_path / "m.xml"]) == 2
    assert "pip install 'dinomaly[openvino]'" in error_line(capsys)
    assert call(cli.export_main, ["--checkpoint", runs["dinomaly"], "--out", tmp_path / "m.xml", "--format",
                                  "onnx"]) == 2
    assert error_line(capsys) == f"error: --format onnx writes a .onnx file, but --out is {tmp_path / 'm.xml'}; " \
                                 f"pass --out {tmp_path / 'm.onnx'}"


# ----------------------------------------------------------------------------------------------- INT8 and fp16

def sensitive_copy(run, folder):
    """A copy of `run` whose decoder block 3 quantisation breaks and float does not: its second LayerNorm's
    channel 0 scaled up 1000x and fc1's weights of that channel down 1000x (the same function in float, but an
    outlier channel in fc1's input, which int8 activations quantised per tensor cannot resolve)."""
    shutil.copytree(run, folder)
    sd = torch.load(folder / "model.pth", weights_only=True)
    sd["decoder.3.norm2.weight"][0] *= 1000
    sd["decoder.3.norm2.bias"][0] *= 1000
    sd["decoder.3.mlp.fc1.weight"][:, 0] /= 1000
    torch.save(sd, folder / "model.pth")
    return folder


# An export in a process without pytest (NNCF silences itself under pytest) that records every message OpenVINO's
# converter and NNCF would send to Google Analytics when the user has not opted out (their sender can also hang
# without a network) instead of sending it: an export must send none.
WITHOUT_TELEMETRY = """
import sys
from openvino_telemetry.utils.sender import TelemetrySender
sent = []
TelemetrySender.send = lambda self, backend, message: sent.append(message)
from dinomaly import cli, models
models.ENCODERS[{tiny!r}] = models.{cfg!r}
code = cli.export_main({argv!r})
assert "pytest" not in sys.modules
print("events sent:", sent)
sys.exit(code)
"""


@pytest.mark.parametrize("out", ["int8.xml", "int8.onnx", "fp16.xml"])
def test_int8_and_fp16_exports_work_end_to_end(out, runs, data, tmp_path, capfd):
    precision = out.split(".")[0]
    path = tmp_path / out
    run, bound = runs["dinomaly"], []
    if out == "int8.onnx":  # the layer selection finds the block that quantisation breaks, and keeps it float
        run, bound = sensitive_copy(runs["dinomaly"], tmp_path / "sensitive"), ["--max_score_change", "0.04"]
    elif out == "int8.xml":  # a loose bound: no block kept float (the selection's search is the ONNX case's)
        bound = ["--max_score_change", "0.5"]
    argv = ["--checkpoint", str(run), "--out", str(path), "--precision", precision, "--calibration_images", "5",
            *bound]
    if out == "int8.xml":  # NNCF's calibration: in a process of its own, its telemetry recorded (none sent)
        script = WITHOUT_TELEMETRY.format(tiny=TINY, cfg=TINY_CFG, argv=argv)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == "events sent: []"
        log = done.stdout
        assert "INFO:nncf" not in done.stderr
    else:
        assert call(cli.export_main, argv) == 0
        log = capfd.readouterr().out
    fmt = "openvino" if out.endswith(".xml") else "onnx"
    assert "INFO:nncf" not in log  # NNCF's list of the operations it leaves unquantised: hundreds of lines
    if out == "int8.xml":  # calibrated on a seeded subset of the run's own 12 training images (6 a class)
        assert "INT8 calibration on 5 good images (the run's training images, a seeded subset" in log
        assert "layer selection measured on 6 others" in log
    elif out == "int8.onnx":  # dynamic: nothing to calibrate
        assert "INT8 layer selection measured on 6 good images (the run's training images, a seeded subset)" in log
    if precision == "int8":
        kept = exported.Graph(path).metadata["int8_float_layers"]
        assert kept["max_score_change"] == float(bound[1]) and kept["measured_on_good_images"] == 6
        if out == "int8.onnx":
            assert kept["score_change_all_int8"] > 0.04 >= kept["score_change"] and kept["kept"] == ["decoder.3"]
            assert ("more than --max_score_change 4.000%: kept in float, the most sensitive first, decoder.3 "
                    "(alone in float: ") in log
        else:
            assert kept["kept"] == [] and "within --max_score_change 50.000%: no block kept in float" in log
    assert f"{fmt} {precision} against PyTorch on 8 images of the run's scores.csv: largest score difference" in log
    assert "image AUROC" in log and "decisions with the run's thresholds:" in log
    graph = exported.Graph(path)
    assert graph.metadata["precision"] == precision
    x = torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(1)).numpy()
    want_map, want_score, _ = pytorch_outputs(runs["dinomaly"], x)
    got = graph(x)
    # lower precision moves the scores, but not far (tiny random model: a few percent)
    np.testing.assert_allclose(got["score"], want_score.numpy(), rtol=0.15)
    assert graph.metadata["thresholds"] == json.loads((runs["dinomaly"] / "thresholds.json").read_text())
    images = [os.path.join(data, c, "test") for c in ("weave", "nut")]
    assert call(cli.predict_main, ["--checkpoint", path, "--input", *images, "--out", tmp_path / "p",
                                   "--num_workers", "0"]) == 0
    assert len(read_rows(tmp_path / "p")) == 8


def test_the_int8_bound_must_be_a_share(runs, tmp_path, capsys):
    for bad in ["0", "1", "-0.1", "half"]:
        assert call(cli.export_main, ["--checkpoint", runs["dinomaly"], "--out", tmp_path / "m.onnx", "--precision",
                                      "int8", "--max_score_change", bad]) == 2
        assert "--max_score_change" in error_line(capsys)
    assert not os.listdir(tmp_path)


def test_the_selection_keeps_the_fewest_most_sensitive_blocks():
    # scores of 4 images: each block adds its own error; "b" and "d" break the scores, "a" and "c" barely move them
    effect = {"a": 0.001, "b": 0.05, "c": 0.002, "d": 0.03}
    reference = np.array([1.0, 2.0, 0.5, 1.5])
    tried = []

    def scores_with(kept):
        tried.append(sorted(kept))
        return reference * (1 + sum(e for g, e in effect.items() if g not in kept))

    s = quantize.select_float(list(effect), scores_with, reference, 0.01)
    assert s.kept == ["b", "d"] and s.chosen == pytest.approx(0.003) and s.all_int8 == pytest.approx(0.083)
    assert s.alone == pytest.approx({g: 0.083 - e for g, e in effect.items()})
    assert len(tried) == 1 + 4 + 2  # all quantised, each alone float, the bisection over the ranking
    loose = quantize.select_float(list(effect), scores_with, reference, 0.1)
    assert loose.kept == [] and not loose.alone and "no block kept in float" in loose.report("x")
    tight = quantize.select_float(list(effect), scores_with, reference, 0.0001)  # all float: the fp32 graph
    assert tight.kept == ["b", "d", "c", "a"] and tight.chosen == 0


def test_int8_calibration_without_the_training_images_is_one_line(runs, tmp_path, capsys):
    run = tmp_path / "moved"
    shutil.copytree(runs["dinomaly"], run)
    config = json.loads((run / "config.json").read_text())
    config["data_path"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    assert call(cli.export_main, ["--checkpoint", run, "--out", tmp_path / "m.xml", "--precision", "int8"]) == 2
    assert error_line(capsys) == (f"error: INT8 calibration needs the run's training images, but its data folder "
                                  f"{tmp_path / 'gone'} is not here; pass --calibration_data DIR (a folder of good "
                                  f"images of the run's parts)")
    assert not (tmp_path / "m.xml").exists()


# ----------------------------------------------------------------------------------------------- benchmark

def test_benchmark_deploy_runs_and_writes_json(tmp_path):
    # in a process of its own, as a user runs it: the runtimes' thread pools stay out of the test process
    path = tmp_path / "deploy.json"
    argv = ["deploy", "--models", f"{TINY}:{CROP}", "--batch_sizes", "1", "2", "--warmup", "0", "--iters", "2",
            "--calibration_images", "2", "--max_score_change", "0.5", "--roofline_size", "64", "--compile", "eager", "--runtimes", "eager",
            "compile", "ort", "ort_int8", "ov", "ov_int8", "ort_cuda", "--profile", "1", "--threads", "1", "--json",
            str(path)]
    code = ("import sys; sys.path[:0] = ['tests', '.']; from conftest import TINY, TINY_CFG; from dinomaly import "
            f"models; models.ENCODERS[TINY] = TINY_CFG; import benchmark; benchmark.main({argv!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(path.read_text())
    rows = report["results"]
    assert [(r["batch"], r["runtime"]) for r in rows] == [(b, r) for b in (1, 2) for r in
                                                          ("eager", "compile", "ort", "ort_int8", "ov", "ov_int8")]
    for r in rows:
        assert r["ms_per_image"] > 0 and r["images_per_s"] == pytest.approx(1000 / r["ms_per_image"])
        assert r["share_of_peak"] > 0 and r["peak_used"] == ("int8" if r["runtime"].endswith("int8") else "fp32")
        assert r["speedup_vs_eager"] == pytest.approx(next(e["ms_per_image"] for e in rows if e["runtime"] == "eager"
                                                           and e["batch"] == r["batch"]) / r["ms_per_image"])
    assert report["threads"] == 1 and report["roofline"]["fp32_gflops"] > 0 and report["roofline"]["int8_gops"] > 0
    assert set(report["cpu"]["instruction_sets"]) >= {"AVX2", "AVX-512", "AVX512-VNNI", "AMX-INT8"}
    if not torch.cuda.is_available():
        assert "no GPU" in report["not_timed"]["ort_cuda"]
    parts = report["profiles"][f"{TINY}:{CROP} ort_int8"]["by_part"]
    assert {"encoder", "decoder"} <= set(parts) and sum(p["share"] for p in parts.values()) == pytest.approx(1)
    assert report["profiles"][f"{TINY}:{CROP} ov_int8"]["by_type"]
    assert len(report["load_average"]["before"]) == 3
