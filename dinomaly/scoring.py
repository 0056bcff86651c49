"""What every detector does, the checkpoint's (checkpoint_detector.py) and an exported model's (exported.py),
without PyTorch: prepare images as the model sees them (images.py), decide each with the operating point of its
class (thresholds.json), and give the map and mask in the image's own geometry (`Prediction`). A detector adds
the model: its `predict_prepared` computes the maps, scores and classes found and calls `Scoring.decide`.
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import class_finder, images
from . import thresholds as th
from .errors import InputError, UserError
from .run import log


@dataclass
class Prediction:
    """One image's result. anomaly_map: float32 [H, W] in the image's geometry, NaN outside the centre crop
    (`seen` False: the model never saw those pixels); mask: bool [H, W], where an anomalous image's map reaches
    mask_threshold (thresholds.mask_level), empty for a normal image. class_name: the class whose thresholds
    decided (--class_name, or the one found), None for all classes'."""
    score: float
    is_anomalous: bool
    threshold: float
    normalized_score: float  # 0 at the lowest normal test score, 0.5 at the threshold, clipped to [0, 1]
    anomaly_map: np.ndarray
    mask: np.ndarray
    seen: np.ndarray
    mask_threshold: float
    class_name: str | None = None
    class_match: class_finder.Match | None = None  # the class found (class_finder), None unless it was looked for
    pair_map: np.ndarray | None = None  # an RGB + infrared pair: the infrared image's map (anomaly_map: the RGB's)


@dataclass
class OperatingPoint:
    """The thresholds one decision uses: of a class, of all classes, or --threshold."""
    threshold: float
    mask_threshold: float
    color_range: tuple[float, float]
    normal_min: float | None
    source: str


# ----------------------------------------------------------------------------------------------- geometry

def uncrop(amap: np.ndarray, width: int, height: int, image_size: int, crop_size: int) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """A map of the centre crop ([n, n], any n) -> (map [height, width] of the original image, seen [height,
    width]): undoes the square resize to image_size and the centre crop, pixel centre to pixel centre, with
    bilinear interpolation (edge values repeated up to the crop's border). NaN where seen is False."""
    n = amap.shape[-1]
    top = images.center_crop_box(image_size, crop_size)[0]

    def crop_coords(length):  # original pixel centres -> crop coordinates in pixels
        return (np.arange(length) + 0.5) * image_size / length - top

    def weights(c):  # crop coordinates -> (index, weight of index + 1) into the map, clamped to its ends
        u = np.clip(c * n / crop_size - 0.5, 0, n - 1)
        i = np.minimum(np.floor(u).astype(np.int64), n - 2)
        return i, (u - i).astype(np.float32)

    cx, cy = crop_coords(width), crop_coords(height)
    (ix, tx), (iy, ty) = weights(cx), weights(cy)
    a = np.asarray(amap, dtype=np.float32)
    cols = a[:, ix] * (1 - tx) + a[:, ix + 1] * tx  # [n, width]
    full = cols[iy] * (1 - ty)[:, None] + cols[iy + 1] * ty[:, None]  # [height, width]
    seen = ((cy >= 0) & (cy < crop_size))[:, None] & ((cx >= 0) & (cx < crop_size))[None, :]
    full[~seen] = np.nan
    return full, seen


# ----------------------------------------------------------------------------------------------- decisions

def operating_point(entry: dict | None, where: str, threshold: float | None = None) -> OperatingPoint:
    """The thresholds of a thresholds.json entry (None: --threshold alone), the image threshold replaced by
    `threshold` when given."""
    calibrated = entry["image"]["threshold"] if entry else None
    if threshold is None and calibrated is None:
        raise UserError(f"{where} has no image threshold (its test set had no good images); evaluate the run "
                        f"with good test images (a test/good folder, or --val DIR) to calibrate one, or pass "
                        f"--threshold")
    where = where if threshold is None else "--threshold"
    threshold = float(threshold if threshold is not None else calibrated)
    pixel = entry["pixel"]["threshold"] if entry else None
    normal_px = entry["pixel"]["normal_values"] if entry else {}
    return OperatingPoint(threshold=threshold, mask_threshold=th.mask_level(pixel, threshold),
                          color_range=tuple(th.color_range(normal_px.get("p50") or 0.0, threshold,
                                                           normal_px.get("p999"))),
                          normal_min=entry["image"]["normal_scores"]["min"] if entry else None, source=where)


def source(path: str, class_name: str | None) -> str:
    """Where thresholds come from, for the log: the file and the class (or all classes)."""
    return f"{path} ({'all classes' if class_name is None else 'class ' + class_name})"


PAIR_FORMS = {"rgbd": "an (image, depth) pair: the image as above, the depth a z map or a point cloud (a TIFF "
                      "file, or an array [H, W] or [H, W, 3] of the image's size), or the path of an image in "
                      "MVTec 3D-AD's layout (<kind>/rgb/<n>.png, its depth found beside it)",
              "rgbir": "an (image, infrared image) pair, each as above, or the path of an image in MulSen-AD's "
                       "layout (.../RGB/.../<n>.png, its infrared image found in .../Infrared/.../<n>.png)"}


def pair_input(item, modality: str, image_size: int, crop_size: int) -> tuple[np.ndarray, tuple[int, int],
                                                                               tuple[np.ndarray, np.ndarray]]:
    """A pair of a two-modality model (PAIR_FORMS) -> (normalised crops [6, crop, crop], the pair's (width,
    height), its two images as the model sees them, uint8 [H, W, 3] each). Depth is prepared and coloured as in
    training (modalities.rgbd_from)."""
    from . import modalities  # (OpenCV and SciPy: the depth's preparation)
    kind = modalities.PAIR_KINDS[modality]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        first, second = item
    elif isinstance(item, (str, os.PathLike)):
        first, second = item, modalities.partner(os.fspath(item), kind)
    else:
        raise InputError(f"this run's model takes pairs ({modality}): cannot use a {type(item).__name__}; pass "
                         f"{PAIR_FORMS[modality]}")
    rgb = np.asarray(images.as_rgb(first))
    if kind == modalities.DEPTH:
        a, b = modalities.rgbd_from(rgb, second)
    else:
        a, b = rgb, np.asarray(images.as_rgb(second))
        if a.shape != b.shape:
            raise InputError(f"the infrared image ({b.shape[1]} x {b.shape[0]}) is not the size of its RGB image "
                             f"({a.shape[1]} x {a.shape[0]})")
    return modalities.pair_crop((a, b), image_size, crop_size), (a.shape[1], a.shape[0]), (a, b)


class Scoring:
    """What every detector does with images: prepare them as the model sees them and predict in batches. A
    detector sets image_size, crop_size and (for a model of two modalities) modality, and implements
    predict_prepared."""
    image_size: int
    crop_size: int
    modality: str = "rgb"

    def prepare(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """An image (see images.as_rgb), or a pair for a model of two modalities (PAIR_FORMS) -> (normalised crop
        [3 or 6, crop, crop], its (width, height))."""
        if self.modality != "rgb":
            return pair_input(image, self.modality, self.image_size, self.crop_size)[:2]
        rgb = images.as_rgb(image)
        return images.prepare(rgb, self.image_size, self.crop_size), rgb.size

    def predict_prepared(self, batch: np.ndarray, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        """Normalised crops [B, 3, crop, crop] and their images' (width, height) -> one Prediction each. classes:
        per image, a class of the run whose thresholds decide it (as `class_name` would), or None: the class
        found, else the detector's own thresholds."""
        raise NotImplementedError

    def set_thresholds(self, calibration: dict | None, path: str, class_name: str | None, threshold: float | None,
                       prototypes):
        """self.default: the operating point of --threshold, --class_name or all classes; with class finding
        (a multi-class run's class prototypes, neither given) self.points: each calibrated class's.
        `prototypes()` gives the class prototypes (class_finder's "classes" and "radius" at least) or None."""
        if calibration is None:
            if class_name is not None:
                raise UserError(f"--class_name needs the run's thresholds, but {path} does not exist; evaluate "
                                f"the model first or pass --thresholds")
            if threshold is None:
                raise UserError(f"no thresholds file {path}: evaluate the model first (evaluation writes "
                                f"thresholds.json into its run folder; pass it as --thresholds), or pass --threshold")
            self.classes, self.default = [], operating_point(None, "--threshold", threshold)
        else:
            self.classes = list(calibration["classes"])
            one = self.classes[0] if len(self.classes) == 1 else None  # a one-class run: its class's thresholds
            self.default = operating_point(th.select(calibration, class_name, path), source(path, class_name or one),
                                           threshold)
        self.class_name, self.points = class_name, {}
        self.calibration, self.calibration_path, self.threshold = calibration, path, threshold
        self.find_prototypes = prototypes
        self.prototypes = None
        if class_name is None and threshold is None and len(self.classes) > 1:
            self.prototypes = prototypes()
        if self.prototypes is not None:
            self.points = {c: operating_point(e, source(path, c)) for c, e in calibration["classes"].items()
                           if e["image"]["threshold"] is not None}
            log.info(f"each image is decided with the thresholds of its class, found by the nearest "
                     f"class prototype ({', '.join(self.prototypes['classes'])}); --class_name C uses one class's thresholds")
        else:
            log.info(f"threshold {self.default.threshold:.6g} from {self.default.source}; masks of anomalous images: "
                     f"map >= {self.default.mask_threshold:.6g}")

    def reload_thresholds(self):
        """Read the thresholds file again (after it was changed, e.g. saved from the review page)."""
        self.set_thresholds(th.load(self.calibration_path), self.calibration_path, self.class_name, self.threshold,
                            self.find_prototypes)

    def point(self, class_name: str | None) -> OperatingPoint:
        """The operating point of a class of the run, as `class_name` would give it; the default one for None,
        or a class without a calibrated image threshold."""
        if class_name in self.points:
            return self.points[class_name]
        entry = self.calibration["classes"].get(class_name) \
            if self.calibration is not None and class_name != self.class_name else None
        if entry is None or (entry["image"]["threshold"] is None and self.threshold is None):
            return self.default
        return operating_point(entry, source(self.calibration_path, class_name), self.threshold)

    def decide(self, amaps: np.ndarray, scores: list[float], sizes: list[tuple[int, int]], matches: list,
               classes: list[str | None] | None = None, pair_maps: np.ndarray | None = None) -> list[Prediction]:
        """Maps of the crops ([B, n, n]), their scores, their images' (width, height), the classes found
        (class_finder.Match, or None each) and the classes given (see predict_prepared) -> one Prediction each:
        decided with the class's operating point, the map and mask in the image's own geometry. pair_maps: the
        infrared images' maps of RGB + infrared pairs ([B, n, n])."""
        out = []
        for k, (amap, score, (w, h), match, name) in enumerate(zip(amaps, scores, sizes, matches,
                                                                   classes or [None] * len(sizes))):
            full, seen = uncrop(amap, w, h, self.image_size, self.crop_size)
            match = None if name is not None else match
            name = name or (match.class_name if match else self.class_name)
            point = self.point(name) if name is not None else self.default
            anomalous = score >= point.threshold
            out.append(Prediction(score=score, is_anomalous=anomalous, threshold=point.threshold,
                                  normalized_score=th.normalize(score, point.threshold, point.normal_min),
                                  anomaly_map=full, seen=seen, mask_threshold=point.mask_threshold,
                                  mask=anomalous & seen & (np.nan_to_num(full) >= point.mask_threshold),
                                  class_name=name, class_match=match, pair_map=None if pair_maps is None else
                                  uncrop(pair_maps[k], w, h, self.image_size, self.crop_size)[0]))
        return out

    def predict(self, images: list, classes: list[str | None] | None = None) -> list[Prediction]:
        """Several images in one batch (classes: see predict_prepared)."""
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and
                                                                    images.ndim < 4):
            raise InputError(f"predict() takes a list of images, not a {type(images).__name__}; for one image "
                             f"call the detector itself: detector(image)")
        if len(images) == 0:
            raise InputError("predict() was given an empty list; pass a list of one image or more")
        prepared = [self.prepare(im) for im in images]
        return self.predict_prepared(np.stack([p[0] for p in prepared]), [p[1] for p in prepared], classes)

    def __call__(self, image) -> Prediction:
        return self.predict([image])[0]
