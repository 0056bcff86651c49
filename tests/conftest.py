import os
import re
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dinomaly import models  # noqa: E402
from dinomaly.encoders import EncoderConfig  # noqa: E402

# The devices a test runs on where it takes `device`: the CPU always, and CUDA where there is a GPU (run just those
# with `pytest -k cuda`).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]

# A tiny DINOv2-shaped encoder for fast tests: 8 blocks so that the 8 taps form the two groups of 4.
TINY = "dinov2reg_vit_tiny_test"
TINY_CFG = EncoderConfig(embed_dim=32, num_heads=2, depth=8, taps=tuple(range(8)), weight_file="tiny_test.pth",
                         pretrain_grid=6)


@pytest.fixture(autouse=True)
def tiny_encoder(monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    yield TINY


# Debian's chromium, headless, driven by Playwright's Python client (whose own browser download does not work here):
# the review page's tests (test_serve.py; test_rgbd.py on a run of pairs).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (installed by .ci/run: apt-get install chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def demo64(tmp_path_factory):
    """Demo data at 64 px (prepare_data/make_demo_data.py: MVTec AD and Real-IAD layouts; 8 training, 3 good and 4
    defective test images a class), shared by the test files that train on it. Read only."""
    from prepare_data.make_demo_data import make_demo_data
    return make_demo_data(str(tmp_path_factory.mktemp("demo64")), size=64, seed=0, n_train=8, n_test_good=3,
                          n_test_bad=4)


@pytest.fixture(scope="session")
def tiny_run(demo64, tmp_path_factory):
    """A tiny Dinomaly run folder (3 iterations, 64 -> 56 px, a heatmap a class) on weave and nut of demo64: model.pth,
    config.json, log.txt, metrics.csv, scores.csv, thresholds.json, class prototypes and pictures. Shared by the
    test files that use a trained run: read only (a test that changes it copies it first)."""
    import dinomaly_mvtec_uni
    from dinomaly import cli
    save_dir = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        cli.run_script(dinomaly_mvtec_uni,
                       ["--data_path", demo64["mvtec"], "--encoder", TINY, "--encoder_weights", "random",
                        "--total_iters", "3", "--batch_size", "4", "--image_size", "64", "--crop_size", "56",
                        "--log_every", "1", "--num_workers", "0", "--device", "cpu", "--classes", "weave", "nut",
                        "--save_dir", str(save_dir), "--save_name", "run", "--save_heatmaps", "1"])
    return save_dir / "run"


# A script's first lines that make importing PyTorch, timm and torchvision fail, as where they are not installed
# (an inspection PC running an exported model: requirements-runtime.txt).
WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):  # before anything else: importing them fails, as where not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "timm", "torchvision"):
            raise ImportError(f"No module named '{name}' (blocked)", name=name)
sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, ".")
"""


def runtime_pins() -> dict[str, str]:
    """requirements-runtime.txt's pins: {package (lower case): version}."""
    with open(os.path.join(ROOT, "requirements-runtime.txt")) as f:
        return dict(line.split("#")[0].strip().lower().split("==") for line in f if "==" in line)


def exit_status_of(main, argv) -> int:
    """A command's main run in-process on argv (each made a str): its exit status, 0 when it returns."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def assert_resumes_bit_exactly(script, argv: list, whole_run, monkeypatch):
    """Ctrl-C during the first step of `script`'s run (argv: a 2-iteration run into a new folder; the state after
    the second step is saved), then --resume: the weights of the uninterrupted run in `whole_run`."""
    import signal

    from dinomaly import cli, train
    step = train.train_step

    def interrupted(batch, it, *args, **kwargs):
        if it == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return step(batch, it, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.run_script(script, argv)
    assert e.value.code == 130
    folder = os.path.join(argv[argv.index("--save_dir") + 1], argv[argv.index("--save_name") + 1])
    assert torch.load(os.path.join(folder, "train_state.pth"), weights_only=True)["iteration"] == 2
    monkeypatch.setattr(train, "train_step", step)
    cli.run_script(script, argv + ["--resume"])
    whole = torch.load(os.path.join(whole_run, "model.pth"), weights_only=True)
    cut = torch.load(os.path.join(folder, "model.pth"), weights_only=True)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def assert_trains_in_bf16_compiled(script, argv: list, fp32_run, monkeypatch, backend: str = "aot_eager"):
    """`script`'s run of pairs (argv: that of the float32 run in `fp32_run`, into a new folder) trained with
    --precision bf16 and --compile (with `backend`: inductor's code generation is slow on a CPU): every block
    of the model compiled, its decoder's outputs bfloat16 in each step, each step's loss within 5% of the float32
    run's (its log), and the float32 run's parameters updated (the bottleneck's and the decoder's, the encoder left
    as it was). Training alone: the evaluation is left out (test_rgbir.py evaluates in bf16 with compiled
    blocks)."""

    import numpy as np

    from dinomaly import cli, jobs, speed, train
    compile_, loss = speed.maybe_compile, train.global_cosine_hm
    trained, steps = [], []

    def compiled(model, enabled, **_):  # (the script's backend, inductor, replaced)
        if isinstance(model, models.ViTill) and not trained:  # the model as training starts
            trained.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return compile_(model, enabled, backend=backend)

    def recorded(en, de, **kwargs):
        out = loss(en, de, **kwargs)
        steps.append((de[0].dtype, out.item()))
        return out

    monkeypatch.setattr(speed, "maybe_compile", compiled)
    monkeypatch.setattr(train, "global_cosine_hm", recorded)
    for name in ("evaluate", "save_class_prototypes"):
        monkeypatch.setattr(jobs, name, lambda *args, **kwargs: None)
    try:
        cli.run_script(script, argv + ["--precision", "bf16", "--compile"])
    finally:
        speed.configure("fp32")
    (model, initial), = trained
    assert all(getattr(part, "_compiled_call_impl", None) is not None for part in speed.compiled_parts(model))
    logged = [float(v) for v in re.findall(r"iter \[\d+/\d+\], loss: ([0-9.]+)", (fp32_run / "log.txt").read_text())]
    assert len(logged) >= 2 and [dtype for dtype, _ in steps] == [torch.bfloat16] * len(logged)
    np.testing.assert_allclose([value for _, value in steps], logged, rtol=0.05)
    folder = os.path.join(argv[argv.index("--save_dir") + 1], argv[argv.index("--save_name") + 1])
    bf16, fp32 = (torch.load(os.path.join(f, "model.pth"), weights_only=True) for f in (folder, fp32_run))
    trainable = {id(p) for p in model.trainable_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    assert names and {k for k in initial if not torch.equal(fp32[k], initial[k])} == names
    assert {k for k in initial if not torch.equal(bf16[k], initial[k])} == names  # the encoder left as it was


def check_pair_exports(run, modality: str, images: str, tmp_path, capsys, predict_with: str) -> dict:
    """A tiny run of pairs (`modality` "rgbd" or "rgbir") exported to ONNX and OpenVINO fp32 with two inputs:
    each graph against the run's model in PyTorch (its halves normalised and fed as the script does, read
    independently of export.py) within 1e-4, the class found alike, the export's own check run on the run's
    pairs; then, in a process without PyTorch, predict.py on the `predict_with` export (".onnx" or ".xml") of the
    pairs under `images` writes the checkpoint's decisions, the Detector of the OpenVINO file gives the
    checkpoint's score of a pair, and nothing is imported beyond requirements-runtime.txt. Returns {suffix: path}."""
    import csv
    import json
    import subprocess
    from pathlib import Path

    import numpy as np

    from dinomaly import Detector, checkpoints, class_finder, cli, exported, modalities
    from dinomaly import dataset as ds
    from dinomaly.anomaly_map import AnomalyMapper
    crop = 56
    model, _ = checkpoints.load_trained(str(run), {}, "dinomaly2", modality)
    mapper = AnomalyMapper(model.eval())
    x = torch.rand(3, 6, crop, crop, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(ds.IMAGENET_MEAN * 2).view(6, 1, 1), torch.tensor(ds.IMAGENET_STD * 2).view(6, 1, 1)
    with torch.no_grad():
        maps, scores, features = mapper((x - mean) / std, features=True)
    want = {"anomaly_map": maps[:3], "score": scores, "features": features}
    if modality == "rgbir":  # the RGB images, then the infrared images; the pair's score is the mean
        want = {"anomaly_map": maps[:3], "infrared_map": maps[3:], "score": (scores[:3] + scores[3:]) / 2,
                "features": features}
    prototypes = class_finder.load(str(run / class_finder.FILE))
    paths = {}
    for suffix in (".onnx", ".xml"):
        path = paths[suffix] = tmp_path / f"pairs{suffix}"
        assert exit_status_of(cli.export_main, ["--checkpoint", run, "--out", path, "--check_images", "4"]) == 0
        assert " fp32 against PyTorch on 4 pairs of the run's scores.csv: largest score difference" in \
            capsys.readouterr().out
        graph = exported.Graph(path)
        second = {"rgbd": "depth", "rgbir": "infrared"}[modality]
        assert graph.inputs == ["rgb", second] and graph.metadata["inputs"] == ["rgb", second]
        assert graph.metadata["modality"] == modality
        got = graph(x.numpy())
        assert ("infrared_map" in got) == (modality == "rgbir")
        for name in ("anomaly_map", "infrared_map", "score"):
            if name in want:
                np.testing.assert_allclose(got[name], want[name].numpy(), atol=1e-4, rtol=0)
        found = class_finder.matches(dict(classes=graph.metadata["classes"], radius=graph.metadata["class_radius"]),
                                     got["class_distances"])
        assert [m.class_name for m in found] == [m.class_name for m in class_finder.classify(prototypes,
                                                                                              want["features"])]
    # predict.py on the exported file and the Detector on one pair, in a process without PyTorch
    assert exit_status_of(cli.predict_main, ["--checkpoint", run, "--input", images, "--out", tmp_path / "ckpt",
                                             "--num_workers", "0"]) == 0
    kind = modalities.PAIR_KINDS[modality]
    pair = next(str(p) for p in sorted(Path(images).rglob("*.png")) if modalities.is_pair_image(str(p), kind))
    script = WITHOUT_TORCH + f"""
import json, runpy
import onnxruntime, openvino
runtimes = set(sys.modules)
sys.argv = ["predict.py", "--checkpoint", {str(paths[predict_with])!r}, "--input", {str(images)!r}, "--out",
            {str(tmp_path / "exp")!r}]
runpy.run_path("predict.py", run_name="__main__")  # exits only on failure
from dinomaly import Detector
r = Detector({str(paths[".xml"])!r})({pair!r})
files = [getattr(sys.modules[m], "__file__", None) or "" for m in set(sys.modules) - runtimes]
loaded = {{f.split("site-packages/")[1].split("/")[0].split(".")[0] for f in files if "site-packages/" in f}}
second = None if r.pair_map is None else float(r.pair_map[r.seen].mean())
print(json.dumps(dict(score=r.score, second=second, loaded=sorted(loaded))))  # packages (not aliases, Cython's own)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    want = Detector(str(run), device="cpu")(pair)
    assert abs(answer["score"] - want.score) < 1e-4
    if modality == "rgbir":  # the infrared image's map too
        assert abs(answer["second"] - float(want.pair_map[want.seen].mean())) < 1e-4
    else:
        assert answer["second"] is None and want.pair_map is None
    from importlib.metadata import packages_distributions
    owners = packages_distributions()
    needed = {owners[m][0].lower() for m in answer["loaded"] if m in owners and m != "dinomaly"}
    optional = {"psutil", "rich"}  # imported by scikit-learn and joblib when installed, required by neither
    assert needed - optional <= set(runtime_pins()), needed
    rows = {}
    for name in ("ckpt", "exp"):
        with open(tmp_path / name / "predictions.csv", newline="") as f:
            rows[name] = {r["image_path"]: r for r in csv.DictReader(f)}
    assert len(rows["ckpt"]) >= 4 and rows["ckpt"].keys() == rows["exp"].keys()
    for key, w in rows["ckpt"].items():
        g = rows["exp"][key]
        assert abs(float(g["score"]) - float(w["score"])) < 1e-4
        assert (g["threshold"], g["class"]) == (w["threshold"], w["class"])
        # an F1-max threshold is a test image's score: that image alone may round to either side
        if abs(float(w["score"]) - float(w["threshold"])) > 1e-5 * float(w["threshold"]):
            assert g["decision"] == w["decision"]
    return paths


def brute_force_pairs(paths, is_rgb_image, rank):
    """The pairs among '/'-separated relative paths (the review page's POST /pairs), comparing every two paths:
    ([(RGB image, partner)], [RGB image without one]) in the order of `paths`. is_rgb_image(parts): whether a path
    (split at '/') is the RGB image of a pair; rank(rgb parts, other parts): None when the other path is not its
    partner, else its preference (the lowest is chosen)."""
    pairs, unpaired = [], []
    for a in paths:
        pa = a.split("/")
        if not (re.fullmatch(r"[^.].*\.(png|jpe?g|bmp|tiff?)", pa[-1], re.I) and is_rgb_image(pa)):
            continue
        found = sorted((r, b) for b in paths if (r := rank(pa, b.split("/"))) is not None)
        if found:
            pairs.append((a, found[0][1]))
        else:
            unpaired.append(a)
    return pairs, unpaired


def post_pairs(url, paths):
    """POST /pairs of a service: its answer as ([(rgb, partner)], [(rgb, error)])."""
    import httpx
    r = httpx.post(url + "/pairs", json={"files": paths}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    return [tuple(p.values()) for p in answer["pairs"]], [(u["rgb"], u["error"]) for u in answer["unpaired"]]
