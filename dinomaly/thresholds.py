"""Decision thresholds calibrated by evaluation, stored as thresholds.json in the run folder.

Per class, and once for all classes together ("all"):
- "image": the F1-max threshold of the image scores (an image is anomalous when score >= threshold; among
  equally good thresholds the lowest, as scikit-learn's precision_recall_curve + argmax gives), its F1, the
  counts, and the normal images' score range (min, 99th percentile, max). Without anomalous images (good images
  only: held-out training images, a --val folder or test/good) the threshold is set at a false-alarm rate
  instead (false_alarm_threshold; "method" says which);
- "pixel": the F1-max threshold of the anomaly-map values against the ground-truth masks (for the predicted
  masks), its F1, and the normal images' map values (median, 99.9th percentile, max);
- "color_range": the fixed colour scale of the pictures (see color_range): from the median of the normal
  images' map values (blue: a typical good pixel) with the image threshold in the middle (green-yellow; an
  image is anomalous when its hottest 1 % reaches it on average) to red, twice as far above a good pixel.

A threshold is null where it cannot be calibrated (a class without normal images, without anomalous images for the
pixel threshold, or without masks). Masks use mask_level: the pixel threshold, capped by the image threshold. Pixel statistics come from a seeded uniform subsample of at most PIXEL_SAMPLE map values per
class (exact for up to 32 maps of 256 x 256); the "all" entry pools the classes' subsamples.
"""
import json
import math

import numpy as np

from .errors import Expect, UserError, check_entries, choice, kind, number
from .options import EvalOptions
from .run import write_atomic

FALSE_ALARM_RATE = EvalOptions.false_alarm_rate  # --false_alarm_rate's default

PIXEL_SAMPLE = 1 << 21  # map values kept per class: 32 maps of 256 x 256


def f1max_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """(threshold, F1) maximising F1 of `scores >= threshold` against binary `labels`; (None, None) when
    one class is absent. Ties between thresholds go to the lowest."""
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores).ravel()
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        return None, None
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each run of equal scores
    tp = np.cumsum(y, dtype=np.int64)[ends]
    precision, recall = tp / (ends + 1), tp / n_pos
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(tp)), where=tp > 0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last maximum: the lowest threshold
    return float(s[ends[best]]), float(f1[best])


def false_alarm_threshold(normal_scores: np.ndarray, rate: float) -> tuple[float | None, bool]:
    """(threshold, enough images) for a false-alarm rate from good images' scores alone: the k-th smallest of
    the n scores, k = ceil((n + 1) * (1 - rate)), the conformal quantile: a new good image (exchangeable with
    these) scores strictly above it with probability at most `rate`. With fewer than 1 / rate - 1 images k
    exceeds n: the highest score is taken and `enough` is False (about one good image in n + 1 is then called
    anomalous). (None, False) without scores."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        return None, False
    k = math.ceil((s.size + 1) * (1 - rate) - 1e-9)
    return float(s[min(k, s.size) - 1]), k <= s.size


def check_rate(rate: float):
    """A false-alarm rate must lie in (0, 1): at 0 no threshold set on finitely many good images honours it."""
    if not (isinstance(rate, (int, float)) and 0 < rate < 1):
        raise UserError(f"false-alarm rate {rate} is not in (0, 1) (--false_alarm_rate; 0 would need infinitely "
                        f"many good images); pass e.g. 0.01")


def images_needed(rate: float) -> int:
    """The fewest good images for which false_alarm_threshold can honour `rate` (in (0, 1), check_rate)."""
    check_rate(rate)
    return math.ceil(1 / rate - 1 - 1e-9)


def mask_level(pixel_threshold: float | None, image_threshold: float) -> float:
    """The map level that outlines an anomalous image's defect: the calibrated pixel threshold, capped by the
    image threshold. An image is anomalous when the mean of its top values reaches the image threshold, so its
    map reaches this level somewhere: an anomalous image always shows where."""
    return image_threshold if pixel_threshold is None else min(pixel_threshold, image_threshold)


class PixelSample:
    """A uniform subsample of one class's map values, fed batch by batch: each pixel of the image with index i
    is kept with probability `rate` = min(1, max_pixels / total_pixels), drawn from a generator seeded with
    (seed, i), so the sample depends neither on the batches nor on how the images are split across processes.
    Keeps (values, anomalous per the mask, from a normal image, i.e. one whose mask is empty)."""

    def __init__(self, total_pixels: int, max_pixels: int = PIXEL_SAMPLE, seed: int = 0):
        self.rate, self.seed = min(1.0, max_pixels / max(total_pixels, 1)), seed
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, maps: np.ndarray, masks: np.ndarray, indices: list[int]):
        """maps float [B, H, W], masks bool [B, H, W], the images' indices in their class [B]."""
        for amap, mask, i in zip(maps, masks, indices):
            values, flags = np.asarray(amap, np.float32).ravel(), np.asarray(mask, bool).ravel()
            if self.rate < 1:
                keep = np.random.default_rng([self.seed, i]).random(values.size) < self.rate
                values, flags = values[keep], flags[keep]
            self.parts.append((values, flags, np.full(values.size, not mask.any())))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool)
        return tuple(np.concatenate(p) for p in zip(*self.parts))

    @classmethod
    def merge(cls, samples: list["PixelSample"]) -> "PixelSample":
        out = cls(1)
        out.parts = [p for s in samples for p in s.parts]
        return out


def _stats(values: np.ndarray, percentiles: dict[str, float]) -> dict:
    if values.size == 0:
        return {name: None for name in ("min", *percentiles, "max")}
    out = {"min": float(values.min())}
    out.update({name: float(np.percentile(values, q)) for name, q in percentiles.items()})
    out["max"] = float(values.max())
    return out


def summarize(labels: np.ndarray, scores: np.ndarray, px_values: np.ndarray, px_flags: np.ndarray,
              px_normal: np.ndarray, false_alarm_rate: float = FALSE_ALARM_RATE) -> dict:
    """One thresholds.json entry from image labels and scores and a pixel sample (see PixelSample). The image
    threshold: F1-max with anomalous images, else at `false_alarm_rate` of the normal images."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    threshold, f1 = f1max_threshold(labels, scores)
    method = {"method": "f1max"}
    if not labels.any():
        threshold, enough = false_alarm_threshold(scores, false_alarm_rate)
        method = {"method": "false_alarm_rate", "false_alarm_rate": false_alarm_rate, "enough_images": enough}
    px_threshold, px_f1 = f1max_threshold(px_flags, px_values) if px_flags.any() else (None, None)
    normal_px = px_values[px_normal] if px_normal.any() else px_values[~px_flags]
    px_stats = _stats(normal_px, {"p50": 50, "p999": 99.9})
    return {
        "image": {"threshold": threshold, **method, "f1": f1, "n_normal": int((~labels).sum()),
                  "n_anomalous": int(labels.sum()), "normal_scores": _stats(scores[~labels], {"p99": 99})},
        "pixel": {"threshold": px_threshold, "f1": px_f1, "n_sampled": int(px_values.size),
                  "normal_values": px_stats},
        "color_range": color_range(px_stats["p50"], threshold, px_stats["p999"]),
    }


def color_range(lo: float | None, threshold: float | None, high: float | None) -> list[float] | None:
    """The colour scale [lo, lo + 2 * (threshold - lo)]: the threshold in the middle, as normalize puts it at
    0.5. Without a threshold above lo: [lo, high] (e.g. the normal 99.9th percentile). None without lo."""
    if lo is None:
        return None
    hi = lo + 2 * (threshold - lo) if threshold is not None and threshold > lo else high
    return [lo, hi if hi is not None and hi > lo else lo + max(abs(lo), 1.0) * 1e-6]


class Calibration:
    """Collects each class's calibration during evaluation and writes thresholds.json.

    settings: how the scores were made (map kind, max_ratio, ...), stored so that prediction can check that
    it scores the same way."""

    def __init__(self, settings: dict, false_alarm_rate: float = FALSE_ALARM_RATE):
        check_rate(false_alarm_rate)  # before the evaluation, which would otherwise end without its results
        self.settings, self.false_alarm_rate = settings, false_alarm_rate
        self.classes: dict[str, dict] = {}
        self.samples: dict[str, tuple] = {}  # class -> (labels, scores, px_values, px_flags, px_normal)

    def add(self, name: str, labels: np.ndarray, scores: np.ndarray, px_values: np.ndarray, px_flags: np.ndarray,
            px_normal: np.ndarray) -> dict:
        """Calibrate one class: labels and scores [N] and a PixelSample's arrays. Returns its entry."""
        self.samples[name] = (np.asarray(labels), np.asarray(scores), px_values, px_flags, px_normal)
        self.classes[name] = summarize(*self.samples[name], self.false_alarm_rate)
        return self.classes[name]

    def pooled(self) -> dict:
        """The entry for all classes together."""
        parts = list(zip(*self.samples.values()))
        values, flags, normal = (np.concatenate(p) for p in parts[2:])
        if values.size > PIXEL_SAMPLE:
            idx = np.sort(np.random.default_rng(0).choice(values.size, PIXEL_SAMPLE, replace=False))
            values, flags, normal = values[idx], flags[idx], normal[idx]
        return summarize(np.concatenate(parts[0]), np.concatenate(parts[1]), values, flags, normal,
                         self.false_alarm_rate)

    def save(self, path: str):
        write(path, {"settings": self.settings, "all": self.pooled(), "classes": self.classes})


def write(path: str, data: dict):
    """A thresholds file, written atomically."""
    text = json.dumps(data, indent=2)
    write_atomic(path, lambda f: f.write(text.encode()), len(text))


def with_image_thresholds(data: dict, chosen: dict[str, float]) -> dict:
    """A copy of a thresholds file's content with the image thresholds of some classes replaced by chosen ones
    (e.g. on the review page): "method": "chosen", the calibrated threshold kept as "calibrated_threshold", the
    colour range moved with the threshold. An unknown class or a threshold that is not a positive number is a
    UserError."""
    out = json.loads(json.dumps(data))
    for name, value in chosen.items():
        if name not in out["classes"]:
            raise UserError(f"unknown class {name!r}; the thresholds file has {', '.join(out['classes'])}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise UserError(f"the threshold of {name} must be a positive number, not {value!r}")
        entry = out["classes"][name]
        image = entry["image"]
        image.setdefault("calibrated_threshold", image["threshold"])
        image.update(threshold=float(value), method="chosen")
        normal = entry["pixel"]["normal_values"]
        entry["color_range"] = color_range(normal.get("p50"), float(value), normal.get("p999"))
    return out


# What load checks in a thresholds file (other keys are left alone): the settings the scores were made with,
# then in the "all" entry and in each class's entry what prediction and export read.
SETTINGS = {
    "settings.map": kind(str, "the name of a map").optional(),
    "settings.max_ratio": number(0, 1).optional(),
    "settings.fusion_alpha": number(0, 1).or_null().optional(),
    "settings.test_mask": choice("on", "off").optional(),
    "settings.mask_ratio": number(0, 1, hi_open=True).optional(),
}
THRESHOLD = number(0, lo_open=True).or_null()  # scores and map values are >= 0
ENTRY = {
    "image.threshold": THRESHOLD,
    "image.normal_scores.min": number().or_null(),
    "pixel.threshold": THRESHOLD,
    "pixel.normal_values.p50": number().or_null(),
    "pixel.normal_values.p999": number().or_null(),
    "color_range": Expect(lambda v: v is None or (isinstance(v, list) and len(v) == 2 and
                                                  number().test(v[0]) and number().test(v[1]) and v[0] < v[1]),
                          "null or [low, high] with low < high"),
}


def load(path: str) -> dict:
    """A thresholds.json, checked enough that a damaged file is a one-line error."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the thresholds file {path} ({e}); evaluate the model again or pass "
                        f"--threshold") from None
    fix = "evaluate the model again or pass --threshold"
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a thresholds file (not a JSON object); {fix}")
    missing = [k for k in ("settings", "all", "classes") if not isinstance(data.get(k), dict)]
    if missing:
        raise UserError(f"{path} is not a complete thresholds file (no {' and '.join(map(repr, missing))} "
                        f"entr{'ies' if len(missing) > 1 else 'y'}, which evaluation writes); {fix}")
    check_entries(data, SETTINGS, f"the thresholds file {path}", fix)
    for name, entry in [("all", data["all"]), *data["classes"].items()]:
        check_entries(entry if isinstance(entry, dict) else {}, ENTRY, f"the thresholds file {path} (entry "
                      f"{name!r})", fix)
    return data


def select(data: dict, class_name: str | None, path: str) -> dict:
    """The entry of `class_name`, or the all-classes entry when None."""
    if class_name is None:
        return data["all"]
    if class_name not in data["classes"]:
        raise UserError(f"unknown --class_name {class_name}; {path} has {', '.join(data['classes']) or 'none'}")
    return data["classes"][class_name]


def normalize(score: float, threshold: float, normal_min: float | None) -> float:
    """A score mapped linearly so that the lowest normal test score becomes 0 and the threshold 0.5, clipped
    to [0, 1] (0 stands in for the normal minimum when there is none, or when it is not below the threshold).
    0.5 and above is anomalous, exactly as score >= threshold."""
    lo = normal_min if normal_min is not None and normal_min < threshold else 0.0
    return min(max(0.5 * (score - lo) / (threshold - lo), 0.0), 1.0)
