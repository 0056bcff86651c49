"""Dinomaly2's RGB + infrared (MulSen-AD): pairing by name and the labels of data.csv against a brute-force reading
of the folders, the errors of unpaired and mislabelled samples, the model's side-by-side forward, and the object
score, object label and per-modality pixel metrics of the script's evaluation against brute force (scikit-learn on
maps recomputed image by image)."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dinomaly import cli, models
from dinomaly import dataset as ds
from dinomaly.anomaly_map import AnomalyMapper, binarize_gt
from dinomaly.errors import UserError

import dinomaly2_mulsen
from conftest import TINY, TINY_CFG, assert_resumes_bit_exactly, assert_trains_in_bf16_compiled, exit_status_of
from prepare_data.make_demo_pairs import KINDS_IR, make_demo_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_demo_pairs(str(tmp_path_factory.mktemp("pairs_ir")), size=64, seed=1, n_train=4, n_test_good=2,
                           n_test_bad=2)


def brute_force_samples(root, cls):
    """(RGB path, infrared path, (RGB, IR, PC) labels) of every test sample, reading the folders and data.csv
    directly: the infrared image of the same name, the row of the same object."""
    out = []
    test = os.path.join(root, cls, "RGB", "test")
    for kind in sorted(os.listdir(test)):
        rows = {}
        if kind != "good":
            with open(os.path.join(root, cls, "RGB", "GT", kind, "data.csv")) as f:
                rows = {r["object"]: (int(r["RGB"]), int(r["Infrared"]), int(r["Pointcloud"]))
                        for r in csv.DictReader(f)}
        for name in sorted(os.listdir(os.path.join(test, kind)), key=lambda n: int(n[:-4])):
            out.append((os.path.join(test, kind, name), os.path.join(root, cls, "Infrared", "test", kind, name),
                        rows.get(name[:-4], (0, 0, 0))))
    return out


def test_pairing_and_labels_against_brute_force(pairs):
    for cls in ("dome", "block"):
        ours = ds.mulsen_samples(pairs["mulsen"], cls, "test")
        expected = brute_force_samples(pairs["mulsen"], cls)
        assert [(s.image_path, s.pair_path, s.modal_labels) for s in ours] == expected
        assert [s.label for s in ours] == [max(labels) for *_, labels in expected]  # the preview's object label
        for s in ours:
            assert (s.mask_path is not None) == bool(s.modal_labels[0])
            assert (s.pair_mask_path is not None) == bool(s.modal_labels[1])
        assert {s.modal_labels for s in ours if "inner" in s.rel_path} == {KINDS_IR["inner"]}
    train = ds.mulsen_samples(pairs["mulsen"], "dome", "train")
    assert [os.path.basename(s.image_path) for s in train] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(s.pair_path.replace("Infrared", "RGB") == s.image_path for s in train)


def test_demo_data_has_a_point_cloud_per_sample(pairs):
    """MulSen-AD's layout holds a Pointcloud/.../<n>.stl per sample (the preview's reader pairs them; ours does not
    read them): the same names as the RGB images, each a binary STL whose size matches its triangle count."""
    cls = os.path.join(pairs["mulsen"], "dome")
    for split in ["train"] + [os.path.join("test", k) for k in os.listdir(os.path.join(cls, "RGB", "test"))]:
        rgb = sorted(n[:-4] for n in os.listdir(os.path.join(cls, "RGB", split)))
        pc = sorted(n[:-4] for n in os.listdir(os.path.join(cls, "Pointcloud", split)))
        assert pc == rgb, split
    stl = os.path.join(cls, "Pointcloud", "train", "0.stl")
    n = int(np.frombuffer(open(stl, "rb").read()[80:84], "<u4")[0])
    assert n == 2 * 7 * 7 and os.path.getsize(stl) == 84 + 50 * n  # 64 px sampled every 8: 7 x 7 cells


def test_pairing_is_by_name_not_by_order(pairs, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(os.path.join(pairs["mulsen"], "dome"), root / "dome")
    ir = root / "dome" / "Infrared" / "test" / "stain"
    os.rename(ir / "1.png", ir / "10.png")  # sorted by position, 10.png would pair with RGB's 1.png
    with pytest.raises(UserError, match=r"stain/1\.png has no image of the same name"):
        ds.mulsen_samples(str(root), "dome", "test")
    os.rename(ir / "10.png", ir / "1.png")
    table = root / "dome" / "RGB" / "GT" / "stain" / "data.csv"
    text = table.read_text()
    table.write_text(text.replace("\n1,", "\n7,"))
    with pytest.raises(UserError, match="has no row for sample 1"):
        ds.mulsen_samples(str(root), "dome", "test")
    table.write_text(text.replace("\n1,1,0,0", "\n1,1,1,0"))  # labelled anomalous in infrared: no mask there
    with pytest.raises(UserError, match="labelled anomalous in Infrared .* mask .* is missing"):
        ds.mulsen_samples(str(root), "dome", "test")


def test_model_forward_of_a_pair_is_the_two_images():
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, dropout=0.0, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                          modality="rgbir").eval()
    plain = models.ViTill(TINY_CFG, dropout=0.0, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 6, 56, 56)
    with torch.no_grad():
        en, de = model(x)
        en2, de2 = plain(torch.cat([x[:, :3], x[:, 3:]]))
    for a, b in zip(en + de, en2 + de2):
        torch.testing.assert_close(a, b)


SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "64", "--crop_size", "56", "--num_workers",
         "0", "--device", "cpu", "--batch_size", "4", "--log_every", "1", "--classes", "dome", "block"]


def ir_argv(pairs, save_dir, name):
    return ["--data_path", pairs["mulsen"], "--total_iters", "2", "--save_dir", str(save_dir), "--save_name", name,
            *SMALL]


@pytest.fixture(scope="module")
def ir_run(pairs, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs_ir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        cli.run_script(dinomaly2_mulsen, ir_argv(pairs, save_dir, "ir") + ["--save_heatmaps", "1"])
    return save_dir / "ir"


def test_object_score_label_and_pixel_metrics_against_brute_force(ir_run, pairs, monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    config = json.loads((ir_run / "config.json").read_text())
    assert config["model"]["modality"] == "rgbir" and config["gt_binarize"] == "mulsen"
    from dinomaly import checkpoints
    model, _ = checkpoints.load_trained(str(ir_run), {}, "dinomaly2", "rgbir")
    mapper = AnomalyMapper(model.eval(), max_ratio=0.01)
    samples = ds.mulsen_samples(pairs["mulsen"], "dome", "test")
    data = ds.TestDataset(samples, 64, 56)
    rows = [r.split(",") for r in (ir_run / "scores.csv").read_text().splitlines()[1:] if r.startswith("dome,")]
    maps = {"RGB": [], "IR": []}
    gts = {"RGB": [], "IR": []}
    for s, row in zip(samples, rows):
        img, mask, label, _, path = data[samples.index(s)]
        with torch.no_grad():  # each image alone through the plain model's path
            amap_rgb, score_rgb = mapper(img[None, :3].repeat(1, 2, 1, 1))
            amap_ir, score_ir = mapper(img[None, 3:].repeat(1, 2, 1, 1))
        assert row[1] == s.image_path and int(row[2]) == max(s.modal_labels)
        np.testing.assert_allclose(float(row[3]), (score_rgb[0].item() + score_ir[0].item()) / 2, rtol=1e-4)
        gt = (torch.nn.functional.interpolate((mask[None] > 0.5).float(), size=256, mode="nearest") > 0)[0]
        assert torch.equal(gt, binarize_gt(mask[None], 256, "mulsen")[0])
        maps["RGB"].append(amap_rgb[0, 0].numpy()), maps["IR"].append(amap_ir[0, 0].numpy())
        gts["RGB"].append(gt[0].numpy()), gts["IR"].append(gt[1].numpy())
    with open(ir_run / "metrics.csv") as f:
        metrics = {r["class"]: r for r in csv.DictReader(f)}["dome"]
    labels = [max(s.modal_labels) for s in samples]
    np.testing.assert_allclose(float(metrics["I-AUROC"]), roc_auc_score(labels, [float(r[3]) for r in rows]))
    for modality, key in (("RGB", "P-AUROC"), ("IR", "IR-P-AUROC")):
        expected = roc_auc_score(np.concatenate([g.ravel() for g in gts[modality]]),
                                 np.concatenate([m.ravel() for m in maps[modality]]))
        np.testing.assert_allclose(float(metrics[key]), expected, atol=2e-4)


def test_detector_takes_pairs(ir_run, pairs, monkeypatch):
    """The image's path in MulSen-AD's layout, or (RGB image, infrared image): the score is the evaluation's."""
    from PIL import Image

    from dinomaly import Detector
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    scores = {r.split(",")[1]: float(r.split(",")[3]) for r in (ir_run / "scores.csv").read_text().splitlines()[1:]}
    d = Detector(str(ir_run), device="cpu")
    for s in ds.mulsen_samples(pairs["mulsen"], "block", "test")[::7]:
        for given in (s.image_path, (np.asarray(Image.open(s.image_path)), s.pair_path)):
            np.testing.assert_allclose(d(given).score, scores[s.image_path], rtol=1e-5)
    # pair_map is the infrared image's own map: that of a pair whose first image is the infrared one
    p = d(s.image_path)
    np.testing.assert_allclose(p.pair_map, d((s.pair_path, s.pair_path)).anomaly_map, rtol=1e-5)
    assert not np.allclose(p.pair_map, p.anomaly_map, equal_nan=True)
    from dinomaly.predict import overlay
    from dinomaly.scoring import pair_input
    picture = overlay(pair_input(s.image_path, "rgbir", 64, 56)[2], p, d)  # predict.py's: both images side by side
    assert picture.shape[1] > 2 * 256 and picture.shape[0] < 2 * 256


def test_sharded_evaluation_merges_to_one_process(pairs, tmp_path, monkeypatch):
    """evaluate_shard as processes 0 and 1 of 2 (faked): the merged RGB and infrared accumulators and score rows
    are those of one process."""
    import types

    from dinomaly import evaluate
    from dinomaly.options import DataOptions, EvalOptions, RunOptions
    from dinomaly.utils import ClassAccumulator
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, dropout=0.2, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                          modality="rgbir").eval()
    mapper = AnomalyMapper(model)
    samples = ds.mulsen_samples(pairs["mulsen"], "dome", "test")
    data = DataOptions(num_workers=0, cache_dir=str(tmp_path))
    evaluation = EvalOptions(batch_size=4, save_heatmaps=0, aupro="dinomaly", gt_binarize="mulsen")

    def shard(rank, world):
        run = types.SimpleNamespace(options=RunOptions(seed=1), rank=rank, world_size=world,
                                    device=torch.device("cpu"), is_main=rank == 0)
        return evaluate.evaluate_shard(run, mapper, samples, "dome", data, evaluation, 64, 56)

    one, parts = shard(0, 1), [shard(0, 2), shard(1, 2)]
    for k in (0, 5):  # the RGB (and object) accumulator, the infrared one
        merged = ClassAccumulator.merge([p[k] for p in parts]).compute()
        single = ClassAccumulator.merge([one[k]]).compute()
        np.testing.assert_allclose([merged[m] for m in sorted(merged)], [single[m] for m in sorted(single)],
                                   rtol=1e-6)
    rows = sorted(r for p in parts for r in p[1])
    assert [r[1][:3] for r in rows] == [r[1][:3] for r in one[1]]
    np.testing.assert_allclose([r[1][3] for r in rows], [r[1][3] for r in one[1]], rtol=1e-5)


def test_class_finding_uses_both_images_of_a_pair(pairs, monkeypatch):
    """The class prototypes of pairs and the class found for a pair against brute force in float64: a pair's
    feature is its RGB image's pooled group features beside its infrared image's (each image alone through the
    encoder), each group's unit length, normalised together; a prototype the normalised mean, its radius the
    largest distance of its training pairs."""
    from dinomaly import class_finder
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, dropout=0.2, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                          modality="rgbir").eval()
    mapper = AnomalyMapper(model)
    train = {c: ds.mulsen_samples(pairs["mulsen"], c, "train") for c in ("dome", "block")}
    found = class_finder.build(mapper, train, 64, 56, torch.device("cpu"), batch_size=3)

    def brute(samples):  # one float64 feature per pair
        x = torch.stack([ds.TestDataset([s], 64, 56)[0][0] for s in samples])  # the RGB images, then the infrared
        parts = []
        for half in (x[:, :3], x[:, 3:]):  # each image through the encoder as a plain RGB image
            with torch.no_grad():
                en = model.group_features(*plain_taps(model, half))
            parts += [(v := e.double().mean(dim=(2, 3)).numpy()) / np.linalg.norm(v, axis=1, keepdims=True)
                      for e in en]
        f = np.concatenate(parts, axis=1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    protos, radii = [], []
    for c in ("dome", "block"):
        f = brute(train[c])
        p = f.mean(axis=0) / np.linalg.norm(f.mean(axis=0))
        protos.append(p), radii.append((1 - f @ p).max())
    assert found["classes"] == ["dome", "block"] and found["prototypes"].shape == (2, 2 * 2 * TINY_CFG.embed_dim)
    np.testing.assert_allclose(found["prototypes"].numpy(), np.array(protos), atol=1e-6)
    np.testing.assert_allclose(found["radius"].numpy(), radii, atol=1e-5)
    tests = [s for c in ("dome", "block") for s in ds.mulsen_samples(pairs["mulsen"], c, "test")[::3]]
    x = torch.stack([ds.TestDataset([s], 64, 56)[0][0] for s in tests])
    with torch.no_grad():
        ours = class_finder.classify(found, mapper.features(x))
        assert torch.equal(mapper(x[:2], features=True)[2], mapper.features(x[:2]))  # predict's path: the same
    distances = 1 - brute(tests) @ np.array(protos).T
    assert [m.class_name for m in ours] == [["dome", "block"][i] for i in distances.argmin(axis=1)]
    np.testing.assert_allclose([m.distance for m in ours], distances.min(axis=1), atol=1e-5)


def plain_taps(model, x):
    """The encoder's taps of RGB images [B, 3, H, W] (no pair), as the plain model takes them."""
    grid = x.shape[-2] // model.encoder.cfg.patch_size, x.shape[-1] // model.encoder.cfg.patch_size
    return model.encoder(x), grid


def test_pictures_show_each_image_with_its_own_map(ir_run):
    """An RGB + infrared pair's panel: a row per image, each with its own map over it (pixel for pixel the blend
    of that image and that map), labelled; the evaluation's heatmaps and gallery are drawn so."""
    from PIL import Image

    from dinomaly.visualize import _text_scale, blend, colorize, grey, heatmap_panel, to_uint8_image
    img = torch.zeros(6, 56, 56)
    img[3:] = 1.5  # a light infrared image
    gt, rgb_map, ir_map = torch.zeros(256, 256), torch.zeros(256, 256), torch.full((256, 256), 2.0)
    panel = heatmap_panel(img, gt, rgb_map, (0.0, 1.0), "caption", None, ("infrared", gt, ir_map))
    title = int(28 * _text_scale(256)[0] / 0.43)
    for row, (x, m) in enumerate(((img[:3], rgb_map), (img[3:], ir_map))):
        top = title + row * (256 + title)
        image = to_uint8_image(x, 256)
        assert np.array_equal(panel[top:top + 256, :256], image)
        under = grey(image) if row else image  # the second image in grey under its map
        assert np.array_equal(panel[top:top + 256, 512:768], blend(under, colorize(m.numpy(), (0.0, 1.0))))
    assert panel.shape[0] == 3 * title + 2 * 256
    heatmap = np.asarray(Image.open(next((ir_run / "heatmaps" / "dome").iterdir())))
    assert heatmap.shape[0] == panel.shape[0] and heatmap.shape[1] > 3 * 256
    assert (ir_run / "gallery" / "dome.png").is_file()


def test_per_class_pairs(pairs, tmp_path, monkeypatch):
    """One model per class on RGB + infrared pairs: both modalities' metrics per class, and the Detector sends each
    pair to its class's model, found by the pairs' class prototypes."""
    from dinomaly import Detector
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    cli.run_script(dinomaly2_mulsen, ir_argv(pairs, tmp_path, "sep") + ["--per_class", "--total_iters", "1"])
    run = tmp_path / "sep"
    with open(run / "metrics.csv") as f:
        metrics = {r["class"]: r for r in csv.DictReader(f)}
    assert set(metrics) == {"dome", "block", "mean"}
    assert all(np.isfinite(float(m[k])) for m in metrics.values() for k in ("I-AUROC", "P-AUROC", "IR-P-AUROC"))
    d = Detector(str(run), device="cpu")
    for c in ("dome", "block"):
        scores = {r.split(",")[1]: float(r.split(",")[3]) for r in (run / c / "scores.csv").read_text().splitlines()[1:]}
        s = ds.mulsen_samples(pairs["mulsen"], c, "test")[-1]
        given = d.predict([s.image_path], [c])[0]  # its class's model: the score of that model's evaluation
        assert given.class_name == c and given.pair_map is not None
        np.testing.assert_allclose(given.score, scores[s.image_path], rtol=1e-5)
        found = d(s.image_path)  # its class found by the pairs' prototypes
        assert found.class_match is not None and found.class_match.class_name in ("dome", "block")


def test_bf16_and_compile_on_pairs(ir_run, pairs, tmp_path, monkeypatch):
    """The run evaluated again in bf16 autocast with compiled blocks (aot_eager here: inductor's code generation is
    slow on a CPU), its images cached on disk: finite scores near the float32 ones, both modalities' metrics."""
    import functools

    from dinomaly import speed
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    monkeypatch.setattr(speed, "maybe_compile", functools.partial(speed.maybe_compile, backend="aot_eager"))
    cli.run_script(dinomaly2_mulsen, ["--data_path", pairs["mulsen"], "--eval_only", "--checkpoint", str(ir_run),
                                      "--save_dir", str(tmp_path), "--save_name", "bf16", *SMALL[2:-3], "--classes",
                                      "dome", "--precision", "bf16", "--compile", "--cache_images", "disk",
                                      "--cache_dir", str(tmp_path / "cache")])
    fp32 = {r.split(",")[1]: float(r.split(",")[3]) for r in (ir_run / "scores.csv").read_text().splitlines()[1:]}
    bf16 = {r.split(",")[1]: float(r.split(",")[3]) for r in
            (tmp_path / "bf16" / "scores.csv").read_text().splitlines()[1:]}
    assert len(bf16) == 10 and all(np.isfinite(list(bf16.values())))
    np.testing.assert_allclose(list(bf16.values()), [fp32[k] for k in bf16], rtol=0.05)
    with open(tmp_path / "bf16" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert np.isfinite(float(row["P-AUROC"])) and np.isfinite(float(row["IR-P-AUROC"]))
    assert os.listdir(tmp_path / "cache")


def test_torchrun_two_processes_equal_one(ir_run, pairs, tmp_path, monkeypatch):
    """Trained and evaluated by 2 CPU processes (gloo) under torchrun: the sharded evaluation (the infrared images'
    metrics and the object scores included) gives the results of one process evaluating the same model."""
    import subprocess
    import sys

    from conftest import ROOT
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        os.path.join("tests", "signal_run.py"), "none", "0", "dinomaly2_mulsen.py",
                        *ir_argv(pairs, tmp_path, "ddp")[:-1], "--batch_size", "2", "--total_iters", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evaluation shared by 2 processes" in (tmp_path / "ddp" / "log.txt").read_text()
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    cli.run_script(dinomaly2_mulsen, ["--data_path", pairs["mulsen"], "--eval_only", "--checkpoint",
                                      str(tmp_path / "ddp"), "--save_dir", str(tmp_path), "--save_name", "single",
                                      *SMALL[2:-1], "--batch_size", "3"])
    for name, first in (("metrics.csv", 1), ("scores.csv", 3)):  # the names and labels, then the numbers
        with open(tmp_path / "ddp" / name) as f, open(tmp_path / "single" / name) as g:
            sharded, single = list(csv.reader(f)), list(csv.reader(g))
        assert [r[:first] for r in sharded] == [r[:first] for r in single]
        assert first == 3 or "IR-P-AUROC" in sharded[0]
        np.testing.assert_allclose([float(c) for r in sharded[1:] for c in r[first:] if c],
                                   [float(c) for r in single[1:] for c in r[first:] if c], atol=1e-6)
def test_two_input_exports_equal_pytorch_and_predict_alike(ir_run, pairs, tmp_path, capsys):
    """ONNX and OpenVINO with inputs rgb and infrared, outputs the RGB and the infrared maps and the pair's score,
    predict.py on the ONNX file, and the service on it."""
    pytest.importorskip("openvino")
    from conftest import check_pair_exports
    paths = check_pair_exports(ir_run, "rgbir", os.path.join(pairs["mulsen"], "dome", "RGB", "test"), tmp_path,
                               capsys, ".onnx")
    from pathlib import Path  # the service on the exported file: the checkpoint's score of a pair sent as two parts

    import httpx

    from dinomaly import Detector, serve
    s = [s for s in ds.mulsen_samples(pairs["mulsen"], "dome", "test") if s.label][0]
    onnx = str(paths[".onnx"])
    service = serve.Background(serve.create_app(Detector(onnx), serve.ServeOptions(onnx)))
    try:
        files = [(k, (os.path.basename(f), Path(f).read_bytes())) for k, f in (("rgb", s.image_path),
                                                                              ("infrared", s.pair_path))]
        (got,) = httpx.post(service.url + "/predict", files=files, timeout=60).json()["images"]
    finally:
        service.close()
    assert got["score"] == pytest.approx(Detector(str(ir_run), device="cpu")((s.image_path, s.pair_path)).score,
                                         abs=1e-4)


def test_the_service_takes_a_pair_as_two_parts(ir_run, pairs):
    """POST /predict with the parts rgb and infrared: the Detector's result on the same pair."""
    from pathlib import Path

    import httpx

    from dinomaly import Detector, serve
    detector = Detector(str(ir_run), device="cpu")
    service = serve.Background(serve.create_app(detector, serve.ServeOptions(str(ir_run))))
    try:
        assert httpx.get(service.url + "/info").json()["parts"] == ["rgb", "infrared"]
        s = [s for s in ds.mulsen_samples(pairs["mulsen"], "dome", "test") if s.label][0]
        files = [("infrared", ("ir.png", Path(s.pair_path).read_bytes())),
                 ("rgb", ("rgb.png", Path(s.image_path).read_bytes()))]
        (got,) = httpx.post(service.url + "/predict", files=files, timeout=60).json()["images"]
        want = detector((s.image_path, s.pair_path))
        assert got["name"] == "rgb.png" and got["score"] == pytest.approx(want.score, rel=1e-6)
        assert (got["decision"] == "anomalous") == want.is_anomalous and got["class"] == want.class_name
        r = httpx.post(service.url + "/predict", files=files[1:], timeout=60)
        assert r.status_code == 400 and "the part 'infrared' is missing" in r.json()["error"]
    finally:
        service.close()



def mulsen_paths(seed=0):
    """The relative paths of a generated MulSen-AD folder, shuffled: RGB images with or without their infrared
    image, masks and data.csv under GT/, point clouds, a class whose name holds 'RGB', stray files."""
    rng = np.random.default_rng(seed)
    paths = []
    for cls in ("capsule", "RGB_cotton"):
        for sub in ("train", "test/good", "test/crack"):
            for n in range(5):
                paths += [f"{cls}/RGB/{sub}/{n}.png"] + [f"{cls}/Infrared/{sub}/{n}.png"] * (rng.random() < 0.7)
        paths += [f"{cls}/RGB/GT/crack/{n}.png" for n in range(3)] + [f"{cls}/Infrared/GT/crack/0.png",
                                                                        f"{cls}/RGB/GT/crack/data.csv",
                                                                        f"{cls}/Pointcloud/test/crack/0.stl"]
    paths += ["capsule/Infrared/test/good/9.png", "capsule/RGB/test/good/notes.txt", "RGB/test/0.png",
              "Infrared/test/0.png", "RGB/capsule/RGB/test/1.png", "RGB/capsule/Infrared/test/1.png",
              "RGB/capsule/Infrared/test/2.png"]  # under a folder named RGB: an infrared image without its RGB one
    return [paths[i] for i in rng.permutation(len(paths))]


def is_mulsen_rgb_image(parts):
    """Under an RGB/ folder (not an Infrared/ one below it), not under GT/ below it."""
    above = [part for part in parts[:-1] if part in ("RGB", "Infrared")]
    return above[-1:] == ["RGB"] and "GT" not in parts[len(parts) - 1 - parts[::-1].index("RGB"):]


def infrared_rank(rgb, other):
    """The infrared image of a MulSen-AD RGB image: the path with its last RGB folder named Infrared."""
    last = max(i for i, part in enumerate(rgb) if part == "RGB")
    same = len(other) == len(rgb) and all(a == b for i, (a, b) in enumerate(zip(rgb, other)) if i != last)
    return 0 if same and other[last] == "Infrared" else None


def test_pairs_endpoint_against_brute_force(ir_run):
    """POST /pairs on a MulSen-AD folder's paths: the pairs and unpaired images of a brute-force comparison of every
    two paths (GT/ masks, infrared images and other files no RGB images), the missing file named in one line."""
    from dinomaly import Detector, serve
    from conftest import brute_force_pairs, post_pairs
    service = serve.Background(serve.create_app(Detector(str(ir_run), device="cpu"), serve.ServeOptions(str(ir_run))))
    try:
        paths = mulsen_paths()
        got, unpaired = post_pairs(service.url, paths)
    finally:
        service.close()
    want, want_unpaired = brute_force_pairs(paths, is_mulsen_rgb_image, infrared_rank)
    assert got == want and [a for a, _ in unpaired] == want_unpaired
    assert len(want) > 10 and len(want_unpaired) > 3 and ("RGB/capsule/RGB/test/1.png",
                                                          "RGB/capsule/Infrared/test/1.png") in got
    for a, message in unpaired:
        i = a.rindex("RGB/")
        assert message.startswith(f"no infrared image for {a}: {a[:i]}Infrared/{a[i + 4:]} not found")


def test_interrupted_run_resumes_bit_exactly(ir_run, pairs, tmp_path, monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    assert_resumes_bit_exactly(dinomaly2_mulsen, ir_argv(pairs, tmp_path, "cut"), ir_run, monkeypatch)


def test_trains_in_bf16_compiled(ir_run, pairs, tmp_path, monkeypatch):
    assert_trains_in_bf16_compiled(dinomaly2_mulsen, ir_argv(pairs, tmp_path, "bf16"), ir_run, monkeypatch)


def test_prototypes_of_an_older_evaluation_are_refused_in_one_line(ir_run, pairs, tmp_path, capsys):
    """A run evaluated before an RGB + infrared pair's class prototypes held both images has them half as wide (of
    its RGB images alone): the Detector and export.py refuse them with the same line, naming the file and what to
    do (export.py: exit status 2, nothing written; the Detector when it is made)."""
    from dinomaly import Detector, class_finder
    run = tmp_path / "old"
    shutil.copytree(ir_run, run, ignore=shutil.ignore_patterns("heatmaps", "gallery", "curves"))
    data = torch.load(run / class_finder.FILE, weights_only=True)
    half = data["prototypes"].shape[1] // 2
    data["prototypes"] = torch.nn.functional.normalize(data["prototypes"][:, :half], dim=1)
    torch.save(data, run / class_finder.FILE)
    assert exit_status_of(cli.export_main, ["--checkpoint", run, "--out", tmp_path / "old.onnx"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {run / class_finder.FILE} holds class prototypes of {half} features, this "
                           f"model's images have {2 * half}") and f"evaluate this run again into {run} " in line
    assert not (tmp_path / "old.onnx").exists()
    with pytest.raises(UserError) as e:  # when it is made (a service refuses to start), not at each image
        Detector(str(run), device="cpu")
    assert line == f"error: {e.value}"
