"""Dataset readers, image loading, transforms, prepare_visa.py and make_demo_data.py (all data made in tmp_path)."""
import json
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from dinomaly import dataset as ds  # noqa: E402
from dinomaly.errors import UserError  # noqa: E402

from prepare_data.make_demo_data import CLASSES as DEMO_CLASSES  # noqa: E402
from prepare_data.make_demo_data import _class_images, make_demo_data
from prepare_data.prepare_visa import prepare_visa  # noqa: E402


def _img(path, size=(20, 16), value=None, rng=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = rng or np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8) if value is None else \
        np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _mask(path, size=(20, 16), values=(255,)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    for k, v in enumerate(values):
        arr[2 + 3 * k: 4 + 3 * k, 3:9] = v
    Image.fromarray(arr).save(path)
    return path


def _mvtec_class(root, cls="toy", with_gt=True, plain_mask_names=False, ext=".png", mask_ext=".png"):
    c = os.path.join(root, cls)
    for n in ("001", "000", "002"):
        _img(os.path.join(c, "train", "good", n + ext))
    _img(os.path.join(c, "test", "good", "b" + ext))
    _img(os.path.join(c, "test", "good", "a" + ext))
    for defect in ("scratch", "crack"):
        for n in ("001", "000"):
            _img(os.path.join(c, "test", defect, n + ext))
            if with_gt:
                mname = (n if plain_mask_names else n + "_mask") + mask_ext
                _mask(os.path.join(c, "ground_truth", defect, mname))
    with open(os.path.join(c, "test", "good", "notes.txt"), "w") as f:
        f.write("not an image")
    return c


# ----------------------------------------------------------------------------------------------------------
# MVTec-layout reader


def test_class_lists():
    assert len(ds.MVTEC_CLASSES) == 15 and ds.MVTEC_CLASSES[0] == "carpet" and ds.MVTEC_CLASSES[-1] == "zipper"
    assert len(ds.VISA_CLASSES) == 12 and len(set(ds.VISA_CLASSES)) == 12
    assert len(ds.REALIAD_CLASSES) == 30 and len(set(ds.REALIAD_CLASSES)) == 30


def test_mvtec_train_and_test(tmp_path):
    root = str(tmp_path / "mv")
    c = _mvtec_class(root)
    train = ds.mvtec_samples(root, "toy", "train")
    assert [os.path.basename(s.image_path) for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.mask_path is None and s.class_name == "toy" for s in train)
    assert train[0].rel_path == "train/good/000.png"

    test = ds.mvtec_samples(root, "toy", "test")
    rels = [s.rel_path for s in test]
    assert rels == ["test/crack/000.png", "test/crack/001.png", "test/good/a.png", "test/good/b.png",
                    "test/scratch/000.png", "test/scratch/001.png"]  # by folder, then file; .txt skipped
    assert [s.label for s in test] == [1, 1, 0, 0, 1, 1]
    for s in test:
        if s.label:
            defect, name = s.rel_path.split("/")[1:]
            assert s.mask_path == os.path.join(c, "ground_truth", defect, name[:-4] + "_mask.png")
        else:
            assert s.mask_path is None


def test_mvtec_plain_mask_names_and_other_extensions(tmp_path):
    root = str(tmp_path / "bt")
    c = _mvtec_class(root, cls="01", plain_mask_names=True, ext=".BMP", mask_ext=".bmp")
    test = ds.mvtec_samples(root, "01", "test")
    bad = [s for s in test if s.label]
    assert len(bad) == 4 and len(test) == 6
    assert bad[0].mask_path == os.path.join(c, "ground_truth", "crack", "000.bmp")


def test_mvtec_btad_ok_folders(tmp_path):
    root = str(tmp_path / "btad")
    c = os.path.join(root, "02")
    _img(os.path.join(c, "train", "ok", "0000.png"))
    _img(os.path.join(c, "test", "ok", "0000.png"))
    _img(os.path.join(c, "test", "ko", "0000.png"))
    _mask(os.path.join(c, "ground_truth", "ko", "0000.png"))
    assert len(ds.mvtec_samples(root, "02", "train")) == 1
    assert [s.label for s in ds.mvtec_samples(root, "02", "test")] == [1, 0]


def test_mvtec_without_ground_truth(tmp_path):
    root = str(tmp_path / "mv")
    _mvtec_class(root, with_gt=False)
    test = ds.mvtec_samples(root, "toy", "test")
    assert sum(s.label for s in test) == 4
    assert all(s.mask_path is None for s in test)


def test_mvtec_missing_mask_names_image(tmp_path):
    root = str(tmp_path / "mv")
    c = _mvtec_class(root)
    os.remove(os.path.join(c, "ground_truth", "scratch", "001_mask.png"))
    with pytest.raises(UserError) as e:
        ds.mvtec_samples(root, "toy", "test")
    msg = str(e.value)
    assert os.path.join(c, "test", "scratch", "001.png") in msg
    assert "001_mask." in msg and os.path.join(c, "ground_truth", "scratch") in msg
    assert "\n" not in msg


def test_mvtec_missing_folders(tmp_path):
    root = str(tmp_path / "mv")
    with pytest.raises(UserError, match="dataset folder not found"):
        ds.mvtec_samples(root, "toy", "train")
    c = _mvtec_class(root)
    with pytest.raises(UserError, match="class folder not found: .*nope; check --data_path and --classes"):
        ds.mvtec_samples(root, "nope", "test")
    for n in os.listdir(os.path.join(c, "train", "good")):
        os.remove(os.path.join(c, "train", "good", n))
    with pytest.raises(UserError, match="no images in .*good"):
        ds.mvtec_samples(root, "toy", "train")
    os.rmdir(os.path.join(c, "train", "good"))
    with pytest.raises(UserError, match="training folder not found: .*good"):
        ds.mvtec_samples(root, "toy", "train")
    with pytest.raises(ValueError):
        ds.mvtec_samples(root, "toy", "val")


def test_visa_1cls_layout(tmp_path):
    root = str(tmp_path / "VisA_pytorch" / "1cls")
    c = os.path.join(root, "candle")
    _img(os.path.join(c, "train", "good", "0001.JPG"))
    _img(os.path.join(c, "test", "good", "0002.JPG"))
    _img(os.path.join(c, "test", "bad", "000.JPG"))
    _mask(os.path.join(c, "ground_truth", "bad", "000.png"))
    test = ds.mvtec_samples(root, "candle", "test")
    assert [(s.label, os.path.basename(s.image_path)) for s in test] == [(1, "000.JPG"), (0, "0002.JPG")]
    assert test[0].mask_path == os.path.join(c, "ground_truth", "bad", "000.png")


# ----------------------------------------------------------------------------------------------------------
# prepare_visa.py


def _raw_visa(raw):
    rng = np.random.default_rng(1)
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        base = os.path.join(raw, obj, "Data")
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _img(os.path.join(raw, rel), rng=rng)
            rows.append(f"{obj},train,normal,{rel},")
        rel = f"{obj}/Data/Images/Normal/0099.JPG"
        _img(os.path.join(raw, rel), rng=rng)
        rows.append(f"{obj},test,normal,{rel},")
        for i in range(2):
            rel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _img(os.path.join(raw, rel), rng=rng)
            _mask(os.path.join(raw, mrel), values=(1, 2, 3))
            rows.append(f"{obj},test,anomaly,{rel},{mrel}")
        assert os.path.isdir(base)
    os.makedirs(os.path.join(raw, "split_csv"))
    with open(os.path.join(raw, "split_csv", "1cls.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def test_prepare_visa(tmp_path):
    raw, out = str(tmp_path / "VisA"), str(tmp_path / "VisA_pytorch")
    _raw_visa(raw)
    counts = prepare_visa(raw, out, progress=False)
    assert counts == {"train": 6, "test_good": 2, "test_bad": 4}
    c = os.path.join(out, "1cls", "pcb1")
    assert sorted(os.listdir(os.path.join(c, "train", "good"))) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert os.listdir(os.path.join(c, "test", "good")) == ["0099.JPG"]
    assert sorted(os.listdir(os.path.join(c, "test", "bad"))) == ["000.JPG", "001.JPG"]
    assert sorted(os.listdir(os.path.join(c, "ground_truth", "bad"))) == ["000.png", "001.png"]
    with open(os.path.join(raw, "pcb1/Data/Images/Anomaly/001.JPG"), "rb") as a, \
            open(os.path.join(c, "test", "bad", "001.JPG"), "rb") as b:
        assert a.read() == b.read()  # copied as-is
    m = np.asarray(Image.open(os.path.join(c, "ground_truth", "bad", "000.png")))
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255} and (m == 255).sum() == 3 * 2 * 6
    # readable by the MVTec-layout reader
    test = ds.mvtec_samples(os.path.join(out, "1cls"), "pcb1", "test")
    assert [s.label for s in test] == [1, 1, 0] and test[0].mask_path.endswith("000.png")
    assert len(ds.mvtec_samples(os.path.join(out, "1cls"), "candle", "train")) == 3


def test_prepare_visa_cli_missing_csv(tmp_path):
    raw = tmp_path / "VisA"
    raw.mkdir()
    script = os.path.join(REPO, "prepare_data", "prepare_visa.py")
    r = subprocess.run([sys.executable, script, "--data_path", str(raw), "--save_path", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "1cls.csv" in lines[0] and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------
# Real-IAD reader


def _realiad(root, cls="toy", nested=True, json_dir="realiad_jsons", null_mask=True):
    cdir = os.path.join(root, "realiad_1024", cls)
    train = [{"category": cls, "anomaly_class": "OK", "image_path": f"OK/S0001/{cls}_0001_OK_C{v}_1.jpg",
              "mask_path": None} for v in (1, 2)]
    test = [
        {"category": cls, "anomaly_class": "OK", "image_path": f"OK/S0002/{cls}_0002_OK_C1_2.jpg",
         "mask_path": "ignored.png"},
        {"category": cls, "anomaly_class": "AK", "image_path": f"NG/AK/S0003/{cls}_0003_AK_C1_3.jpg",
         "mask_path": f"NG/AK/S0003/{cls}_0003_AK_C1_3.png"},
        {"category": cls, "anomaly_class": "HS", "image_path": f"NG/HS/S0004/{cls}_0004_HS_C1_4.jpg",
         "mask_path": None if null_mask else f"NG/HS/S0004/{cls}_0004_HS_C1_4.png"},
    ]
    for e in train + test:
        _img(os.path.join(cdir, e["image_path"]))
    jdir = os.path.join(root, json_dir, json_dir) if nested else os.path.join(root, json_dir)
    os.makedirs(jdir, exist_ok=True)
    with open(os.path.join(jdir, f"{cls}.json"), "w") as f:
        json.dump({"meta": {"prefix": "", "normal_class": "OK"}, "train": train, "test": test}, f)
    return cdir, os.path.join(jdir, f"{cls}.json")


@pytest.mark.parametrize("nested", [True, False])
def test_realiad_reader(tmp_path, nested):
    root = str(tmp_path / "Real-IAD")
    cdir, _ = _realiad(root, nested=nested)
    train, missing = ds.realiad_samples(root, "toy", "train")
    assert missing == 0 and len(train) == 2 and all(s.label == 0 and s.mask_path is None for s in train)
    assert train[1].image_path == os.path.join(cdir, "OK/S0001/toy_0001_OK_C2_1.jpg")
    assert train[1].rel_path == "OK/S0001/toy_0001_OK_C2_1.jpg"
    test, missing = ds.realiad_samples(root, "toy", "test")
    assert missing == 1
    assert [s.label for s in test] == [0, 1, 1]
    assert test[0].mask_path is None  # a normal sample's mask_path is ignored
    assert test[1].mask_path == os.path.join(cdir, "NG/AK/S0003/toy_0003_AK_C1_3.png")
    assert test[2].mask_path is None


def test_realiad_variant_and_errors(tmp_path):
    root = str(tmp_path / "Real-IAD")
    _, jpath = _realiad(root, json_dir="realiad_jsons_fuiad_0.1", null_mask=False)
    test, missing = ds.realiad_samples(root, "toy", "test", json_dir="realiad_jsons_fuiad_0.1")
    assert missing == 0 and len(test) == 3
    with pytest.raises(UserError) as e:
        ds.realiad_samples(root, "toy", "test")  # the default json_dir does not exist
    assert os.path.join(root, "realiad_jsons", "realiad_jsons", "toy.json") in str(e.value)
    assert os.path.join(root, "realiad_jsons", "toy.json") in str(e.value)
    with pytest.raises(UserError, match="class folder not found"):
        ds.realiad_samples(root, "toy", "test", resolution="realiad_512", json_dir="realiad_jsons_fuiad_0.1")
    with open(jpath, "w") as f:
        f.write('{"meta": {}, "train": [')
    with pytest.raises(UserError, match="malformed split file .*toy.json"):
        ds.realiad_samples(root, "toy", "train", json_dir="realiad_jsons_fuiad_0.1")
    with open(jpath, "w") as f:
        json.dump({"train": [{"anomaly_class": "OK"}]}, f)
    with pytest.raises(UserError, match="malformed split file .*toy.json"):
        ds.realiad_samples(root, "toy", "train", json_dir="realiad_jsons_fuiad_0.1")


def test_attach_foreground(tmp_path):
    """The released code's path: realiad_<res>/<cls>/OK/S0001/x.jpg becomes
    realiad_<res>_DISthresh/<cls>/DISthresh/S0001/x.jpg."""
    root = str(tmp_path / "Real-IAD")
    _realiad(root)
    os.rename(os.path.join(root, "realiad_1024"), os.path.join(root, "realiad_512"))
    train, _ = ds.realiad_samples(root, "toy", "train", resolution="realiad_512")
    fg = os.path.join(root, "realiad_512_DISthresh")
    want = [os.path.join(fg, "toy", "DISthresh", "S0001", f"toy_0001_OK_C{v}_1.jpg") for v in (1, 2)]

    # the default folder is missing: all-ones foreground, and a warning that this deviates from the paper
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("anomaly").addHandler(handler)
    try:
        assert ds.attach_foreground(train) == 0
    finally:
        logging.getLogger("anomaly").removeHandler(handler)
    assert all(s.foreground_path is None for s in train)
    assert len(records) == 1 and fg in records[0].getMessage() and "not released" in records[0].getMessage()

    _mask(want[0])
    with pytest.raises(UserError, match="foreground mask not found: " + re.escape(want[1])) as e:
        ds.attach_foreground(train)  # the folder exists: every mask must too
    assert "\n" not in str(e.value)
    _mask(want[1])
    assert ds.attach_foreground(train) == 2 and [s.foreground_path for s in train] == want

    # --foreground_path DIR replaces <data_path>/realiad_512_DISthresh; it must exist
    other = str(tmp_path / "masks")
    _mask(os.path.join(other, "toy", "DISthresh", "S0001", "toy_0001_OK_C1_1.jpg"))
    _mask(os.path.join(other, "toy", "DISthresh", "S0001", "toy_0001_OK_C2_1.jpg"))
    assert ds.attach_foreground(train, other) == 2
    assert train[1].foreground_path == os.path.join(other, "toy", "DISthresh", "S0001", "toy_0001_OK_C2_1.jpg")
    with pytest.raises(UserError, match="foreground folder not found"):
        ds.attach_foreground(train, str(tmp_path / "nope"))

    # MVTec layout: DIR/<cls>/<rel_path>
    mv = str(tmp_path / "mv")
    _mvtec_class(mv)
    mtrain = ds.mvtec_samples(mv, "toy", "train")
    fg2 = str(tmp_path / "fg2")
    for name in ("000", "001", "002"):
        _mask(os.path.join(fg2, "toy", "train", "good", name + ".png"))
    assert ds.attach_foreground(mtrain, fg2) == 3
    assert mtrain[1].foreground_path == os.path.join(fg2, "toy", "train", "good", "001.png")


# ----------------------------------------------------------------------------------------------------------
# Image loading


def test_load_image_modes(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey).save(tmp_path / "g.png")
    im = ds.load_image(str(tmp_path / "g.png"))
    assert im.mode == "RGB" and im.size == (12, 10)
    assert np.array_equal(np.asarray(im), np.repeat(grey[..., None], 3, 2))

    rgba = np.random.default_rng(0).integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(ds.load_image(str(tmp_path / "a.png"))), rgba[..., :3])

    w = np.array([[0, 257, 65535], [32896, 129, 65535]], dtype=np.uint16)  # x * 255 / 65535, rounded
    Image.fromarray(w).save(tmp_path / "w.png")
    assert Image.open(tmp_path / "w.png").mode.startswith("I")
    out = np.asarray(ds.load_image(str(tmp_path / "w.png")))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], [[0, 1, 255], [128, 1, 255]])


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="cannot read image .*bad.png"):
        ds.load_image(str(tmp_path / "bad.png"))
    _img(str(tmp_path / "ok.png"), size=(64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.png") as e:
        ds.load_image(str(tmp_path / "trunc.png"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="image not found"):
        ds.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="cannot read mask"):
        ds.load_mask(str(tmp_path / "bad.png"))


def test_load_mask_keeps_grey_values_until_after_the_resize(tmp_path):
    T = pytest.importorskip("torchvision.transforms")
    _mask(str(tmp_path / "m.png"), values=(1, 100, 255))
    m = ds.load_mask(str(tmp_path / "m.png"))
    assert m.mode == "L" and sorted(np.unique(np.asarray(m)).tolist()) == [0, 1, 100, 255]
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 1] = 255  # opaque alpha everywhere: must not become a full mask
    la[2:4, 2:4, 0] = 200
    Image.fromarray(la).save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(ds.load_mask(str(tmp_path / "la.png"))), la[..., 0])

    # resized as the file is, binarised later: as the reference gt transform (Resize, CenterCrop, ToTensor)
    rng = np.random.default_rng(4)
    grey = cv2.GaussianBlur(((rng.random((67, 75)) > 0.8) * 255).astype(np.uint8), (0, 0), 1.5)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rng.random((67, 75)) > 0.7).save(tmp_path / "bilevel.png")
    assert Image.open(tmp_path / "bilevel.png").mode == "1"
    gt_tf = T.Compose([T.Resize((32, 32)), T.CenterCrop(28), T.ToTensor()])
    for name in ("grey.png", "bilevel.png", "m.png"):
        ours = ds.mask_to_tensor(ds.resize(ds.load_mask(str(tmp_path / name)), 32), 28)
        assert torch.allclose(ours, gt_tf(Image.open(tmp_path / name)), atol=1e-6), name
    ours = ds.mask_to_tensor(ds.resize(ds.load_mask(str(tmp_path / "grey.png")), 32), 28)
    binarised_first = gt_tf(Image.fromarray(((grey != 0) * 255).astype(np.uint8)))
    assert (ours >= 0.5).sum() < (binarised_first >= 0.5).sum()  # the order matters for the >= 0.5 target


# ----------------------------------------------------------------------------------------------------------
# Transforms


def test_center_crop_box_matches_torchvision_for_odd_margins():
    T = pytest.importorskip("torchvision.transforms")
    ramp = Image.fromarray((np.arange(101)[None, :] + 101 * np.arange(101)[:, None]).astype(np.int32))  # unique
    for crop in (98, 95, 94, 56):  # margins 3, 6, 7, 45: the odd ones round a half
        want = np.asarray(T.CenterCrop(crop)(ramp))
        np.testing.assert_array_equal(np.asarray(ramp.crop(ds.center_crop_box(101, crop))), want)


def test_test_dataset_matches_torchvision(tmp_path):
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(3)
    img_path = _img(str(tmp_path / "x.png"), size=(150, 131), rng=rng)
    m = (rng.random((131, 150)) > 0.7).astype(np.uint8) * 255
    Image.fromarray(m).save(tmp_path / "x_mask.png")
    samples = [ds.Sample(img_path, 1, str(tmp_path / "x_mask.png"), "toy"),
               ds.Sample(img_path, 0, None, "toy"),
               ds.Sample(img_path, 1, None, "toy")]
    d = ds.TestDataset(samples, image_size=112, crop_size=98)
    img, mask, label, has_mask, path = d[0]
    assert img.shape == (3, 98, 98) and mask.shape == (1, 98, 98) and img.dtype == torch.float32
    assert label == 1 and has_mask and path == img_path
    assert 0 <= mask.min() and mask.max() <= 1 and mask.max() > 0.5

    tf = T.Compose([T.Resize((112, 112)), T.CenterCrop(98), T.ToTensor(),
                    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    gt_tf = T.Compose([T.Resize((112, 112)), T.CenterCrop(98), T.ToTensor()])
    ref = tf(Image.open(img_path).convert("RGB"))
    ref_mask = gt_tf(Image.open(tmp_path / "x_mask.png"))
    assert torch.allclose(img, ref, atol=1e-6, rtol=0)
    assert torch.allclose(mask, ref_mask, atol=1e-6, rtol=0)

    img0, mask0, label0, has0, _ = d[1]
    assert label0 == 0 and has0 and mask0.abs().sum() == 0 and torch.equal(img0, img)
    _, mask2, label2, has2, _ = d[2]
    assert label2 == 1 and not has2 and mask2.abs().sum() == 0

    t = ds.TrainDataset(samples[:1], image_size=112, crop_size=98)
    assert len(t) == 1 and torch.equal(t[0], img)


# ----------------------------------------------------------------------------------------------------------
# Demo data


def test_make_demo_data(tmp_path):
    out = str(tmp_path / "demo")
    paths = make_demo_data(out, size=64, seed=0, n_train=3, n_test_good=2, n_test_bad=4)
    for cls in ("weave", "woodgrain", "nut"):
        train = ds.mvtec_samples(paths["mvtec"], cls, "train")
        test = ds.mvtec_samples(paths["mvtec"], cls, "test")
        assert len(train) == 3 and len(test) == 6 and sum(s.label for s in test) == 4
        assert len({s.rel_path.split("/")[1] for s in test if s.label}) >= 3  # several defect kinds
        rtrain, miss_tr = ds.realiad_samples(paths["realiad"], cls, "train")
        rtest, miss_te = ds.realiad_samples(paths["realiad"], cls, "test")
        assert (len(rtrain), len(rtest), miss_tr, miss_te) == (3, 6, 0, 0)
        assert sum(s.label for s in rtest) == 4
        for s in test + rtest:
            im = np.asarray(ds.load_image(s.image_path))
            assert im.shape == (64, 64, 3)
            if s.label:
                m = np.asarray(ds.load_mask(s.mask_path)) > 0
                assert m.sum() >= 10
        assert ds.attach_foreground(rtrain) == 3  # the released code's default folder
        assert all(s.foreground_path.startswith(os.path.join(paths["foreground"], cls, "DISthresh", "S0"))
                   for s in rtrain)
        fgs = [cv2.imread(s.foreground_path, cv2.IMREAD_GRAYSCALE) for s in rtrain]
        assert all(f.shape == (64, 64) and f.max() > 200 for f in fgs)
        if cls == "nut":  # an object: soft edges between background and object
            assert all(((f > 30) & (f < 220)).sum() > 20 and f.min() < 10 for f in fgs)
        with open(os.path.join(paths["realiad"], "realiad_jsons", "realiad_jsons", f"{cls}.json")) as f:
            j = json.load(f)
        assert j["meta"]["normal_class"] == "OK"
        assert {e["anomaly_class"] for e in j["test"]} - {"OK"} <= {"HS", "AK", "ZW", "QS"}
        assert all(e["mask_path"] is None for e in j["train"])

    # deterministic given the seed
    a = np.asarray(Image.open(os.path.join(paths["mvtec"], "nut", "test", "good", "001.png")))
    make_demo_data(out, size=64, seed=0, n_train=3, n_test_good=2, n_test_bad=4)
    b = np.asarray(Image.open(os.path.join(paths["mvtec"], "nut", "test", "good", "001.png")))
    assert np.array_equal(a, b)
    t0 = np.asarray(Image.open(os.path.join(paths["mvtec"], "weave", "train", "good", "000.png")))
    t1 = np.asarray(Image.open(os.path.join(paths["mvtec"], "weave", "train", "good", "001.png")))
    assert not np.array_equal(t0, t1)  # normal images vary


@pytest.mark.parametrize("size", [64, 128])
def test_demo_defects_visible_and_masks_exact(size):
    for ci, cls in enumerate(DEMO_CLASSES):
        kinds = set()
        for split, kind, _, img, mask, fg, clean in _class_images(cls, ci, size, 5, 1, 1, 8, with_clean=True):
            if mask is None:
                continue
            kinds.add(kind)
            m = mask > 0
            assert set(np.unique(mask)) == {0, 255} and m.sum() >= 10
            assert np.array_equal(img[~m], clean[~m])  # nothing changes outside the mask
            diff = np.abs(img.astype(int) - clean.astype(int)).max(axis=2)
            assert diff[m].mean() > 40, (cls, kind)  # clearly visible
            assert (diff[m] > 10).mean() > 0.8, (cls, kind)  # the mask covers changed pixels only
        assert len(kinds) >= 3
