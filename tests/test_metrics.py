"""The metrics against independent references: sklearn, brute force, the Dinomaly reference steps; the streamed,
binned and sharded accumulator against the exact path."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dinomaly import utils  # noqa: E402
from dinomaly.anomaly_map import gaussian_smooth  # noqa: E402

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_dinomaly_pixels_at_the_thresholds(dtype):
    # The thresholds are float64 even for float32 maps; pixels at a threshold rounded to the maps' dtype (above,
    # at or below the float64 value) must be detected exactly when strictly above it.
    rng = np.random.default_rng(7)
    masks, _ = diagonal_pair_case(7)
    amaps = (rng.random(masks.shape) * 0.8 + 0.3 * masks).astype(dtype)
    lo, hi = amaps.min(), amaps.max()
    ths = np.arange(lo, hi, (hi - lo) / 200)
    assert ths.dtype == np.float64
    if dtype == np.float32:
        assert np.any(ths.astype(dtype) > ths) and np.any(ths.astype(dtype) < ths)
    flat = amaps.reshape(-1)
    at = rng.choice(np.setdiff1d(np.arange(flat.size), [flat.argmin(), flat.argmax()]), flat.size // 3, False)
    flat[at] = ths[rng.integers(0, len(ths), at.size)].astype(dtype)
    assert amaps.min() == lo and amaps.max() == hi
    assert utils.aupro_dinomaly(masks, amaps) == pytest.approx(aupro_dinomaly_naive(masks, amaps), abs=1e-12)


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
    out = utils.class_metrics(img_labels, img_scores, masks[:, None], amaps[:, None], aupro="exact", bits=None)
    assert list(out) == utils.METRIC_NAMES == ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max",
                                               "AUPRO"]
    assert all(isinstance(v, float) for v in out.values())
    assert out["I-AUROC"] == 1.0 and out["I-AP"] == 1.0
    check_pixel_metrics(out, masks, amaps, "exact")
    check_pixel_metrics(utils.class_metrics(img_labels, img_scores, masks, amaps, bits=None), masks, amaps,
                        "dinomaly")

    for px_masks in (None, np.zeros_like(masks)):
        out = utils.class_metrics(img_labels, img_scores, px_masks, None if px_masks is None else amaps)
        assert out["I-AUROC"] == pytest.approx(roc_auc_score(img_labels, img_scores))
        assert all(math.isnan(out[k]) for k in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"))
    with pytest.raises(ValueError):
        utils.class_metrics(img_labels, img_scores, masks, amaps, aupro="nope")


def check_pixel_metrics(out, masks, amaps, aupro):
    """Pixel metrics of `out` equal the references on the whole arrays."""
    assert out["P-AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), amaps.ravel()), abs=1e-12)
    assert out["P-AP"] == pytest.approx(average_precision_score(masks.ravel(), amaps.ravel()), abs=1e-12)
    assert out["P-F1max"] == pytest.approx(f1max_reference(masks.ravel(), amaps.ravel()), abs=1e-12)
    reference = aupro_brute(masks, amaps) if aupro == "exact" else aupro_dinomaly_naive(masks, amaps)
    assert out["AUPRO"] == pytest.approx(reference, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# ClassAccumulator
# ----------------------------------------------------------------------------------------------

def small_class(seed, n=9, size=16):
    """labels, scores, maps, masks, has_mask of a small class with ties, a diagonal pair and a normal image."""
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, n, size, 2)
    masks[::3] = False
    masks[1] = False
    masks[1, 3:6, 3:6] = masks[1, 6:8, 6:8] = True  # one 8-connected region
    amaps = (rng.random(masks.shape) * 0.8 + 0.35 * masks).astype(np.float32)
    amaps[2, :3] = 0.5  # a plateau of tied values
    labels = masks.reshape(n, -1).any(1)
    scores = np.round(rng.random(n) + 0.5 * labels, 1)  # tied scores
    return labels, scores, amaps, masks, np.ones(n, bool)


def accumulate(batches, aupro="dinomaly", bits=utils.KEY_BITS):
    acc = utils.ClassAccumulator(aupro, bits)
    for batch in batches:
        acc.add(*batch)
    return acc


def split(arrays, parts):
    """The class `arrays` cut into batches at the index arrays `parts`."""
    return [[a[p] for a in arrays] for p in parts]


@pytest.mark.parametrize("aupro", ["exact", "dinomaly"])
@pytest.mark.parametrize("seed", [0, 1])
def test_accumulator_exact_keys_vs_references(aupro, seed):
    labels, scores, amaps, masks, has_mask = data = small_class(seed)
    batches = split(data, np.array_split(np.arange(len(labels)), [1, 2, 6]))
    out = accumulate(batches, aupro, bits=None).compute()
    assert out["I-AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert out["I-AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["I-F1max"] == pytest.approx(f1max_reference(labels, scores), abs=1e-12)
    check_pixel_metrics(out, masks, amaps, aupro)
    # Torch tensors and [B,1,H,W] maps give the same.
    tensors = [torch.from_numpy(a) for a in (labels, scores, amaps[:, None], masks[:, None], has_mask)]
    assert accumulate([tensors], aupro, bits=None).compute() == out


def truncate(amaps, bits):
    """float32 values moved to the lower edge of their bin of the top `bits` bits (the binned keys' value)."""
    u = amaps.astype(np.float32).view(np.uint32)
    low = np.uint32((1 << (32 - bits)) - 1)
    return np.where(amaps < 0, u | low, u & ~low).view(np.float32)


@pytest.mark.parametrize("bits", [12, 24])
def test_binned_keys_are_exact_on_bin_edges(bits):
    # Binning is exact ranking of the bins' lower edges: every metric but Dinomaly's AUPRO (whose thresholds
    # depend on the values) equals the exact metric of the truncated maps.
    labels, scores, amaps, masks, has_mask = small_class(3, n=12)
    amaps = amaps - 0.4  # negative values too
    amaps[0, 0, :2] = -0.0, 0.0
    truncated = truncate(amaps, bits)
    assert np.unique(truncated).size < np.unique(amaps).size  # bins do merge values
    binned = utils.class_metrics(labels, scores, masks, amaps, aupro="exact", bits=bits)
    exact = utils.class_metrics(labels, scores, masks, truncated, aupro="exact", bits=None)
    assert binned == pytest.approx(exact, abs=1e-12)


def synthetic_arrays(n, size, seed):
    return [np.concatenate(a) for a in zip(*utils.synthetic_class(n, size, seed, batch_size=7))]


@pytest.mark.parametrize("aupro", ["exact", "dinomaly"])
@pytest.mark.parametrize("n,size,seed", [(12, 256, 0), (40, 96, 1)])
def test_default_binning_close_to_exact_on_realistic_maps(aupro, n, size, seed):
    data = synthetic_arrays(n, size, seed)
    assert data[2].dtype == np.float32 and len(np.unique(data[2])) < data[2].size  # smoothing ties
    exact = accumulate([data], aupro, bits=None).compute()
    binned = accumulate(split(data, np.array_split(np.arange(n), 5)), aupro).compute()
    assert 0.5 < exact["P-AP"] < 0.99 and 0.5 < exact["AUPRO"] < 0.99  # not degenerate
    if aupro == "exact":  # the exact path on these maps, against sklearn
        masks, amaps = data[3].ravel(), data[2].ravel()
        assert exact["P-AUROC"] == pytest.approx(roc_auc_score(masks, amaps), abs=1e-12)
        assert exact["P-AP"] == pytest.approx(average_precision_score(masks, amaps), abs=1e-12)
    assert binned == pytest.approx(exact, abs=1e-4)
    assert binned != exact  # the default does bin


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert type(a[k]) is type(b[k]) and a[k] == b[k], k


@pytest.mark.parametrize("bits", [utils.KEY_BITS, None])
def test_shards_merge_to_the_single_process_state(bits):
    data = synthetic_arrays(20, 64, 2)
    n = len(data[0])
    whole = accumulate([data], "exact", bits)
    idx = np.arange(n)
    shardings = [
        [idx[:n // 2], idx[n // 2:]],  # halves
        [idx[::2], idx[1::2]],  # interleaved, as a distributed sampler
        [np.sort(p) for p in np.array_split(np.random.default_rng(0).permutation(n), [3])],  # uneven
        [idx, idx[:0]],  # one rank without images
    ]
    for shards in shardings:
        states = [accumulate(split(data, np.array_split(s, 3)), "exact", bits).state() for s in shards]
        merged = utils.ClassAccumulator.merge(states, aupro="exact")
        states_equal(merged.state(), whole.state())
        assert merged.compute() == whole.compute()
        assert utils.ClassAccumulator.merge(states).compute() == accumulate([data], "dinomaly", bits).compute()


@pytest.mark.parametrize("seed", range(6))
def test_merge_tables_vs_counting(seed):
    """Tables of random sizes and overlaps (keys at both ends, repeated, absent) merge to the per-key sums."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, rng.integers(1, 5))
    elements = [(rng.integers(0, 40, n).astype(np.uint64), rng.integers(0, 2, n).astype(bool),
                 rng.integers(1, 100, n)) for n in sizes]
    tables = [utils._table(k[~p], k[p], w[p]) for k, p, w in elements]
    merged = utils._merge_tables(tables)
    keys, pos, weights = (np.concatenate([e[i] for e in elements]) for i in range(3))
    distinct = np.unique(keys)
    np.testing.assert_array_equal(merged["keys"], distinct)
    for f, counted in (("neg", np.bincount(keys[~pos].astype(int), minlength=40)),
                       ("pos", np.bincount(keys[pos].astype(int), minlength=40)),
                       ("weight", np.bincount(keys[pos].astype(int), weights[pos], minlength=40).astype(int))):
        np.testing.assert_array_equal(merged[f], counted[distinct.astype(int)], err_msg=f)


def test_merge_and_add_refuse_mismatches():
    data = small_class(0)
    with pytest.raises(ValueError):
        utils.ClassAccumulator.merge([accumulate([data]).state(), accumulate([data], bits=20).state()])
    as64 = [a.astype(np.float64) if a.dtype == np.float32 else a for a in data]
    with pytest.raises(ValueError):
        utils.ClassAccumulator.merge([accumulate([data]).state(), accumulate([as64]).state()])
    with pytest.raises(ValueError):
        accumulate([data, as64])
    data[2][0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        accumulate([data])
    for kwargs in ({"aupro": "nope"}, {"bits": 40}):
        with pytest.raises(ValueError):
            utils.ClassAccumulator(**kwargs)


@pytest.mark.parametrize("bits", [utils.KEY_BITS, None])
def test_has_mask_and_nan_rules(bits):
    labels, scores, amaps, masks, has_mask = small_class(1)
    # An anomalous image without pixel ground truth counts for the image metrics only.
    has_mask = has_mask.copy()
    has_mask[2] = False
    out = accumulate([(labels, scores, amaps, masks, has_mask)], "exact", bits).compute()
    pixels = utils.class_metrics(labels, scores, masks[has_mask], amaps[has_mask], "exact", bits)
    images = utils.class_metrics(labels, scores, None, None, "exact", bits)
    assert out == {k: images[k] if k.startswith("I-") else pixels[k] for k in utils.METRIC_NAMES}
    assert out != utils.class_metrics(labels, scores, masks, amaps, "exact", bits)
    # One image class absent: image metrics NaN. No anomalous pixel among the masked images: pixel metrics NaN.
    # Every pixel anomalous: no normal pixel, pixel metrics NaN.
    for aupro in ("exact", "dinomaly"):
        normal_only = accumulate([(np.zeros(9), scores, amaps, masks & False, has_mask)], aupro, bits).compute()
        assert all(math.isnan(v) for v in normal_only.values())
        masks_hidden = accumulate([(labels, scores, amaps, masks, labels == 0)], aupro, bits).compute()
        assert [math.isnan(v) for v in masks_hidden.values()] == [False] * 3 + [True] * 4
        all_anomalous = accumulate([(labels, scores, amaps, masks | True, has_mask)], aupro, bits).compute()
        assert [math.isnan(v) for v in all_anomalous.values()] == [False] * 3 + [True] * 4
    assert all(math.isnan(v) for v in utils.ClassAccumulator().compute().values())


def test_order_key_orders_like_the_values():
    values = np.array([-np.inf, -2.5, -1e-40, -0.0, 0.0, 6e-8, 1e-38, 0.3, 1.0, 2.0, 6e4, np.inf])
    for dtype in (np.float16, np.float32, np.float64):
        v = np.random.default_rng(0).permutation(values.astype(dtype))
        keys = utils.order_key(v)
        assert keys.dtype.itemsize == v.dtype.itemsize and keys.dtype.kind == "u"
        assert np.array_equal(np.less.outer(keys, keys), np.less.outer(v, v))
        assert np.array_equal(np.equal.outer(keys, keys), np.equal.outer(v, v))  # -0.0 == 0.0


def test_synthetic_class():
    a = synthetic_arrays(10, 64, 5)
    b = [np.concatenate(x) for x in zip(*utils.synthetic_class(10, 64, 5, batch_size=4))]
    for x, y in zip(a, b):  # independent of the batch size
        assert np.array_equal(x, y)
    labels, scores, maps, masks, has_mask = a
    assert maps.shape == masks.shape == (10, 64, 64) and maps.dtype == np.float32 and masks.dtype == bool
    assert np.array_equal(labels, masks.any((1, 2))) and has_mask.all() and 0 < labels.sum() < 10
    assert 0 <= maps.min() and maps.max() <= 2
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
