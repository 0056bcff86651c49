"""infer.py on a tiny random model: scores against an independent recomputation, heatmap files, errors."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dataset as ds
import infer
import models
from anomaly_map import gaussian_smooth, reconstruction_map

from conftest import TINY

SIZE, CROP = 64, 56


def top_one_percent(amap: torch.Tensor) -> float:
    values = amap.flatten().sort(descending=True).values
    return values[:655].mean().item()  # int(256 * 256 * 0.01)


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = models.build_model(TINY, "random").eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    paths = [images / "a" / "001.png", images / "b" / "001.png", images / "b" / "002.png", images / "003.png"]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(p)
    (images / "notes.txt").write_text("not an image")
    # the order infer finds them in: sorted files of a folder first, then its sorted subfolders
    ordered = [images / "003.png", images / "a" / "001.png", images / "b" / "001.png", images / "b" / "002.png"]
    return model, images, [str(p) for p in ordered]


def run_infer(argv):
    try:
        infer.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def read_scores(out):
    with open(os.path.join(out, "scores.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image_path", "score"]
    return [r[0] for r in rows[1:]], [float(r[1]) for r in rows[1:]]


def tensor(path):
    return ds.image_to_tensor(ds.resize(ds.load_image(path), SIZE), CROP)[None]


def test_dinomaly_scores_and_heatmaps(setup, tmp_path, capsys):
    model, images, paths = setup
    out = tmp_path / "out"
    code = run_infer(["--checkpoint", tmp_path / "model.pth", "--images", images, "--image_size", SIZE,
                      "--crop_size", CROP, "--device", "cpu", "--out", out, "--batch_size", 3])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    got_paths, got_scores = read_scores(out)
    assert got_paths == paths
    with torch.no_grad():
        for p, s in zip(paths, got_scores):
            en, de = model(tensor(p))
            amap = F.interpolate(reconstruction_map(en, de, CROP), size=256, mode="bilinear", align_corners=False)
            assert s == pytest.approx(top_one_percent(gaussian_smooth(amap)), abs=1e-6)
    for p, s in zip(paths, got_scores):
        assert any(line.startswith(p) and f"{s:.6f}" in line for line in printed)
    assert str(out) in printed[-1]
    pngs = sorted(os.listdir(out))
    assert pngs == sorted(["003.png", "a_001.png", "b_001.png", "002.png", "scores.csv"])
    for name in pngs[:-1]:
        with Image.open(out / name) as im:
            assert im.size == (3 * 256, 256) and im.mode == "RGB"

    # a single file, with config.json beside the checkpoint and the default output folder
    (tmp_path / "config.json").write_text(json.dumps({"encoder": TINY}))
    code = run_infer(["--checkpoint", tmp_path / "model.pth", "--images", paths[1], "--image_size", SIZE,
                      "--crop_size", CROP, "--device", "cpu"])
    assert code == 0
    assert read_scores(tmp_path / "inference") == ([paths[1]], [got_scores[1]])
    assert os.path.isfile(tmp_path / "inference" / "001.png")


def test_crr_fused_scores(setup, tmp_path):
    model, images, paths = setup
    torch.manual_seed(1)
    segnet = models.SegmentationNet(base_width=2 * 32 // 8).eval()
    torch.save(segnet.state_dict(), tmp_path / "Seg_model_7999.pth")
    out = tmp_path / "crr"
    alpha = 0.6
    code = run_infer(["--checkpoint", tmp_path / "model.pth", "--seg_checkpoint", tmp_path / "Seg_model_7999.pth",
                      "--fusion_alpha", alpha, "--images", paths[0], images / "b", "--image_size", SIZE,
                      "--crop_size", CROP, "--device", "cpu", "--out", out, "--test_mask", "off"])
    assert code == 0
    got_paths, got_scores = read_scores(out)
    assert got_paths == [paths[0], paths[2], paths[3]]
    with torch.no_grad():
        for p, s in zip(got_paths, got_scores):
            en, de = model(tensor(p))
            recon = reconstruction_map(en, de, 256)
            seg = torch.softmax(segnet(models.segmentation_input(en, de)), dim=1)[:, 1:]
            fused = alpha * recon + (1 - alpha) * seg
            assert s == pytest.approx(top_one_percent(gaussian_smooth(fused)), abs=1e-6)


@pytest.mark.parametrize("case", ["missing_checkpoint", "empty_folder", "corrupt_image", "missing_path"])
def test_user_errors_exit_2_with_one_line(setup, tmp_path, capsys, case):
    _, images, _ = setup
    checkpoint, target = tmp_path / "model.pth", images
    if case == "missing_checkpoint":
        checkpoint = tmp_path / "nope.pth"
    elif case == "empty_folder":
        target = tmp_path / "empty"
        target.mkdir()
    elif case == "corrupt_image":
        target = tmp_path / "broken.png"
        target.write_bytes(b"not a png")
    else:
        target = tmp_path / "missing"
    code = run_infer(["--checkpoint", checkpoint, "--images", target, "--image_size", SIZE, "--crop_size", CROP,
                      "--device", "cpu", "--out", tmp_path / "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:")
    assert ("nope.pth" if case == "missing_checkpoint" else str(target)) in err[0]
