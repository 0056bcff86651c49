"""The evaluation metrics: image and pixel AUROC, AP, F1max, both AUPRO variants, mAD, the metrics table.

One class is evaluated by a `ClassAccumulator` fed batch by batch. Every metric is computed from histograms
over an order-preserving integer key of the values ("tables": distinct keys ascending with, per key, the
count of normal and of anomalous elements and, for pixels, the anomalous pixels' summed region weights
1/area in fixed point). A table merges by adding counts, so evaluation streams and shards exactly. Pixel
keys are the top `bits` bits of the float32 pattern (default 24: bins 2^-15 of a value wide, bounded memory)
or, with bits=None, the full pattern of the maps' dtype (exact, memory grows with the number of pixels).
"""

import csv
import math
import sys
from typing import Iterable, Iterator

import numpy as np
from scipy import ndimage

from .errors import UserError

METRIC_NAMES = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
OBJECT_METRIC_NAMES = ["O-AUROC", "O-AP", "O-F1max", "S-AUROC"]  # multi-view evaluation only (multiview.py)
# RGB + infrared (MulSen-AD): the infrared images' pixel metrics (P-* and AUPRO are the RGB images')
IR_METRIC_NAMES = ["IR-P-AUROC", "IR-P-AP", "IR-P-F1max", "IR-AUPRO"]
EXTRA_METRIC_NAMES = OBJECT_METRIC_NAMES + IR_METRIC_NAMES  # shown after mAD where a class has them
AUPRO_VARIANTS = ("dinomaly", "exact")
KEY_BITS = 24  # default pixel key: sign, exponent and 15 mantissa bits of the float32 value
WEIGHT_ONE = 1 << 40  # fixed-point unit of the region weights (a region's pixels sum to ~WEIGHT_ONE)
MAX_REGIONS = 1 << 22  # keeps the summed weights (~regions * WEIGHT_ONE) inside int64
_FIELDS = ("neg", "pos", "weight")  # per-key sums of a table besides "keys"
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_PLANE_8 = np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0)))  # 8-connected within each image only


# ----------------------------------------------------------------------------------------------
# Keys and tables
# ----------------------------------------------------------------------------------------------

def order_key(values: np.ndarray) -> np.ndarray:
    """Unsigned integers of the floats' width, ordered as the floats (-0.0 and 0.0 get the same key)."""
    u = values.view(_UINT[values.dtype.itemsize])
    top = u.dtype.type(1 << (8 * values.dtype.itemsize - 1))
    return np.where(values < 0, ~u, u | top)


def _keys(values: np.ndarray, bits: int) -> np.ndarray:
    """Histogram keys (unsigned): the full order key of the values' dtype (bits 0), else the top `bits` bits
    of the float32 order key."""
    if bits == 0:
        return order_key(values)
    return order_key(values.astype(np.float32, copy=False)) >> np.uint32(32 - bits)


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    """The arrays concatenated; an empty array of `dtype` for none."""
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal keys in a sorted array."""
    first = np.ones(sorted_keys.size, bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return np.flatnonzero(first)


def _group(keys: np.ndarray, values: tuple[np.ndarray, ...] = ()) -> tuple[np.ndarray, np.ndarray, list]:
    """Equal keys grouped: (distinct keys ascending as uint64, count of each, sum of each of `values`)."""
    if values:
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], [v[order] for v in values]
    else:
        keys = np.sort(keys)
    starts = _run_starts(keys)
    counts = np.diff(np.append(starts, keys.size)).astype(np.int64)
    return keys[starts].astype(np.uint64), counts, [np.add.reduceat(v, starts) for v in values]


def _table(neg_keys: np.ndarray, pos_keys: np.ndarray, pos_weights: np.ndarray | None = None) -> dict:
    """Table of normal and anomalous elements' keys (and the anomalous elements' int64 weights): all keys
    grouped in one sort, the anomalous ones (usually far fewer) grouped apart and placed at their keys."""
    keys, total, _ = _group(np.concatenate([neg_keys, pos_keys]))
    pk, pc, sums = _group(pos_keys, () if pos_weights is None else (pos_weights,))
    at = np.searchsorted(keys, pk)  # every anomalous key is among all keys
    out = {"keys": keys, "neg": total, "pos": np.zeros_like(total)}
    out["pos"][at] = pc
    out["neg"] -= out["pos"]
    if pos_weights is not None:
        out["weight"] = np.zeros_like(total)
        out["weight"][at] = sums[0]
    return out


def _merge_tables(tables: list[dict]) -> dict:
    """The table of the union of the tables' elements (same fields in all): the smaller tables are merged into
    the largest one by one."""
    tables = sorted((t for t in tables if t["keys"].size), key=lambda t: -t["keys"].size) or tables[:1]
    out = tables[0]
    for t in tables[1:]:
        out = _merge_into(out, t)
    return out


def _merge_into(big: dict, small: dict) -> dict:
    """Two tables merged in O(len(big) + len(small) log len(big)): the small table's keys missing from the big
    one are inserted in order, then its counts are added at their keys' positions."""
    idx = np.searchsorted(big["keys"], small["keys"])
    hit = idx < big["keys"].size
    hit[hit] = big["keys"][idx[hit]] == small["keys"][hit]
    ins = idx[~hit]  # a new key goes before big's key at this index
    # final positions: the j-th new key at ins[j] + j; a present key at its index plus the new keys before it
    at = np.empty(idx.size, np.intp)
    at[~hit] = new_at = ins + np.arange(ins.size)
    at[hit] = idx[hit] + np.searchsorted(ins, idx[hit], side="right")
    old = np.ones(big["keys"].size + ins.size, bool)
    old[new_at] = False
    out = {}
    for f, v in big.items():
        out[f] = np.empty(old.size, v.dtype)
        out[f][old] = v
        out[f][new_at] = small["keys"][~hit] if f == "keys" else 0
        if f != "keys":
            out[f][at] += small[f]
    return out


def _empty_table(fields: tuple[str, ...]) -> dict:
    """A table without keys."""
    return {"keys": np.zeros(0, np.uint64), **{f: np.zeros(0, np.int64) for f in fields}}


# ----------------------------------------------------------------------------------------------
# Metrics from tables
# ----------------------------------------------------------------------------------------------

def _binary_from_table(t: dict) -> tuple[float, float, float]:
    """(AUROC, AP, F1max) with every key a threshold; NaN when one class is absent."""
    neg, pos = t["neg"][::-1], t["pos"][::-1]  # descending keys
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan, math.nan
    tps = np.cumsum(pos).astype(np.float64)  # positives with key >= each key
    selected = tps + np.cumsum(neg)
    # AUROC: trapezoids of the ROC curve (exact Mann-Whitney, ties count half).
    auroc = float(np.dot(neg, 2 * tps - pos)) / (2 * n_pos * n_neg)
    # AP: precision summed over recall increments.
    precision = tps / selected
    ap = float(np.dot(pos, precision)) / n_pos
    # F1max over the PR points (the final P=1, R=0 point is not one of them).
    recall = tps / n_pos
    f1 = 2 * precision * recall / (precision + recall + 1e-7)
    return auroc, ap, float(f1.max())


def _pixel_sums(s: dict) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(normal pixel count, region count, prefix sums of the normal counts and of the weights along the
    ascending keys, each starting at 0) of a state."""
    regions = s["regions"]
    if regions >= MAX_REGIONS:
        raise ValueError(f"{regions} anomalous regions: more than the fixed-point weights allow ({MAX_REGIONS})")
    neg = np.concatenate(([0], np.cumsum(s["px_neg"])))
    weight = np.concatenate(([0], np.cumsum(s["px_weight"])))
    return int(neg[-1]), regions, neg, weight


def _aupro_exact(s: dict, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO-vs-FPR curve up to fpr_limit (MVTec definition: every key a threshold,
    interpolated at the limit) of a state."""
    n_neg, regions, neg, weight = _pixel_sums(s)
    if regions == 0 or n_neg == 0:
        return math.nan
    # Descending thresholds from "nothing detected": detected = total - prefix below the threshold.
    fpr = (n_neg - neg[::-1]) / n_neg
    pro = (weight[-1] - weight[::-1]) / weight[-1]
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= fpr_limit
    x, y = fpr[:i], pro[:i]
    if x[-1] < fpr_limit:  # cut the next segment at the limit
        y_lim = y[-1] + (fpr_limit - x[-1]) * (pro[i] - y[-1]) / (fpr[i] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x) / fpr_limit)


def _round_down(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The largest value of `dtype` <= each value: for a map value v of that dtype, v > t iff v > it."""
    rounded = values.astype(dtype)
    return np.where(rounded > values, np.nextafter(rounded, dtype.type(-np.inf)), rounded)


def _aupro_dinomaly(s: dict, num_th: int = 200) -> float:
    """Dinomaly's AUPRO of a state: thresholds np.arange(min, max, (max-min)/num_th) from the maps' minimum,
    maximum and step in their dtype (the thresholds themselves are float64, as in the reference), detected =
    amap > th, points with FPR < 0.3, FPR divided by its largest kept value, trapezoid."""
    n_neg, regions, neg, weight = _pixel_sums(s)
    lo, hi = s["lo"][0], s["hi"][0]
    if regions == 0 or n_neg == 0 or lo == hi:
        return math.nan
    ths = np.arange(lo, hi, (hi - lo) / num_th)  # [T]
    th_keys = _keys(_round_down(ths, s["lo"].dtype), s["bits"])
    below = np.searchsorted(s["px_keys"], th_keys.astype(np.uint64), side="right")  # keys <= a threshold's
    fpr = (n_neg - neg[below]) / n_neg
    pro = (weight[-1] - weight[below]) / weight[-1]
    keep = fpr < 0.3
    if np.count_nonzero(keep) < 2 or fpr[keep].max() == 0:
        return math.nan
    fpr, pro = fpr[keep], pro[keep]
    # FPR falls as the threshold rises; the area is the trapezoid's magnitude, as sklearn.metrics.auc.
    return float(abs(np.trapezoid(pro, fpr / fpr.max())))


# ----------------------------------------------------------------------------------------------
# The per-class accumulator
# ----------------------------------------------------------------------------------------------

def _numpy(x) -> np.ndarray:
    """A numpy array of an array-like or of a torch tensor on any device (without importing torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class ClassAccumulator:
    """The seven metrics of one class, fed batch by batch; mergeable across processes.

    aupro: "dinomaly" (Dinomaly's reported variant) or "exact" (MVTec definition).
    bits: pixel key resolution, 8..26 bits of the float32 value (default 24: memory bounded by the 2^bits keys,
    results within ~1e-5 of exact on smooth maps); None keeps the full key of the maps' dtype (exact; memory
    grows with the pixel count). Image metrics are always exact.

    Sharded use: each process adds its share of the images (each image once), the states are gathered (e.g.
    torch.distributed.all_gather_object(states, acc.state())) and ClassAccumulator.merge(states).compute()
    gives exactly the single-process metrics.
    """

    def __init__(self, aupro: str = "dinomaly", bits: int | None = KEY_BITS):
        if aupro not in AUPRO_VARIANTS:
            raise ValueError(f"unknown AUPRO variant {aupro!r} (expected 'dinomaly' or 'exact')")
        if bits is not None and not 8 <= bits <= 26:
            raise ValueError(f"bits must be in 8..26 or None, got {bits}")
        self.aupro, self.bits = aupro, bits or 0
        self._img = _empty_table(("neg", "pos"))
        self._px = _empty_table(_FIELDS)
        self._regions = 0
        self._lo = self._hi = np.zeros(0, np.float32)  # [0] before any pixel, else [1] in the maps' dtype
        # Elements added since the tables were last built: image keys; pixel counts per key in dense
        # arrays (binned keys) or the keys themselves (exact keys).
        self._img_new = {"neg": [], "pos": []}
        if self.bits:
            self._dense = {f: np.zeros(1 << self.bits, np.int64) for f in _FIELDS}
        else:
            self._px_new = {"neg": [], "pos": [], "weight": []}

    def add(self, labels, scores, maps, masks, has_mask=None) -> None:
        """One batch: labels [B] (0 normal, 1 anomalous), scores [B], maps [B,H,W] or [B,1,H,W] float, masks
        likewise bool, has_mask [B] bool (default all True). Images without a mask count for the image
        metrics only. numpy arrays or torch tensors."""
        self.add_images(labels, scores)
        maps, masks = _numpy(maps), _numpy(masks)
        if has_mask is not None:
            has_mask = _numpy(has_mask).astype(bool)
            maps, masks = maps[has_mask], masks[has_mask]
        self.add_pixels(maps, masks)

    def add_images(self, labels, scores) -> None:
        """Image labels [B] and scores [B] only."""
        labels = _numpy(labels).ravel().astype(bool)
        keys = _keys(_numpy(scores).ravel().astype(np.float64), 0)  # float64: exact for any score
        self._img_new["neg"].append(keys[~labels])
        self._img_new["pos"].append(keys[labels])

    def add_pixels(self, maps, masks) -> None:
        """Pixel maps [B,H,W] (or [B,1,H,W]) float and masks bool of images with pixel ground truth."""
        masks = _numpy(masks).astype(bool, copy=False)
        masks = masks.reshape(-1, *masks.shape[-2:])
        maps = _numpy(maps).reshape(masks.shape)
        if not np.issubdtype(maps.dtype, np.floating):
            maps = maps.astype(np.float64)
        if maps.size == 0:
            return
        self._update_range(maps)
        regions, n = ndimage.label(masks, _PLANE_8)  # ids unique across the batch
        self._regions += n
        anomalous = regions[masks]  # [P] region id of each anomalous pixel
        area = np.bincount(anomalous, minlength=n + 1)
        inv_area = (WEIGHT_ONE + area // 2) // np.maximum(area, 1)  # round(WEIGHT_ONE / area)
        weights = inv_area[anomalous].astype(np.int64)
        keys = _keys(maps, self.bits)
        neg_keys, pos_keys = keys[~masks], keys[masks]
        if self.bits:
            for f, k, v in (("neg", neg_keys, 1), ("pos", pos_keys, 1), ("weight", pos_keys, weights)):
                np.add.at(self._dense[f], k.astype(np.intp), v)
        else:
            for f, v in (("neg", neg_keys), ("pos", pos_keys), ("weight", weights)):
                self._px_new[f].append(v)

    def _update_range(self, maps: np.ndarray) -> None:
        """Track the maps' minimum and maximum (Dinomaly's thresholds) in the maps' dtype."""
        lo, hi = maps.min(keepdims=True).ravel(), maps.max(keepdims=True).ravel()
        if np.isnan(lo[0]) or np.isnan(hi[0]):
            raise ValueError("anomaly maps contain NaN")
        if self._lo.size and self._lo.dtype != maps.dtype:
            raise ValueError(f"maps of dtype {maps.dtype} after maps of dtype {self._lo.dtype}")
        self._lo = np.minimum(self._lo, lo) if self._lo.size else lo
        self._hi = np.maximum(self._hi, hi) if self._hi.size else hi

    def state(self) -> dict:
        """Everything the metrics need, canonical (the same for any split of the images into accumulators):
        bits (0: exact keys), regions (int), lo/hi ([0] or [1] array in the maps' dtype), the image table
        img_keys/img_neg/img_pos and the pixel table px_keys/px_neg/px_pos/px_weight (distinct keys ascending,
        uint64, with int64 sums). Its size is bounded by the number of distinct keys, not by the images."""
        img = _merge_tables([self._img, _table(*(_concat(self._img_new[f], np.uint64) for f in ("neg", "pos")))])
        px = _merge_tables([self._px, self._new_pixel_table()])
        return {"bits": self.bits, "regions": self._regions, "lo": self._lo.copy(), "hi": self._hi.copy(),
                **{f"img_{k}": v for k, v in img.items()}, **{f"px_{k}": v for k, v in px.items()}}

    def _new_pixel_table(self) -> dict:
        """The table of the pixels added since the pixel table was built (by merge)."""
        if not self.bits:
            return _table(*(_concat(self._px_new[f], d)
                            for f, d in (("neg", np.uint64), ("pos", np.uint64), ("weight", np.int64))))
        if not self._lo.size:
            return _empty_table(_FIELDS)
        # Only the keys from the smallest value's to the largest value's can be occupied.
        first, last = (int(_keys(v, self.bits)[0]) for v in (self._lo, self._hi))
        span = {f: self._dense[f][first:last + 1] for f in _FIELDS}
        occupied = np.flatnonzero((span["neg"] != 0) | (span["pos"] != 0))
        return {"keys": (occupied + first).astype(np.uint64), **{f: span[f][occupied] for f in _FIELDS}}

    @classmethod
    def merge(cls, states: Iterable[dict], aupro: str = "dinomaly") -> "ClassAccumulator":
        """An accumulator of all the images behind `states` (from state() of accumulators with equal bits
        and map dtype), e.g. gathered from the ranks of a distributed evaluation."""
        states = list(states)
        bits = {s["bits"] for s in states}
        dtypes = {s["lo"].dtype for s in states if s["lo"].size}
        if len(bits) != 1 or len(dtypes) > 1:
            raise ValueError(f"cannot merge states of different bits {bits} or map dtypes {dtypes}")
        acc = cls(aupro, bits.pop() or None)
        acc._img = _merge_tables([{k[4:]: v for k, v in s.items() if k.startswith("img_")} for s in states])
        acc._px = _merge_tables([{k[3:]: v for k, v in s.items() if k.startswith("px_")} for s in states])
        acc._regions = sum(s["regions"] for s in states)
        ranged = [s for s in states if s["lo"].size]
        if ranged:
            acc._lo = np.min([s["lo"] for s in ranged], axis=0)
            acc._hi = np.max([s["hi"] for s in ranged], axis=0)
        return acc

    def compute(self) -> dict[str, float]:
        """The seven metrics (fractions, keys METRIC_NAMES). Image metrics are NaN when one class is absent,
        pixel metrics without any anomalous pixel among the images with masks."""
        s = self.state()
        image = _binary_from_table({"neg": s["img_neg"], "pos": s["img_pos"]})
        pixel = (math.nan,) * 4
        if s["px_pos"].any():
            pro = _aupro_dinomaly(s) if self.aupro == "dinomaly" else _aupro_exact(s)
            pixel = (*_binary_from_table({"neg": s["px_neg"], "pos": s["px_pos"]}), pro)
        return dict(zip(METRIC_NAMES, (*image, *pixel)))


# ----------------------------------------------------------------------------------------------
# Whole-array entry points (exact keys)
# ----------------------------------------------------------------------------------------------

def binary_metrics(labels, scores) -> tuple[float, float, float]:
    """(AUROC, AP, F1max) of scores against binary labels (any shape); NaN when one class is absent."""
    y = np.asarray(labels).ravel().astype(bool)
    keys = _keys(np.asarray(scores, dtype=np.float64).ravel(), 0)
    return _binary_from_table(_table(keys[~y], keys[y]))


def _exact_state(masks, amaps) -> dict:
    """The state of whole pixel arrays with exact keys."""
    acc = ClassAccumulator(bits=None)
    acc.add_pixels(np.asarray(amaps), np.asarray(masks, dtype=bool))
    return acc.state()


def aupro_exact(masks, amaps, fpr_limit: float = 0.3) -> float:
    """Exact MVTec AUPRO up to fpr_limit of masks bool [N,H,W] and maps float [N,H,W]."""
    return _aupro_exact(_exact_state(masks, amaps), fpr_limit)


def aupro_dinomaly(masks, amaps, num_th: int = 200) -> float:
    """Dinomaly's AUPRO with num_th thresholds of masks bool [N,H,W] and maps float [N,H,W]."""
    return _aupro_dinomaly(_exact_state(masks, amaps), num_th)


def class_metrics(img_labels, img_scores, px_masks=None, px_maps=None, aupro: str = "dinomaly",
                  bits: int | None = KEY_BITS) -> dict[str, float]:
    """The seven metrics of one class from whole arrays: image labels/scores [N], pixel masks/maps [M,H,W] or
    [M,1,H,W] of the images with masks (None: no pixel metrics). See ClassAccumulator."""
    acc = ClassAccumulator(aupro, bits)
    acc.add_images(img_labels, img_scores)
    if px_masks is not None:
        acc.add_pixels(px_maps, px_masks)
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# A synthetic class (benchmarks and tests)
# ----------------------------------------------------------------------------------------------

def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """1 to 3 random ellipses (radii 2 % to 15 % of the side), bool [size,size]."""
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        ry, rx = rng.uniform(0.02, 0.15, 2) * size
        angle = rng.uniform(0, np.pi)
        r = max(ry, rx)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size)
        dy, dx = np.ogrid[y0:y1, x0:x1]
        dy, dx = dy - cy, dx - cx
        u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
        v = (dx * np.cos(angle) - dy * np.sin(angle)) / rx
        mask[y0:y1, x0:x1] |= u * u + v * v <= 1
    return mask


def _smooth_upsampling(grid: int, size: int) -> np.ndarray:
    """[size,grid] matrix: bilinear upsampling (align_corners=True) then the 5x5 sigma-4 Gaussian with zero
    padding, along one axis."""
    pos = np.arange(size) * (grid - 1) / (size - 1)
    up = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(grid)[None]))  # [size,grid]
    kernel = np.exp(-(np.arange(5) - 2.0) ** 2 / 32)
    offsets = np.arange(size)[None] - np.arange(size)[:, None] + 2  # [size,size] j - i + 2
    gauss = np.where(np.abs(offsets - 2) <= 2, kernel[np.clip(offsets, 0, 4)], 0) / kernel.sum()
    return (gauss @ up).astype(np.float32)


def synthetic_class(n_maps: int, size: int = 256, seed: int = 0, batch_size: int = 16,
                    grid: int = 28) -> Iterator[tuple[np.ndarray, ...]]:
    """A realistic synthetic test class, in batches: (labels int64 [B], scores float32 [B], maps float32
    [B,size,size], masks bool [B,size,size], has_mask bool [B], all True).

    About half the images are anomalous (1-3 elliptic blobs). A map is positive noise on a grid x grid patch
    grid, raised by a random amount where a blob covers the patch, bilinearly upsampled (align_corners=True)
    and smoothed by the 5x5 sigma-4 Gaussian with zero padding, as Dinomaly's maps; scores are the mean of the
    top 1 %. Image i depends only on (seed, i), not on batch_size.
    """
    smooth_up = _smooth_upsampling(grid, size)  # [size,grid]
    coverage = smooth_up / smooth_up.sum(axis=0)  # [size,grid] a patch's share of each pixel row
    for start in range(0, n_maps, batch_size):
        lows, masks = [], []
        for i in range(start, min(start + batch_size, n_maps)):
            rng = np.random.default_rng([seed, i])
            low = (0.04 + 0.03 * rng.gamma(2.0, 1.0, (grid, grid))).astype(np.float32)
            mask = _blob_mask(rng, size) if rng.random() < 0.5 else np.zeros((size, size), bool)
            if mask.any():
                cover = coverage.T @ mask.astype(np.float32) @ coverage  # [grid,grid] in [0,1]
                low += rng.uniform(0.05, 0.8) * cover * rng.uniform(0.5, 1.5, (grid, grid)).astype(np.float32)
            lows.append(low)
            masks.append(mask)
        maps = np.clip(smooth_up @ np.stack(lows) @ smooth_up.T, 0, 2)  # [B,size,size] float32
        masks = np.stack(masks)
        flat = maps.reshape(len(maps), -1)
        top = flat.shape[1] // 100
        scores = np.partition(flat, -top, axis=1)[:, -top:].mean(axis=1, dtype=np.float32)
        labels = masks.reshape(len(masks), -1).any(axis=1).astype(np.int64)
        yield labels, scores, maps, masks, np.ones(len(maps), bool)


# ----------------------------------------------------------------------------------------------
# The metrics table
# ----------------------------------------------------------------------------------------------

def nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def mad(metrics: dict) -> float:
    return float(np.mean([metrics[k] for k in METRIC_NAMES]))  # NaN when a pixel metric is missing


def format_metrics(name: str, m: dict) -> str:
    """One line of the table: the seven metrics and mAD, then the object and sample level where `m` has them."""
    extra = "".join(f", {k} {m[k]:.4f}" for k in EXTRA_METRIC_NAMES if k in m)
    return f"{name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRIC_NAMES) + f", mAD {mad(m):.4f}" + extra


def write_metrics_csv(path: str, results: dict, mean: dict):
    """metrics.csv: a row per class and the mean; the columns of format_metrics (empty cells for NaN)."""
    def cell(v):
        return "" if math.isnan(v) else repr(float(v))
    extra = [k for k in EXTRA_METRIC_NAMES if k in mean]
    with open(path, "w", newline="", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRIC_NAMES, "mAD", *extra])
        for name, m in [*results.items(), ("mean", mean)]:
            w.writerow([name, *[cell(m[k]) for k in METRIC_NAMES], cell(mad(m)), *[cell(m[k]) for k in extra]])


def read_metrics_csv(path: str) -> dict:
    """A metrics.csv back: {class: metrics} (the mean row left out; empty cells NaN)."""
    try:
        with open(path, newline="", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
        return {r["class"]: {k: float(v) if v else float("nan") for k, v in r.items() if k not in ("class", "mAD")}
                for r in rows[:-1]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it to evaluate that class again") from None
