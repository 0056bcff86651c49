"""The evaluation metrics: image and pixel AUROC, AP, F1max, both AUPRO variants, mAD, the metrics table."""

import csv
import math

import numpy as np
from skimage import measure

METRIC_NAMES = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]


# ----------------------------------------------------------------------------------------------
# Metrics (numpy)
# ----------------------------------------------------------------------------------------------

def _tie_groups(scores: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort 1-D scores descending: (order, flags in that order, index of the last element of each run of
    equal scores). A threshold at a run's value selects everything up to its last element."""
    order = np.argsort(scores)[::-1]
    s = scores[order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    return order, flags[order], ends


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1max) of scores against binary labels (any shape); NaN when one class is absent."""
    y = np.asarray(labels).ravel().astype(bool, copy=False)
    s = np.asarray(scores).ravel()
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan, math.nan
    y_sorted, ends = _tie_groups(s, y)[1:]
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]  # [G] positives with score >= each distinct value
    del y_sorted
    k = ends + 1  # [G] selected count
    dtp = np.diff(tps, prepend=0)
    # AUROC: trapezoids of the ROC curve in integers (exact Mann-Whitney, ties count half).
    dfp = np.diff(k - tps, prepend=0)
    auroc = float(np.dot(dfp, tps + (tps - dtp))) / (2 * n_pos * n_neg)
    # AP: precision summed over recall increments.
    precision = tps / k
    ap = float(np.dot(dtp, precision)) / n_pos
    # F1max over the PR points (the final P=1, R=0 point is not one of them).
    recall = tps / n_pos
    den = precision + recall
    den += 1e-7
    f1 = np.multiply(precision, recall, out=precision)  # in place: 2PR / (P + R + 1e-7)
    f1 *= 2
    f1 /= den
    return auroc, ap, float(f1.max())


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Global ids of the 8-connected anomalous regions of every image: (int32 [N,H,W], 0 = normal; count)."""
    regions = np.zeros(masks.shape, np.int32)
    count = 0
    for i, m in enumerate(masks):
        lab = measure.label(m, connectivity=2)
        regions[i] = np.where(lab > 0, lab + count, 0)
        count += int(lab.max())
    return regions, count


def aupro_exact(masks: np.ndarray, amaps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO-vs-FPR curve up to fpr_limit (MVTec definition, every distinct value
    a threshold, interpolated at the limit). masks bool [N,H,W], amaps float [N,H,W]."""
    masks = np.asarray(masks, dtype=bool)
    regions, n_regions = _label_regions(masks)
    n_normal = masks.size - int(np.count_nonzero(masks))
    if n_regions == 0 or n_normal == 0:
        return math.nan
    inv_area = np.zeros(n_regions + 1)  # [R+1] 1/area per region id (0 for normal pixels)
    inv_area[1:] = 1 / np.bincount(regions.ravel(), minlength=n_regions + 1)[1:]
    order, anom_sorted, ends = _tie_groups(np.asarray(amaps).ravel(), masks.ravel())
    n_anom = np.cumsum(anom_sorted, dtype=np.int64)[ends]  # [G] anomalous pixels >= each distinct value
    # Running sum of 1/area over the anomalous pixels in descending-value order, 0 first.
    weights = inv_area[regions.ravel()[order[anom_sorted]]]
    del order, anom_sorted, regions
    overlap = np.concatenate(([0.0], np.cumsum(weights)))
    pro = np.concatenate(([0.0], overlap[n_anom] / n_regions))
    fpr = np.concatenate(([0.0], (ends + 1 - n_anom) / n_normal))
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= fpr_limit
    x, y = fpr[:i], pro[:i]
    if x[-1] < fpr_limit:  # cut the next segment at the limit
        y_lim = y[-1] + (fpr_limit - x[-1]) * (pro[i] - y[-1]) / (fpr[i] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x) / fpr_limit)


def aupro_dinomaly(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """Dinomaly's AUPRO: thresholds arange(min, max, (max-min)/num_th), detected = amap > th, points with
    FPR < 0.3, FPR divided by its largest kept value, trapezoid. masks bool [N,H,W], amaps float [N,H,W]."""
    masks = np.asarray(masks, dtype=bool)
    amaps = np.asarray(amaps)
    regions, n_regions = _label_regions(masks)
    n_normal = masks.size - int(np.count_nonzero(masks))
    lo, hi = amaps.min(), amaps.max()
    if n_regions == 0 or n_normal == 0 or lo == hi:
        return math.nan
    ths = np.arange(lo, hi, (hi - lo) / num_th)  # [T], in the maps' dtype as in the reference
    n_bins = len(ths) + 1
    # k = number of thresholds strictly below a value: the pixel is detected at ths[:k].
    k_anom = np.searchsorted(ths, amaps[masks])
    hist = np.bincount((regions[masks] - 1).astype(np.int64) * n_bins + k_anom,
                       minlength=n_regions * n_bins).reshape(n_regions, n_bins)  # [R,T+1]
    detected = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [R,T] pixels with k > j
    pro = (detected / hist.sum(axis=1, keepdims=True)).mean(axis=0)  # [T]
    fp_hist = sum(np.bincount(np.searchsorted(ths, a[~m]), minlength=n_bins) for a, m in zip(amaps, masks))
    fpr = np.cumsum(fp_hist[::-1])[::-1][1:] / n_normal  # [T]
    keep = fpr < 0.3
    if np.count_nonzero(keep) < 2 or fpr[keep].max() == 0:
        return math.nan
    fpr, pro = fpr[keep], pro[keep]
    # FPR falls as the threshold rises; the area is the trapezoid's magnitude, as sklearn.metrics.auc.
    return float(abs(np.trapezoid(pro, fpr / fpr.max())))


def class_metrics(img_labels: np.ndarray, img_scores: np.ndarray, px_masks: np.ndarray | None = None,
                  px_maps: np.ndarray | None = None, aupro: str = "dinomaly") -> dict[str, float]:
    """The seven metrics of one class (fractions): image labels/scores [N], pixel masks/maps [N,H,W] or
    [N,1,H,W]. Pixel metrics are NaN without masks or without any anomalous pixel."""
    i_auroc, i_ap, i_f1 = binary_metrics(img_labels, img_scores)
    p_auroc = p_ap = p_f1 = pro = math.nan
    if px_masks is not None and np.any(px_masks):
        masks = np.asarray(px_masks, dtype=bool)
        masks = masks.reshape(-1, *masks.shape[-2:])
        maps = np.asarray(px_maps).reshape(masks.shape)
        p_auroc, p_ap, p_f1 = binary_metrics(masks, maps)
        if aupro == "dinomaly":
            pro = aupro_dinomaly(masks, maps)
        elif aupro == "exact":
            pro = aupro_exact(masks, maps)
        else:
            raise ValueError(f"unknown AUPRO variant {aupro!r} (expected 'dinomaly' or 'exact')")
    return dict(zip(METRIC_NAMES, [i_auroc, i_ap, i_f1, p_auroc, p_ap, p_f1, pro]))


# ----------------------------------------------------------------------------------------------
# The metrics table
# ----------------------------------------------------------------------------------------------

def nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def mad(metrics: dict) -> float:
    return float(np.mean([metrics[k] for k in METRIC_NAMES]))  # NaN when a pixel metric is missing


def format_metrics(name: str, m: dict) -> str:
    return f"{name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRIC_NAMES) + f", mAD {mad(m):.4f}"


def write_metrics_csv(path: str, results: dict, mean: dict):
    def cell(v):
        return "" if math.isnan(v) else repr(float(v))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRIC_NAMES, "mAD"])
        for name, m in [*results.items(), ("mean", mean)]:
            w.writerow([name, *[cell(m[k]) for k in METRIC_NAMES], cell(mad(m))])
