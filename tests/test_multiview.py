"""Dinomaly2's multi-view setting: the readers (Real-IAD grouping, Real-IAD Variety folders, MANTA-Tiny strips), the
object- and sample-level scores against brute force, sharding, and end-to-end runs on generated multi-view data."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from dinomaly import dataset as ds
from dinomaly import cli
from dinomaly.errors import UserError
from dinomaly.multiview import ObjectAccumulator, sample_key

import dinomaly2_multiview
import dinomaly_mvtec_uni
from conftest import ROOT, TINY
from prepare_data.make_demo_data import make_demo_data

ADEVAL_REALIAD = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_")  # ADEval's README


# ----------------------------------------------------------------------------------------------------------
# Object and sample scores against brute force


def f1max(labels, scores):
    """The preview's f1_score_max: max of 2PR/(P+R+1e-7) over sklearn's PR points without the last one."""
    p, r, _ = precision_recall_curve(labels, scores)
    return float((2 * p * r / (p + r + 1e-7))[:-1].max())


def random_class(seed: int, views=(1, 2, 3, 5)):
    """Objects with a random number of views (ragged), random maps [256, 256] and labels, Real-IAD file names."""
    rng = np.random.default_rng(seed)
    samples, maps, labels, scores = [], [], [], []
    for o in range(24):
        anomalous = o % 3 == 0
        for v in range(int(rng.choice(views))):
            name = f"toy_{o:04d}_{'AK' if anomalous else 'OK'}_C{v + 1}_2023.jpg"
            samples.append(ds.Sample(f"/data/toy/S{o:04d}/{name}", 0, None, "toy", object_id=f"S{o:04d}"))
            m = rng.gamma(2.0, 0.05, (256, 256)).astype(np.float32)
            label = int(anomalous and rng.random() < 0.6)
            if label:
                m[rng.integers(0, 200):, rng.integers(0, 200):][:40, :40] += rng.uniform(0.05, 0.5)
            maps.append(m)
            labels.append(label)
            scores.append(np.float32(np.sort(m.ravel())[::-1][:655].mean()))
    return samples, np.stack(maps), np.array(labels), np.array(scores)


def brute_force(samples, maps, labels, scores, max_ratio):
    objects = sorted({s.object_id for s in samples})
    o_labels, o_scores = [], []
    for o in objects:
        idx = [i for i, s in enumerate(samples) if s.object_id == o]
        values = np.sort(maps[idx].ravel())[::-1]  # all the object's views together
        k = int(len(idx) * 65536 * max_ratio) if max_ratio else 1
        o_scores.append(values[:k].astype(np.float64).mean())
        o_labels.append(labels[idx].max())
    keys = {}
    for s, lab, sc in zip(samples, labels, scores):
        key = ADEVAL_REALIAD.search(s.image_path).group(1)
        old = keys.get(key, (-np.inf, 0))
        keys[key] = (max(old[0], sc), max(old[1], lab))
    s_scores, s_labels = zip(*keys.values())
    return {"O-AUROC": roc_auc_score(o_labels, o_scores), "O-AP": average_precision_score(o_labels, o_scores),
            "O-F1max": f1max(o_labels, o_scores), "S-AUROC": roc_auc_score(s_labels, s_scores)}


@pytest.mark.parametrize("max_ratio", [0.01, 0.0, 0.003])
def test_object_and_sample_scores_against_brute_force(max_ratio):
    samples, maps, labels, scores = random_class(max_ratio == 0.0)
    acc = ObjectAccumulator(samples, max_ratio, 256 * 256, "toy")
    order = np.random.default_rng(1).permutation(len(samples))  # any order, any batches
    for batch in np.array_split(order, 7):
        acc.add(batch.tolist(), labels[batch], maps[batch], scores[batch])
    got, want = acc.compute(), brute_force(samples, maps, labels, scores, max_ratio)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    # the object scores themselves
    objects, o_labels, o_scores = acc.object_scores()
    first = [i for i, s in enumerate(samples) if s.object_id == objects[0]]
    k = int(len(first) * 65536 * max_ratio) if max_ratio else 1
    assert o_scores[0] == pytest.approx(np.sort(maps[first].ravel())[::-1][:k].mean(dtype=np.float64), rel=1e-12)


def test_sharded_states_merge_to_the_single_process_metrics():
    samples, maps, labels, scores = random_class(3)
    single = ObjectAccumulator(samples, 0.01, 256 * 256, "toy")
    single.add(list(range(len(samples))), labels, maps, scores)
    shards = []
    for rank in range(3):  # images rank, rank + 3, ...: an object's views spread over the processes
        acc = ObjectAccumulator(samples, 0.01, 256 * 256, "toy")
        idx = list(range(rank, len(samples), 3))
        for part in np.array_split(idx, 2):
            acc.add(part.tolist(), labels[part], maps[part], scores[part])
        shards.append(acc.state())
    merged = ObjectAccumulator.merge(shards)
    assert merged.compute() == single.compute()
    np.testing.assert_array_equal(merged.object_scores()[2], single.object_scores()[2])
    with pytest.raises(ValueError, match="not fed all their views"):
        ObjectAccumulator.merge(shards[:2]).compute()


def test_sample_key_is_adevals_on_real_iad_names():
    for name in ("audiojack_0001_OK_C1_20231021130209.jpg", "u_block_0123_AK_QS_C5_20231102.jpg",
                 "transistor1_0042_HS_C3_1.png"):
        assert sample_key(f"/x/realiad_1024/c/NG/AK/S0001/{name}") == ADEVAL_REALIAD.search(name).group(1)
    assert sample_key("/x/demo/nut/test/good/000_view2.png") is None


def test_without_real_iad_file_names_s_auroc_is_nan():
    samples, maps, labels, scores = random_class(4)
    for i, s in enumerate(samples):
        s.image_path = f"/manta/test/good/{i:03d}.png"
    acc = ObjectAccumulator(samples, 0.01, 256 * 256)
    acc.add(list(range(len(samples))), labels, maps, scores)
    m = acc.compute()
    assert np.isnan(m["S-AUROC"]) and not np.isnan(m["O-AUROC"])


# ----------------------------------------------------------------------------------------------------------
# Readers


def write_realiad(root, cls="toy", json_dir="realiadvariety_jsons", images="realiadvariety_raw", nested=False):
    """A Real-IAD-format class whose JSON lists views out of object order, with an NG view without a mask and
    objects of 2 and 3 views."""
    cdir = os.path.join(root, images, cls, *([cls] if nested else []))
    entries = [("OK/S0002/toy_0002_OK_C1_1.jpg", "OK", None), ("NG/AK/S0001/toy_0001_AK_C2_1.jpg", "AK", None),
               ("OK/S0002/toy_0002_OK_C2_1.jpg", "OK", None),
               ("NG/AK/S0001/toy_0001_AK_C1_1.jpg", "AK", "NG/AK/S0001/toy_0001_AK_C1_1.png"),
               ("NG/AK/S0001/toy_0001_AK_C3_1.jpg", "AK", None)]
    test = []
    for path, cl, mask in entries:
        os.makedirs(os.path.dirname(os.path.join(cdir, path)), exist_ok=True)
        Image.new("RGB", (16, 16)).save(os.path.join(cdir, path))
        if mask:
            Image.new("L", (16, 16), 255).save(os.path.join(cdir, mask))
        test.append({"image_path": path, "anomaly_class": cl, "mask_path": mask})
    train = "OK/S0009/toy_0009_OK_C1_1.jpg"  # an image of its own: a split lists each image once
    os.makedirs(os.path.dirname(os.path.join(cdir, train)), exist_ok=True)
    Image.new("RGB", (16, 16)).save(os.path.join(cdir, train))
    os.makedirs(os.path.join(root, json_dir), exist_ok=True)
    with open(os.path.join(root, json_dir, f"{cls}.json"), "w") as f:
        json.dump({"meta": {"normal_class": "OK"}, "train": [{"image_path": train, "anomaly_class": "OK",
                                                              "mask_path": None}], "test": test}, f)
    return cdir


@pytest.mark.parametrize("nested", [False, True])
def test_realiad_views_grouped_as_the_preview(tmp_path, nested):
    root = str(tmp_path)
    cdir = write_realiad(root, nested=nested)
    samples, missing = ds.class_samples("realiad_variety", root, "toy", "test", multiview=True)
    # objects sorted by their key (folder parts joined), views in JSON order
    assert [(s.object_id, os.path.basename(s.image_path)) for s in samples] == [
        ("NGAKS0001", "toy_0001_AK_C2_1.jpg"), ("NGAKS0001", "toy_0001_AK_C1_1.jpg"),
        ("NGAKS0001", "toy_0001_AK_C3_1.jpg"), ("OKS0002", "toy_0002_OK_C1_1.jpg"), ("OKS0002", "toy_0002_OK_C2_1.jpg")]
    assert all(s.image_path.startswith(cdir + os.sep) for s in samples)
    # an NG view without a mask is normal (the preview's label); its object is anomalous through C1
    assert [s.label for s in samples] == [0, 1, 0, 0, 0] and missing == 2
    # 2D reading (views as independent images): the same views, NG ones anomalous, in JSON order
    flat, missing = ds.class_samples("realiad_variety", root, "toy", "test")
    assert [s.label for s in flat] == [0, 1, 0, 1, 1] and missing == 2 and flat[0].object_id is None


def test_realiad_variety_folders(tmp_path):
    root = str(tmp_path)
    write_realiad(root, images="realiadvariety_raw")
    assert ds.realiad_folders("realiad_variety", root) == ("realiadvariety_raw", "realiadvariety_jsons")
    os.makedirs(os.path.join(root, "realiadvariety_1024"))  # the README's downsampled copy wins when present
    assert ds.realiad_folders("realiad_variety", root) == ("realiadvariety_1024", "realiadvariety_jsons")
    assert ds.realiad_folders("realiad_variety", root, "realiadvariety_raw", "j") == ("realiadvariety_raw", "j")
    assert ds.realiad_folders("realiad", root) == ("realiad_1024", "realiad_jsons")
    with pytest.raises(UserError, match="realiadvariety_1024/toy.*--realiad_resolution"):
        ds.class_samples("realiad_variety", root, "toy", "test")
    assert len(ds.class_samples("realiad_variety", root, "toy", "test", "realiadvariety_raw")[0]) == 5
    with pytest.raises(UserError, match="--multiview on needs a multi-view dataset"):
        ds.class_samples("mvtec", root, "toy", "test", multiview=True)


def test_class_lists():
    assert len(ds.REALIAD_VARIETY_CLASSES) == 160 and ds.REALIAD_VARIETY_CLASSES == sorted(ds.REALIAD_VARIETY_CLASSES)
    assert len(ds.MANTA_CLASSES) == 38 and len(set(ds.MANTA_CLASSES)) == 38
    assert all(c.count("/") == 1 for c in ds.MANTA_CLASSES)
    assert {"realiad_variety", "manta"} <= set(ds.DATASETS)


def write_manta(root, width=1300):
    """One MANTA class: a training image and a defective test image whose strips are coloured 10, 20, ..., with
    a full-intensity defect in view 2 and a faint one (128) in view 4."""
    cdir = os.path.join(root, "dom", "cls")
    strips = np.zeros((256, width, 3), np.uint8)
    for v in range(5):
        strips[:, 256 * v:] = 10 * (v + 1)
    mask = np.zeros((256, width), np.uint8)
    mask[100:140, 256 + 50:256 + 90] = 255
    mask[100:140, 3 * 256 + 50:3 * 256 + 90] = 128
    for folder, arr in (("train/good/000.png", strips), ("test/bad/000.png", strips),
                        ("ground_truth/bad/000_mask.png", mask)):
        os.makedirs(os.path.dirname(os.path.join(cdir, folder)), exist_ok=True)
        Image.fromarray(arr).save(os.path.join(cdir, folder))
    return cdir


def test_manta_strips_and_labels(tmp_path):
    root = str(tmp_path)
    write_manta(root)
    samples, _ = ds.class_samples("manta", root, "dom/cls", "test", multiview=True)
    assert [s.strip for s in samples] == [0, 1, 2, 3, 4] and len({s.object_id for s in samples}) == 1
    test = ds.TestDataset(samples, image_size=64, crop_size=56)
    items = [test[i] for i in range(5)]
    # each view is its strip of the image (the last takes the remaining 276 px), transformed like any image
    full = Image.open(samples[0].image_path)
    for v, (img, mask, label, has_mask, path) in enumerate(items):
        right = 1300 if v == 4 else 256 * (v + 1)
        assert img.equal(ds.transform(full.crop((256 * v, 0, right, 256)), 64, 56))
        assert path.endswith(f"000_view{v + 1}.png") and has_mask
    # label: the transformed mask strip reaches 1 (the preview's int() of its maximum): the faint defect of view 4
    # stays in the pixel ground truth but does not make the view anomalous
    assert [it[2] for it in items] == [0, 1, 0, 0, 0]
    assert items[3][1].max() == pytest.approx(128 / 255) and items[1][1].max() == 1
    # training: one strip of each image per item, drawn from (seed, epoch, index)
    train = ds.StripTrainDataset(ds.class_samples("manta", root, "dom/cls", "train")[0], 64, 56, seed=1)
    strips = [ds.transform(full.crop((256 * v, 0, 1300 if v == 4 else 256 * (v + 1), 256)), 64, 56) for v in range(5)]
    drawn = []
    for epoch in range(12):
        x = train[(epoch, 0)]
        drawn.append(next(v for v in range(5) if x.equal(strips[v])))
        assert train[(epoch, 0)].equal(x)
    assert len(set(drawn)) > 2


def test_manta_image_too_narrow(tmp_path):
    write_manta(str(tmp_path), width=1024)
    samples, _ = ds.class_samples("manta", str(tmp_path), "dom/cls", "test")
    with pytest.raises(UserError, match="1024 px wide, but a MANTA image holds 5 views"):
        ds.TestDataset(samples, 64, 56)[4]


def test_crr_training_refuses_manta():
    from dinomaly.options import DataOptions
    from dinomaly.training_data import synthetic_train_set
    with pytest.raises(UserError, match="MANTA-Tiny's five-view images"):
        synthetic_train_set(DataOptions(dataset="manta"), 1, 64, 56)


# ----------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def mv_demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("mv")), size=64, seed=0, n_train=8, n_test_good=4,
                          n_test_bad=3, views=3, manta=True)


SMALL = ["--encoder_weights", "random", "--image_size", "64", "--crop_size", "56", "--num_workers", "0",
         "--device", "cpu"]


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def mv_run(mv_demo, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("mv_runs")
    with pytest.MonkeyPatch.context() as mp:
        from dinomaly import models
        mp.setitem(models.ENCODERS, TINY, __import__("conftest").TINY_CFG)
        cli.run_script(dinomaly_mvtec_uni,
                       ["--dataset", "realiad", "--data_path", mv_demo["realiad"], "--classes", "weave", "nut",
                        "--multiview", "on", "--encoder", TINY, "--total_iters", "2", "--batch_size", "4",
                        "--save_dir", str(save_dir), "--save_name", "run", *SMALL])
    return save_dir / "run"


def test_realiad_multiview_end_to_end(mv_run):
    rows = read_csv(mv_run / "metrics.csv")
    assert rows[0][-5:] == ["mAD", "O-AUROC", "O-AP", "O-F1max", "S-AUROC"]
    assert [r[0] for r in rows[1:]] == ["weave", "nut", "mean"] and all(c != "" for r in rows[1:] for c in r)
    log_text = (mv_run / "log.txt").read_text()
    assert "O-AUROC" in log_text and "they count as normal views" in log_text
    assert "objects have 1 to 3 views" in log_text  # 4 normal test images: objects of 3 and 1 views
    # S-AUROC from the view scores (scores.csv): the max per Real-IAD sample, labels the max of the views'
    scores = read_csv(mv_run / "scores.csv")[1:]
    for row in rows[1:3]:
        samples = {}
        for cls, path, label, score in scores:
            if cls == row[0]:
                key = ADEVAL_REALIAD.search(path).group(1)
                old = samples.get(key, (-np.inf, 0))
                samples[key] = (max(old[0], float(score)), max(old[1], int(label)))
        s, y = zip(*samples.values())
        assert float(row[-1]) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert sum(int(r[2]) for r in scores if r[0] == row[0]) == 3  # one anomalous view per NG object


def test_manta_end_to_end_with_dinomaly2(mv_demo, tmp_path):
    """Dinomaly2's multi-view script on MANTA: trained on one view strip per image, evaluated per view and object."""
    cli.run_script(dinomaly2_multiview,
                   ["--dataset", "manta", "--data_path", mv_demo["manta"], "--classes", "demo/weave", "demo/nut",
                    "--multiview", "on", "--encoder", TINY, "--total_iters", "2", "--batch_size", "4",
                    "--save_dir", str(tmp_path), "--save_name", "manta", *SMALL])
    log_text = (tmp_path / "manta" / "log.txt").read_text()
    assert "train images: 4" in log_text  # two five-view images per class (8 normal training images, 5 per image)
    rows = read_csv(tmp_path / "manta" / "metrics.csv")
    assert rows[0][-4:] == ["O-AUROC", "O-AP", "O-F1max", "S-AUROC"]
    assert all(r[-1] == "" and r[-4] != "" for r in rows[1:])  # no Real-IAD file names: no sample level
    scores = read_csv(tmp_path / "manta" / "scores.csv")[1:]
    assert len(scores) == 2 * 5 * (1 + 3) and scores[0][1].endswith("_view1.png")


def test_torchrun_two_processes_equal_one(mv_demo, tmp_path):
    """The sharded evaluation (images rank, rank + 2, ...: an object's views on both processes) gives the metrics
    of one process (this one), object and sample level included."""
    common = ["--dataset", "realiad", "--data_path", mv_demo["realiad"], "--classes", "weave", "nut", "--multiview",
              "on", "--save_dir", str(tmp_path), "--num_workers", "0", "--device", "cpu"]
    # torchrun runs the script through tests/signal_run.py (no signal): the tiny encoder in each process
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        os.path.join("tests", "signal_run.py"), "none", "0", "dinomaly_mvtec_uni.py", *common,
                        "--save_name", "ddp", *SMALL, "--encoder", TINY, "--total_iters", "2", "--batch_size", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cli.run_script(dinomaly_mvtec_uni, [*common, "--save_name", "single", "--eval_only", "--checkpoint",
                                        str(tmp_path / "ddp"), "--batch_size", "5"])
    assert "evaluation shared by 2 processes" in (tmp_path / "ddp" / "log.txt").read_text()
    sharded, single = read_csv(tmp_path / "ddp" / "metrics.csv"), read_csv(tmp_path / "single" / "metrics.csv")
    assert sharded[0] == single[0] and sharded[0][-1] == "S-AUROC"
    np.testing.assert_allclose([float(c) for r in sharded[1:] for c in r[1:]],
                               [float(c) for r in single[1:] for c in r[1:]], atol=1e-6)
