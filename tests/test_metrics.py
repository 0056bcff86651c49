"""Evaluation helpers and metrics (SPEC section 5) against independent references."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import utils  # noqa: E402
from anomaly_map import gaussian_smooth  # noqa: E402

# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def f1max_reference(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]
    return np.max(2 * precision * recall / (precision + recall + 1e-7))


def aupro_brute(masks, amaps, fpr_limit=0.3, connectivity=2):
    """PRO/FPR at every distinct value (detected = amap >= t), explicit loops, own clipped trapezoid."""
    masks = masks.astype(bool)
    amaps = amaps.astype(np.float64)
    regions = []  # list of (image index, boolean region mask)
    for i, m in enumerate(masks):
        lab = measure.label(m, connectivity=connectivity)
        for r in range(1, lab.max() + 1):
            regions.append((i, lab == r))
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(amaps)[::-1]:
        detected = amaps >= t
        overlaps = [detected[i][region].sum() / region.sum() for i, region in regions]
        pro = sum(overlaps) / len(overlaps)
        fpr = (detected & normal).sum() / normal.sum()
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def aupro_dinomaly_naive(masks, amaps, num_th=200):
    """The reference steps literally: arange thresholds, regionprops per image, filter, normalise, auc."""
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    pros_all, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary_amaps[amaps <= th] = 0
        binary_amaps[amaps > th] = 1
        pros = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pros.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        pros_all.append(np.mean(pros))
        fprs.append(fp_pixels / inverse_masks.sum())
    pros_all, fprs = np.array(pros_all), np.array(fprs)
    keep = fprs < 0.3
    fprs, pros_all = fprs[keep], pros_all[keep]
    return auc(fprs / fprs.max(), pros_all)


def random_masks(rng, n, size, n_blobs):
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(n_blobs):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, y:y + h, x:x + w] = True
    return masks


# ----------------------------------------------------------------------------------------------
# binary_metrics
# ----------------------------------------------------------------------------------------------

def check_binary(labels, scores):
    auroc, ap, f1 = utils.binary_metrics(labels, scores)
    assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1 == pytest.approx(f1max_reference(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_random(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.2
    scores = (rng.random(5000) + 0.6 * labels).astype(np.float32)
    check_binary(labels, scores)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_metrics_many_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(4000) < 0.3
    scores = np.round(rng.random(4000) + 0.4 * labels, 1)
    check_binary(labels, scores)
    # Any shape, integer labels.
    assert utils.binary_metrics(labels.astype(int).reshape(40, 100), scores.reshape(40, 100)) == pytest.approx(
        (roc_auc_score(labels, scores), average_precision_score(labels, scores), f1max_reference(labels, scores)),
        abs=1e-12)


def test_binary_metrics_hand_cases():
    # Perfect ranking.
    assert utils.binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])[:2] == (1.0, 1.0)
    # Everything tied: AUROC 1/2, AP = prevalence, F1 = 2*(1/2)/(3/2) up to the epsilon.
    auroc, ap, f1 = utils.binary_metrics([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    assert auroc == 0.5 and ap == 0.5
    assert f1 == pytest.approx(2 / 3, abs=1e-6)
    # Reversed ranking; the best F1 point is "all positive": P = 1/2, R = 1.
    auroc, ap, f1 = utils.binary_metrics([1, 0], [0.1, 0.9])
    assert auroc == 0.0 and ap == 0.5
    assert f1 == pytest.approx(2 / 3, abs=1e-6)
    for case in ([0, 1, 1, 0, 1], [0.3, 0.3, 0.7, 0.1, 0.2]), ([1, 1, 0], [2.0, 1.0, 1.0]):
        check_binary(*case)


def test_binary_metrics_one_class_is_nan():
    for labels in ([0, 0, 0], [1, 1, 1]):
        assert all(math.isnan(v) for v in utils.binary_metrics(labels, [0.1, 0.5, 0.2]))


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------

def diagonal_pair_case(seed):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 24, 2)
    masks[0] = False
    masks[0, 3:6, 3:6] = True  # two squares touching only at a corner: one 8-connected region
    masks[0, 6:8, 6:8] = True
    masks[0, 15:20, 12:14] = True
    masks[3] = False  # a normal image
    amaps = rng.random(masks.shape) * 0.8 + 0.35 * masks
    return masks, amaps.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_exact_vs_brute_force(seed):
    masks, amaps = diagonal_pair_case(seed)
    ours = utils.aupro_exact(masks, amaps)
    assert ours == pytest.approx(aupro_brute(masks, amaps), abs=1e-9)
    # The diagonal pair matters: 4-connectivity gives a clearly different value.
    assert abs(ours - aupro_brute(masks, amaps, connectivity=1)) > 1e-4


def test_aupro_exact_ties_and_limits():
    rng = np.random.default_rng(5)
    masks, amaps = diagonal_pair_case(5)
    amaps = np.round(amaps, 1)  # heavy ties: diagonal segments in the curve
    for limit in (0.3, 0.05, 1.0):
        assert utils.aupro_exact(masks, amaps, fpr_limit=limit) == pytest.approx(
            aupro_brute(masks, amaps, fpr_limit=limit), abs=1e-9)
    masks = random_masks(rng, 3, 16, 3)
    assert utils.aupro_exact(masks, masks.astype(np.float32) + 0.1) == pytest.approx(1.0, abs=1e-12)


def test_aupro_nan_without_regions_or_normals():
    amaps = np.random.default_rng(0).random((2, 8, 8))
    for masks in (np.zeros((2, 8, 8), bool), np.ones((2, 8, 8), bool)):
        assert math.isnan(utils.aupro_exact(masks, amaps))
        assert math.isnan(utils.aupro_dinomaly(masks, amaps))


@pytest.mark.parametrize("seed,dtype", [(0, np.float32), (1, np.float32), (2, np.float64), (3, np.float32)])
def test_aupro_dinomaly_vs_naive(seed, dtype):
    rng = np.random.default_rng(seed)
    masks, _ = diagonal_pair_case(seed)
    amaps = (rng.random(masks.shape) * 0.8 + 0.3 * masks).astype(dtype)
    amaps[1, :4] = 0.5  # a plateau of tied values
    assert utils.aupro_dinomaly(masks, amaps) == pytest.approx(aupro_dinomaly_naive(masks, amaps), abs=1e-9)
    assert utils.aupro_dinomaly(masks, amaps, num_th=37) == pytest.approx(
        aupro_dinomaly_naive(masks, amaps, num_th=37), abs=1e-9)


def test_aupro_dinomaly_values_on_thresholds():
    # Integer maps 0..200: every threshold equals some pixel values, which must count as not detected.
    rng = np.random.default_rng(4)
    masks, _ = diagonal_pair_case(4)
    amaps = np.clip(rng.integers(0, 160, masks.shape) + 40 * masks, 0, 200).astype(np.float64)
    amaps[0, 0, 0], amaps[0, 0, 1] = 0, 200
    assert utils.aupro_dinomaly(masks, amaps) == pytest.approx(aupro_dinomaly_naive(masks, amaps), abs=1e-9)
    # 10 normal pixels 0..9, so FPR hits exactly 3/10 = 0.3 at threshold 6: that point is left out.
    masks = np.zeros((1, 4, 5), bool)
    masks[0, 2:] = True
    amaps = np.concatenate([np.arange(10), [5, 9, 12, 7, 14, 6, 11, 8, 13, 10]]).reshape(1, 4, 5).astype(float)
    assert np.sum(amaps[~masks] > 6) / 10 == 0.3
    assert utils.aupro_dinomaly(masks, amaps, num_th=14) == pytest.approx(
        aupro_dinomaly_naive(masks, amaps, num_th=14), abs=1e-12)


def test_aupro_dinomaly_close_to_exact_on_smooth_maps():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 6, 64, 3)
    masks[::3] = False
    noise = torch.from_numpy(rng.random((6, 1, 64, 64)).astype(np.float32))
    smooth = gaussian_smooth(gaussian_smooth(noise + 0.6 * torch.from_numpy(masks[:, None]).float()))
    amaps = smooth[:, 0].numpy()
    exact = utils.aupro_exact(masks, amaps)
    assert 0.3 < exact < 0.99  # not a degenerate case
    assert abs(utils.aupro_dinomaly(masks, amaps) - exact) < 0.01


# ----------------------------------------------------------------------------------------------
# class_metrics
# ----------------------------------------------------------------------------------------------

def test_class_metrics():
    rng = np.random.default_rng(0)
    masks, amaps = diagonal_pair_case(0)
    img_labels = masks.reshape(4, -1).any(1)
    img_scores = rng.random(4) + img_labels
    out = utils.class_metrics(img_labels, img_scores, masks[:, None], amaps[:, None], aupro="exact")
    assert list(out) == utils.METRIC_NAMES == ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max",
                                               "AUPRO"]
    assert all(isinstance(v, float) for v in out.values())
    assert out["I-AUROC"] == 1.0 and out["I-AP"] == 1.0
    assert out["P-AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), amaps.ravel()), abs=1e-12)
    assert out["P-AP"] == pytest.approx(average_precision_score(masks.ravel(), amaps.ravel()), abs=1e-12)
    assert out["P-F1max"] == pytest.approx(f1max_reference(masks.ravel(), amaps.ravel()), abs=1e-12)
    assert out["AUPRO"] == pytest.approx(aupro_brute(masks, amaps), abs=1e-9)
    dino = utils.class_metrics(img_labels, img_scores, masks, amaps)
    assert dino["AUPRO"] == pytest.approx(aupro_dinomaly_naive(masks, amaps), abs=1e-9)

    for px_masks in (None, np.zeros_like(masks)):
        out = utils.class_metrics(img_labels, img_scores, px_masks, None if px_masks is None else amaps)
        assert out["I-AUROC"] == pytest.approx(roc_auc_score(img_labels, img_scores))
        assert all(math.isnan(out[k]) for k in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"))
    with pytest.raises(ValueError):
        utils.class_metrics(img_labels, img_scores, masks, amaps, aupro="nope")
