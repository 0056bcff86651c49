"""Prediction on new images (predict.py), calibrated thresholds (thresholds.py), the evaluation pictures
(report.py, visualize.py) and the ONNX export (export.py), on a tiny run trained on generated data."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import precision_recall_curve

from dinomaly import checkpoints, class_finder, cli, image_files, models, predict, scoring
from dinomaly import dataset as ds
from dinomaly import thresholds as th
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly.visualize import colorize, overlay_picture

from conftest import DEVICES, ROOT, TINY, TINY_CFG
from conftest import exit_status_of as call

SIZE, CROP = 64, 56


@pytest.fixture(scope="module")
def demo(demo64):
    return demo64


@pytest.fixture(scope="module")
def run(tiny_run):
    """conftest's tiny Dinomaly run folder (model.pth, config.json, thresholds.json, pictures) on two demo classes."""
    return tiny_run


@pytest.fixture(scope="module")
def crr_run(tmp_path_factory):
    """A CRR-like run folder: a random tiny model (mask ratio 0.25) and a segmentation network, no thresholds."""
    d = tmp_path_factory.mktemp("crr")
    torch.manual_seed(0)
    torch.save(models.ViTill(TINY_CFG).state_dict(), d / "model.pth")
    torch.save(models.SegmentationNet(base_width=2 * 32 // 8).state_dict(), d / "Seg_model_last.pth")
    (d / "config.json").write_text(json.dumps({"model": dict(encoder=TINY, image_size=SIZE, crop_size=CROP,
                                                             mask_ratio=0.25, test_mask="on", attn_eps=0.0)}))
    return d


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brute_force_threshold(labels, scores):
    """scikit-learn's PR curve: the threshold of the largest F1 (the first, i.e. lowest, among ties)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    return thresholds[int(np.argmax(f1[:-1]))], f1[:-1].max()


# ----------------------------------------------------------------------------------------------- geometry

def test_uncrop_puts_the_crop_corner_where_resize_and_crop_took_it():
    # a 100 x 80 image, resized to 64 x 64, centre crop 56 (top = left = 4); the map is hot in its top-left
    # 32 x 32, i.e. the crop's top-left 7 x 7 px. Original pixel x has its centre at (x + 0.5) * 64 / 100 in
    # the resized image, 4 less in the crop, and (that) * 256 / 56 in map units; bilinear crosses 0.5 at map
    # unit 32. So hot: crop x in [0, 7] <=> x + 0.5 <= 11 * 100 / 64 = 17.19 <=> x <= 16, and seen: x + 0.5 >=
    # 4 * 100 / 64 = 6.25 <=> x >= 6; rows: y + 0.5 <= 11 * 80 / 64 = 13.75 <=> y <= 13, y + 0.5 >= 5 <=> y >= 5.
    # The crop ends at resized 60: x + 0.5 < 93.75 <=> x <= 93, y + 0.5 < 75 <=> y <= 74.
    amap = np.zeros((256, 256), np.float32)
    amap[:32, :32] = 1
    full, seen = scoring.uncrop(amap, 100, 80, 64, 56)
    assert full.shape == seen.shape == (80, 100)
    ys, xs = np.nonzero(seen)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 93, 5, 74)
    ys, xs = np.nonzero(np.nan_to_num(full) >= 0.5)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 16, 5, 13)
    assert np.isnan(full[~seen]).all() and not np.isnan(full[seen]).any()
    const, _ = scoring.uncrop(np.full((256, 256), 0.25, np.float32), 100, 80, 64, 56)
    np.testing.assert_allclose(const[seen], 0.25, rtol=1e-6)
    # a 256-px image, no resize, no crop: the map is the image's, pixel for pixel
    ident, seen = scoring.uncrop(amap + np.arange(256, dtype=np.float32)[None] / 256, 256, 256, 256, 256)
    assert seen.all() and np.array_equal(ident, amap + np.arange(256, dtype=np.float32)[None] / 256)


def test_uncrop_inverts_the_real_input_transform():
    # A bright rectangle in a non-square image goes through the real transform (PIL resize + centre crop);
    # its brightness in the crop, taken as a map at 256 and put back, lands on the rectangle.
    h, w = 100, 150
    img = np.zeros((h, w, 3), np.uint8)
    img[30:60, 50:110] = 255
    x = ds.transform(Image.fromarray(img), 64, 42)
    bright = x.mean(0) * torch.tensor(ds.IMAGENET_STD).mean() + torch.tensor(ds.IMAGENET_MEAN).mean()
    amap = F.interpolate(bright[None, None], size=256, mode="bilinear", align_corners=False)[0, 0].numpy()
    full, seen = scoring.uncrop(amap, w, h, 64, 42)
    found = np.nan_to_num(full) >= 0.5
    truth = img[..., 0] > 0
    assert (found & truth).sum() / (found | truth).sum() > 0.9
    assert not seen[:, :5].any() and not seen[:, -5:].any() and seen[h // 2, w // 2]


# ----------------------------------------------------------------------------------------------- thresholds

def test_f1max_threshold_against_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 60)
        scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounded: many ties
        t, f1 = th.f1max_threshold(labels, scores)
        want_t, want_f1 = brute_force_threshold(labels, scores)
        assert t == want_t and f1 == pytest.approx(want_f1, abs=1e-12)
    assert th.f1max_threshold(np.zeros(5), np.arange(5.0)) == (None, None)
    # two thresholds with the same F1 (2/3 at 4 and at 1): the lower one, which flags every anomaly
    assert th.f1max_threshold(np.array([1, 0, 0, 1]), np.array([4.0, 3, 2, 1])) == (1.0, pytest.approx(2 / 3))


def test_thresholds_json_matches_brute_force_over_the_run(run):
    data = json.loads((run / "thresholds.json").read_text())
    rows = read_csv(run / "scores.csv")
    assert data["settings"] == {"map": "reconstruction", "fusion_alpha": 0.7, "max_ratio": 0.01, "test_mask": "off",
                                "mask_ratio": 0.0}
    for name, entry in [*data["classes"].items(), ("all", data["all"])]:
        mine = [r for r in rows if name in ("all", r["class"])]
        labels = np.array([int(r["label"]) for r in mine])
        scores = np.array([float(r["score"]) for r in mine])
        assert entry["image"]["threshold"] == pytest.approx(brute_force_threshold(labels, scores)[0], abs=0)
        assert entry["image"]["normal_scores"]["min"] == scores[labels == 0].min()
        assert entry["image"]["normal_scores"]["max"] == scores[labels == 0].max()
        lo, hi = entry["color_range"]
        assert lo == entry["pixel"]["normal_values"]["p50"]
        assert (lo + hi) / 2 == pytest.approx(entry["image"]["threshold"], abs=1e-12)
    assert set(data["classes"]) == {"weave", "nut"}


def test_pixel_threshold_exact_and_subsampled():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), bool)
    masks[3:, 4:9, 5:12] = True
    maps = (rng.normal(0, 1, masks.shape) + 1.5 * masks).astype(np.float32)
    everything = th.PixelSample(maps.size)
    everything.add(maps, masks, range(6))
    entry = th.Calibration({}).add("c", np.array([0, 0, 0, 1, 1, 1]), np.arange(6.0), *everything.arrays())
    assert entry["pixel"]["threshold"] == brute_force_threshold(masks.ravel(), maps.ravel())[0]
    # normal pixels: those of the three images with empty masks
    assert entry["pixel"]["normal_values"]["p50"] == pytest.approx(np.median(maps[:3]), abs=1e-6)
    assert entry["pixel"]["normal_values"]["p999"] == pytest.approx(np.percentile(maps[:3], 99.9), abs=1e-6)
    # a subsample: about 500 of 1536 pixels, the same however the images are batched or split across processes
    whole = th.PixelSample(maps.size, max_pixels=500)
    whole.add(maps, masks, range(6))
    values, flags, normal = whole.arrays()
    assert 400 < len(values) < 600 and len(np.unique(values)) == len(values)
    position = {v: i for i, v in enumerate(maps.ravel())}
    idx = np.array([position[v] for v in values])
    np.testing.assert_array_equal(flags, masks.ravel()[idx])
    np.testing.assert_array_equal(normal, ~masks.any(axis=(1, 2))[idx // 256])
    shards = [th.PixelSample(maps.size, max_pixels=500) for _ in range(2)]
    shards[0].add(maps[0::2], masks[0::2], [0, 2, 4])
    shards[1].add(maps[1::2], masks[1::2], [1, 3, 5])
    np.testing.assert_array_equal(np.sort(th.PixelSample.merge(shards).arrays()[0]), np.sort(values))


def test_color_range_puts_the_threshold_in_the_middle():
    assert th.color_range(0.5, 0.7, 0.9) == pytest.approx([0.5, 0.9])  # 0.5 + 2 * (0.7 - 0.5)
    assert th.color_range(0.5, 0.3, 0.9) == [0.5, 0.9]  # threshold below lo: up to the normal 99.9th percentile
    assert th.color_range(0.5, None, 0.8) == [0.5, 0.8] and th.color_range(None, 0.7, 0.9) is None
    lo, hi = th.color_range(0.5, None, None)
    assert lo == 0.5 and 0.5 < hi < 0.5 + 1e-5  # never an empty scale


def test_normalize_maps_threshold_to_half():
    assert th.normalize(2.0, 2.0, 1.0) == 0.5
    assert th.normalize(1.0, 2.0, 1.0) == 0.0
    assert th.normalize(2.5, 2.0, 1.0) == 0.75
    assert th.normalize(9.0, 2.0, 1.0) == 1.0 and th.normalize(0.0, 2.0, 1.0) == 0.0
    assert th.normalize(1.0, 2.0, None) == 0.25  # without a normal minimum: score / (2 * threshold)


# ----------------------------------------------------------------------------------------------- predict.py

@pytest.fixture(scope="module")
def inputs(demo, tmp_path_factory):
    """A folder of images of several kinds and sizes, with one broken file and one text file."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copytree(os.path.join(demo["mvtec"], "nut", "test"), d / "nut")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 80), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)).save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (60, 60), dtype=np.uint16)).save(d / "deep.png")
    (d / "broken.png").write_bytes(b"not a png")
    (d / "notes.txt").write_text("not an image")
    return d


def model_of(run):
    return checkpoints.load_model(str(run / "model.pth"), encoder=TINY).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_predict_scores_decisions_and_pictures(run, inputs, tmp_path, capsys, device):
    out = tmp_path / "out"
    workers = "2" if device == "cuda" else "0"  # on a GPU through loader processes and pinned memory
    code = call(cli.predict_main, ["--checkpoint", run, "--input", inputs, "--out", out, "--device", device, "--num_workers",
                          workers, "--batch_size", "3", "--normalize"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped" in captured.err and "broken.png" in captured.err and "notes.txt" not in captured.err
    assert "\r" not in captured.err  # no progress bar when the output is not a terminal
    summary = captured.out.strip().splitlines()[-1]
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 3 + 4 + 3 and f"predicted {len(rows)} images" in summary and "skipped 1" in summary
    classes = json.loads((run / "thresholds.json").read_text())["classes"]
    mapper = AnomalyMapper(model_of(run).to(device))
    for r in rows:
        score, threshold = float(r["score"]), float(r["threshold"])
        calibrated = classes[r["class"]]  # the class found for the image decides
        assert 0 <= float(r["class_confidence"]) <= 1
        assert threshold == calibrated["image"]["threshold"]
        assert r["decision"] == ("anomalous" if score >= threshold else "normal")
        assert (float(r["normalized_score"]) >= 0.5) == (r["decision"] == "anomalous")
        with torch.no_grad():
            amap, want = mapper(ds.load_tensor(r["image_path"], SIZE, CROP)[None].to(device))
        assert score == pytest.approx(want.item(), abs=1e-6 if device == "cpu" else 1e-5)  # GPU: other GEMM tiles
        with Image.open(r["image_path"]) as im, Image.open(out / r["mask"]) as mask, \
                Image.open(out / r["overlay"]) as overlay:
            size = im.size
            m = np.asarray(mask)
            assert mask.size == size and set(np.unique(m)) <= {0, 255}
            assert overlay.width >= size[0] and overlay.height >= size[1]
        full, seen = scoring.uncrop(amap[0, 0].cpu().numpy(), *size, SIZE, CROP)
        level = min(calibrated["pixel"]["threshold"], threshold)  # the pixel threshold capped by the image's
        anomalous = score >= threshold
        np.testing.assert_array_equal(m > 0, anomalous & seen & (np.nan_to_num(full) >= level))
        assert (m > 0).any() == anomalous  # an anomalous image always shows where, a normal one shows nothing
    assert {os.path.basename(r["image_path"]) for r in rows} >= {"grey.png", "rgba.png", "deep.png"}


def test_class_threshold_and_explicit_threshold(run, inputs, tmp_path, capsys):
    data = json.loads((run / "thresholds.json").read_text())
    base = ["--checkpoint", run / "model.pth", "--input", inputs / "nut" / "good", "--device", "cpu",
            "--num_workers", "0"]
    assert call(cli.predict_main, [*base, "--out", tmp_path / "a", "--class_name", "nut"]) == 0
    rows = read_csv(tmp_path / "a" / "predictions.csv")
    assert {float(r["threshold"]) for r in rows} == {data["classes"]["nut"]["image"]["threshold"]}
    assert call(cli.predict_main, [*base, "--out", tmp_path / "b", "--threshold", "1.1"]) == 0
    rows = read_csv(tmp_path / "b" / "predictions.csv")
    assert all(float(r["threshold"]) == 1.1 and r["decision"] == ("anomalous" if float(r["score"]) >= 1.1 else
                                                                  "normal") for r in rows)
    assert "--class_name" not in capsys.readouterr().out
    # no class given: each image's class is found (class_prototypes.pt) and its thresholds decide
    assert call(cli.predict_main, [*base, "--out", tmp_path / "c"]) == 0
    rows = read_csv(tmp_path / "c" / "predictions.csv")
    assert {r["class"] for r in rows} == {"nut"}
    assert {float(r["threshold"]) for r in rows} == {data["classes"]["nut"]["image"]["threshold"]}
    # a run evaluated before class finding: all classes' threshold, with hints (images under a folder named like a
    # calibrated class: that class)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    os.remove(old / class_finder.FILE)
    capsys.readouterr()
    assert call(cli.predict_main, [*base[:1], old, *base[2:], "--out", tmp_path / "d"]) == 0
    out = capsys.readouterr().out
    assert f"no {class_finder.FILE} in {old}" in out
    assert "a class of this run: --class_name nut decides with that class's threshold" in out
    rows = read_csv(tmp_path / "d" / "predictions.csv")
    assert {(r["class"], float(r["threshold"])) for r in rows} == {("", data["all"]["image"]["threshold"])}


def test_class_folder_needs_one_class_above_every_image(tmp_path, monkeypatch):
    classes = ["nut", "weave"]
    assert predict.class_folder(["d/nut/test/a.png", "d/nut/test/good/b.png"], classes) == "nut"
    assert predict.class_folder(["d/nut/a.png", "d/weave/b.png"], classes) is None  # two classes
    assert predict.class_folder(["d/nut/a.png", "d/b.png"], classes) is None  # one image outside
    assert predict.class_folder(["d/nut.png", "d/nutty/b.png"], classes) is None  # file names, other folders
    assert predict.class_folder(["nut/weave/a.png"], classes) is None  # ambiguous
    assert predict.class_folder(["d/nut/a.png"], ["nut"]) is None  # a one-class run: its threshold is the class's
    os.makedirs(tmp_path / "weave" / "test")
    monkeypatch.chdir(tmp_path / "weave" / "test")
    assert predict.class_folder(["a.png", "./good/b.png"], classes) == "weave"  # the folder above the cwd


@pytest.mark.parametrize("case,expected", [
    ("missing_checkpoint", "nope"),
    ("empty_folder", "no images"),
    ("negative_threshold", "--threshold -1.0 must be a positive number"),
    ("nan_threshold", "--threshold nan must be a positive number"),
    ("text_threshold", "--threshold: invalid float value"),
    ("unknown_class", "unknown --class_name bolt; "),
    ("nothing_readable", "none of the 1 images could be read"),
    ("no_thresholds", "no thresholds file"),
])
def test_user_errors_exit_2_with_one_line(run, inputs, tmp_path, capsys, case, expected):
    checkpoint, target, extra = run, inputs / "nut" / "good", []
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "nope" / "model.pth"
    elif case == "empty_folder":
        target = tmp_path / "empty"
        (target / "sub").mkdir(parents=True)
    elif case.endswith("threshold"):
        extra = ["--threshold", {"negative_threshold": "-1", "nan_threshold": "nan", "text_threshold": "high"}[case]]
    elif case == "unknown_class":
        extra = ["--class_name", "bolt"]
    elif case == "nothing_readable":
        target = inputs / "broken.png"
    else:
        checkpoint = tmp_path / "official"
        checkpoint.mkdir()
        shutil.copy(run / "model.pth", checkpoint / "model.pth")
        shutil.copy(run / "config.json", checkpoint / "config.json")
    code = call(cli.predict_main, ["--checkpoint", checkpoint, "--input", target, "--out", tmp_path / "out",
                                   "--device", "cpu", "--num_workers", "0", *extra])
    out = capsys.readouterr()
    err = [line for line in out.err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    if case == "unknown_class":
        assert "weave, nut" in err[0] and "loaded" not in out.out  # found before the model loads


def test_detector_on_arrays_images_and_files_agrees(run, inputs):
    detector = predict.Detector(str(run), device="cpu")
    path = str(inputs / "nut" / "cut" / "000.png")
    from_file = detector(path)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
        from_pil = detector(im)
    from_array = detector(rgb)
    from_float = detector(rgb.astype(np.float32) / 255)
    assert from_file.score == from_pil.score == from_array.score == from_float.score
    assert from_file.anomaly_map.shape == from_file.mask.shape == rgb.shape[:2]
    np.testing.assert_array_equal(from_file.anomaly_map, from_array.anomaly_map)
    assert from_file.class_name == "nut" and from_file.class_match.class_name == "nut"
    assert from_file.threshold == detector.point("nut").threshold
    assert from_file.is_anomalous == (from_file.score >= from_file.threshold)
    at = predict.Detector(str(run), device="cpu", threshold=from_file.score)(path)
    assert at.score == from_file.score and at.is_anomalous  # anomalous at score == threshold
    grey = np.asarray(Image.open(inputs / "grey.png"))
    assert detector(grey).score == detector(np.repeat(grey[..., None], 3, axis=2)).score
    batch = detector.predict([path, rgb])
    assert batch[0].score == pytest.approx(from_file.score, abs=1e-6) and batch[1].score == batch[0].score


def test_crr_run_adds_the_segmentation_network(crr_run, inputs, monkeypatch):
    detector = predict.Detector(str(crr_run), threshold=1.0, device="cpu", test_mask="off")
    assert detector.mapper.segnet is not None and detector.mapper.fusion_alpha == 0.7
    assert detector.recipe.mask_ratio == 0.25 and detector.recipe.crop_size == CROP
    model = checkpoints.load_model(str(crr_run / "model.pth"), encoder=TINY, mask_ratio=0.25).eval()
    segnet = checkpoints.load_segmentation_net(str(crr_run / "Seg_model_last.pth"), 32).eval()
    path = str(inputs / "nut" / "good" / "000.png")
    with torch.no_grad():
        want = AnomalyMapper(model, segnet)(ds.load_tensor(path, SIZE, CROP)[None])[1].item()
    assert detector(path).score == pytest.approx(want, abs=1e-6)
    # the run's test-time masking (on) is random; each image's mask seeded by its pixels: the same score from
    # two detectors, alone or in a batch at any position, and unlike the unmasked one
    first, second = (predict.Detector(str(crr_run), threshold=1.0, device="cpu") for _ in range(2))
    alone = first(path).score
    other = str(inputs / "nut" / "cut" / "000.png")
    seen = []
    draw = second.mapper.model.bottleneck_mask
    monkeypatch.setattr(second.mapper.model, "bottleneck_mask", lambda x, seeds: seen.append(seeds) or draw(x, seeds))
    batch = [p.score for p in second.predict([other, path, other, path])]
    assert alone == second(path).score == batch[1] == batch[3] != pytest.approx(want, abs=1e-6)
    assert batch[0] == batch[2] == first(other).score
    h = {p: models.mask_seed(second.prepare(p)[0].tobytes()) for p in (path, other)}
    assert seen == [[h[other], h[path], h[other], h[path]], [h[path]]] and h[path] != h[other]


def test_find_images_patterns_duplicates_and_output_folder(inputs, tmp_path):
    good = sorted(str(p) for p in (inputs / "nut" / "good").iterdir())
    found = image_files.find_images([str(inputs / "nut" / "good"), good[0], str(inputs / "nut" / "good" / "*.png")])
    assert found == good
    assert image_files.find_images([str(inputs / "**" / "00[01].png")]) == sorted(
        str(p) for p in inputs.glob("**/00[01].png"))
    assert image_files.find_images([str(inputs / "nut")], skip_dir=str(inputs / "nut" / "good")) == [
        str(p) for d in ("cut", "scratch", "stain") for p in sorted((inputs / "nut" / d).iterdir())]
    for bad, message in ((tmp_path / "missing", "not found"), (str(inputs / "*.jpg"), "no images")):
        with pytest.raises(predict.UserError, match=message):
            image_files.find_images([str(bad)])


def test_output_names_follow_the_folders_and_stay_unique():
    paths = ["in/good/000.png", "in/cut/000.png", "in/good/003.png", "in/a.png", "in/a.jpg", "in/A.bmp"]
    assert predict.output_names(paths) == ["good_000", "cut_000", "good_003", "a_png", "a_jpg", "A_bmp"]
    assert predict.output_names(["x/B.png", "x/b.png"]) == ["B_png", "b_png_2"]  # case-insensitive file systems
    assert predict.output_names(["x/one.png"]) == ["one"]


# ----------------------------------------------------------------------------------------------- pictures

def test_colour_scale_is_fixed_not_per_image():
    lo, hi = 0.2, 0.6
    a = np.array([[0.1, 0.2, 0.4, 0.6, 0.9]])
    b = np.array([[0.4, 0.4, 0.41, 0.39, 0.4]])  # a flat map: min-max scaling would paint it red and blue
    ca, cb = colorize(a, (lo, hi)), colorize(b, (lo, hi))
    np.testing.assert_array_equal(ca[0, 2], cb[0, 0])  # same value, same colour
    np.testing.assert_array_equal(ca[0, 0], ca[0, 1])  # below the scale: its bottom colour
    assert ca[0, 0, 2] > 100 and ca[0, 0, 0] == 0 and ca[0, 4, 0] > 100 and ca[0, 4, 2] == 0  # blue .. red


def test_overlay_keeps_the_geometry_and_hatches_the_unseen_border():
    h, w = 300, 400
    rgb = np.full((h, w, 3), 100, np.uint8)
    amap = np.zeros((h, w), np.float32)
    seen = np.zeros((h, w), bool)
    seen[20:280, 30:370] = True
    amap[~seen] = np.nan
    pic = overlay_picture(rgb, amap, seen, np.zeros((h, w), bool), (0.0, 1.0), "normal", False)
    assert pic.shape[0] > h and pic.shape[1] > w
    inside = (0.5 * rgb[0, 0] + 0.5 * colorize(np.zeros((1, 1)), (0.0, 1.0))[0, 0]).astype(np.uint8)
    assert (pic[20:280, 30:370] == inside).all()
    assert not (pic[:20, :w] == inside).all(axis=-1).any() and len(np.unique(pic[:20, :w].reshape(-1, 3), axis=0)) == 2


def test_evaluation_writes_curves_gallery_and_heatmaps(run):
    for name in ("weave", "nut"):
        for path in (run / "curves" / f"{name}.png", run / "gallery" / f"{name}.png"):
            with Image.open(path) as im:
                assert im.width > 300 and im.height > 300
        (heatmap,) = (run / "heatmaps" / name).iterdir()
        with Image.open(heatmap) as im:
            assert im.width > 3 * 256 and im.height > 256


# ----------------------------------------------------------------------------------------------- export.py

@pytest.mark.parametrize("which", ["dinomaly", "crr"])
def test_onnx_export_matches_pytorch(which, run, crr_run, tmp_path):
    import onnx
    import onnxruntime
    folder = run if which == "dinomaly" else crr_run
    path = tmp_path / "model.onnx"
    assert call(cli.export_main, ["--checkpoint", folder, "--out", path]) == 0
    model = checkpoints.load_model(str(folder / "model.pth"), encoder=TINY).eval()  # masking off, as exported
    segnet = checkpoints.load_segmentation_net(str(folder / "Seg_model_last.pth"), 32).eval() if which == "crr" else None
    x = torch.rand(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(ds.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(ds.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        want_map, want_score, features = AnomalyMapper(model, segnet)((x - mean) / std, features=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {"image": x.numpy()})))
    assert got["anomaly_map"].shape == (3, 1, 256, 256) and got["score"].shape == (3,)
    np.testing.assert_allclose(got["anomaly_map"], want_map.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["score"], want_score.numpy(), atol=1e-4, rtol=0)
    proto = onnx.load(str(path))
    declared = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    if which == "dinomaly":  # the run's class prototypes: the graph finds the class as predict.py does
        assert declared == {"anomaly_map": ["batch", 1, 256, 256], "score": ["batch"], "class_index": ["batch"],
                            "class_distance": ["batch"], "class_distances": ["batch", 2]}
        prototypes = class_finder.load(str(run / class_finder.FILE))
        matches = class_finder.classify(prototypes, features)
        assert meta["classes"] == prototypes["classes"] and meta["class_far"] == class_finder.FAR
        assert [meta["classes"][i] for i in got["class_index"]] == [m.class_name for m in matches]
        np.testing.assert_allclose(got["class_distance"], [m.distance for m in matches], atol=1e-5, rtol=0)
        found = class_finder.matches(dict(classes=meta["classes"], radius=meta["class_radius"]),
                                     got["class_distances"])
        assert [m.confidence for m in found] == pytest.approx([m.confidence for m in matches], abs=1e-5)
        np.testing.assert_allclose(meta["class_radius"], prototypes["radius"].numpy(), rtol=1e-6)
    else:  # no class_prototypes.pt: the map and the score only
        assert declared == {"anomaly_map": ["batch", 1, 256, 256], "score": ["batch"]}
    assert meta["crop_size"] == CROP and meta["image_size"] == SIZE
    if which == "dinomaly":
        calibration = json.loads((run / "thresholds.json").read_text())
        assert meta["threshold"] == calibration["all"]["image"]["threshold"]
        assert len(meta["class_thresholds"]) == 2 and meta["class_thresholds"] == {
            c: dict(threshold=e["image"]["threshold"], pixel_threshold=e["pixel"]["threshold"],
                    mask_threshold=min(e["image"]["threshold"], e["pixel"]["threshold"]))
            for c, e in calibration["classes"].items()}
    else:
        assert meta["map"] == "fused" and meta["threshold"] is None


def test_thresholds_fitted_with_other_masking_are_flagged(run, crr_run, tmp_path, capsys):
    # CRR thresholds from evaluations with test-time masking on (0.25, the run's), on at another ratio, off, and
    # from before test_mask was recorded (the run's config.json says on). The export (masking off) and a detector
    # with --test_mask off warn where the masking differs; the run's own masking where the ratio differs; and
    # --thresholds stores the given file's thresholds
    data = json.loads((run / "thresholds.json").read_text())
    cases = {"on": dict(test_mask="on", mask_ratio=0.25), "on_0.4": dict(test_mask="on", mask_ratio=0.4),
             "off": dict(test_mask="off", mask_ratio=0.0), "old": {}}
    for name, masking in cases.items():
        data["settings"] = dict(map="fused", fusion_alpha=0.7, max_ratio=0.01, **masking)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        capsys.readouterr()
        if name != "on_0.4":  # the export's masking is off whatever the ratio: "on" is its case
            assert call(cli.export_main, ["--checkpoint", crr_run, "--out", tmp_path / "m.onnx", "--thresholds",
                                          tmp_path / f"{name}.json"]) == 0
            err = capsys.readouterr().err
            assert ("calibrated with test_mask on, these scores use test_mask off: to match" in err) == (name != "off")
        predict.Detector(str(crr_run), thresholds=str(tmp_path / f"{name}.json"), device="cpu")  # masking on
        err = capsys.readouterr().err
        assert ("calibrated with mask_ratio 0.4, these scores use mask_ratio 0.25:" in err) == (name == "on_0.4")
        assert ("calibrated with test_mask off, these scores use test_mask on:" in err) == (name == "off")
    import onnx
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["threshold"] == data["all"]["image"]["threshold"]


def test_export_without_onnxruntime_says_what_to_install(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert call(cli.export_main, ["--checkpoint", run, "--out", tmp_path / "m.onnx"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install -r requirements-export.txt" in line and not (tmp_path / "m.onnx").exists()


def test_inference_does_not_import_the_training_engine():
    code = ("import sys, dinomaly.predict, dinomaly.export; "
            "sys.exit(any(m in sys.modules for m in ('dinomaly.jobs', 'dinomaly.train', 'dinomaly.loss')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
