"""Run a trained model on new images: `Detector(run)` (a ModelDetector, or a PerClassDetector for a run with one
model per class: a score, a decision, a map and a mask for each image, in the image's own geometry) and the
predict command (`predict.py`, `dinomaly-predict`; its flags and outputs are described in cli.PREDICT_HELP)."""
import csv
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import checkpoints, class_finder, image_files, modalities, models
from . import dataset as ds
from . import thresholds as th
from .anomaly_map import AnomalyMapper, check_max_ratio
from .errors import InputError, UserError
from .recipes import Recipe
from .report import picture, write_png
from .run import log, resolve_device
from .visualize import overlay_picture

SCORING_DEFAULTS = dict(max_ratio=0.01, fusion_alpha=0.7)  # without a thresholds.json that says otherwise


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
    top = ds.center_crop_box(image_size, crop_size)[0]

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


# ----------------------------------------------------------------------------------------------- the detector

IMAGE_FORMS = ("a path, a PIL image or a numpy array: H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), of uint8, "
               "uint16, bool, or float in [0, 1] or [0, 255]")


def as_rgb(image) -> Image.Image:
    """The one check and conversion of what a detector is given (IMAGE_FORMS) -> 8-bit RGB PIL image. A file or a
    PIL image is turned upright by its EXIF orientation (as viewers show it; the training and evaluation readers
    keep the reference's pixels as stored). Anything else is an InputError naming it and the expected form."""
    if isinstance(image, (str, os.PathLike)):
        return ds.load_image(os.fspath(image), upright=True, where="the path")
    if isinstance(image, np.ndarray):
        image = array_image(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"cannot use a {type(image).__name__} as an image; pass {IMAGE_FORMS}")
    return ds.to_rgb(ImageOps.exif_transpose(image))


def array_image(a: np.ndarray) -> Image.Image:
    """A numpy array (IMAGE_FORMS) -> PIL image, checked: shape, channels, type, finite values and range. Floats
    are read as [0, 1] when they all fit there, else as 0..255; uint16 as 0..65535."""
    def refuse(problem: str):
        raise InputError(f"cannot use an array of shape {a.shape} and type {a.dtype} as an image ({problem}); "
                         f"pass {IMAGE_FORMS.split(': ', 1)[1]}")

    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        refuse(f"{a.ndim} dimension{'s' * (a.ndim != 1)}")
    if a.ndim == 3 and a.shape[2] not in (3, 4):
        refuse(f"{a.shape[2]} channels")
    if a.size == 0:
        refuse("it is empty")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a * (255 / 65535) + 0.5).astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            refuse(f"values from {a.min()} to {a.max()}: integers other than uint16 must lie in 0..255")
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            refuse(f"{bad} of its values are NaN or infinite")
        if a.min() < 0 or a.max() > 255:
            refuse(f"values from {a.min():g} to {a.max():g}, outside [0, 255]")
        a = (a.astype(np.float64) * (255.0 if a.max() <= 1 else 1.0) + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        refuse("not a number type")
    return Image.fromarray(np.ascontiguousarray(a))


def run_files(checkpoint: str, seg_checkpoint: str | None) -> tuple[str, str | None]:
    """(model.pth, the segmentation network or None): --seg_checkpoint, else the run folder's
    Seg_model_7999.pth or Seg_model_last.pth when there is one (a CRR run)."""
    path = checkpoints.checkpoint_file(checkpoint)
    if seg_checkpoint is None:
        seg_checkpoint = checkpoints.segmentation_file(os.path.dirname(os.path.abspath(path)))
    return path, seg_checkpoint


def load_calibration(model_path: str, fused: bool, path: str | None = None) -> tuple[dict | None, str]:
    """(thresholds.json's content, its path): `path`, else the run folder's thresholds.json, or for a map
    without the segmentation network its thresholds_recon.json (CRR Stage I) when there is one. None when
    the run folder has none."""
    if path is not None:
        return th.load(path), path
    run_dir = os.path.dirname(os.path.abspath(model_path))
    recon = os.path.join(run_dir, "thresholds_recon.json")
    path = recon if not fused and os.path.isfile(recon) else os.path.join(run_dir, "thresholds.json")
    return (th.load(path) if os.path.isfile(path) else None), path


def load_mapper(path: str, seg_path: str | None, device: torch.device, given: dict, scoring: dict,
                calibration: dict | None) -> tuple[AnomalyMapper, Recipe]:
    """The model and, for CRR, the segmentation network, as an AnomalyMapper on `device`, and the model's recipe:
    the run's, with the recipe fields in `given` overriding it. max_ratio and fusion_alpha: `scoring`'s where
    not None, else those the thresholds were calibrated with, else the defaults."""
    saved = calibration["settings"] if calibration else {}
    scoring = {k: scoring[k] if scoring.get(k) is not None else saved.get(k, default)
               for k, default in SCORING_DEFAULTS.items()}
    check_max_ratio(scoring["max_ratio"])
    model, recipe = checkpoints.load_trained(path, given, "crr" if seg_path else "dinomaly")
    model = model.to(device)
    segnet = None
    if seg_path:
        checkpoints.check_segmentation_owner(os.path.dirname(os.path.abspath(seg_path)), model, path, seg_path)
        segnet = checkpoints.load_segmentation_net(seg_path, model.encoder.cfg.embed_dim).to(device).eval()
        log.info(f"loaded {seg_path}; map: {scoring['fusion_alpha']} * reconstruction + "
                 f"{1 - scoring['fusion_alpha']:.4g} * segmentation")
    return AnomalyMapper(model, segnet, scoring["fusion_alpha"], scoring["max_ratio"]), recipe


def check_settings(mapper: AnomalyMapper, calibration: dict, path: str, model_path: str):
    """One warning line naming the settings (AnomalyMapper.scoring_settings) that the thresholds in `path` were
    calibrated with and `mapper` does not use. Files written before test_mask was recorded: the run's own
    test_mask (its config.json) stands in."""
    saved = dict(calibration["settings"])
    if "test_mask" not in saved:
        saved["test_mask"] = checkpoints.saved_settings(model_path).get("test_mask")
    used = mapper.scoring_settings()
    relevant = dict(fusion_alpha=used["map"] == "fused", mask_ratio=saved["test_mask"] == used["test_mask"])
    other = [k for k, v in used.items() if saved.get(k) not in (None, v) and relevant.get(k, True)]
    if other:
        log.warning(f"warning: the thresholds in {path} were calibrated with "
                    f"{', '.join(f'{k} {saved[k]}' for k in other)}, these scores use "
                    f"{', '.join(f'{k} {used[k]}' for k in other)}: to match, evaluate the run so "
                    f"(crr_realiad_test.py, or the training script's --eval_only) into another --save_name and pass "
                    f"its thresholds file as --thresholds")


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


def find_prototypes(thresholds_path: str, model_path: str) -> dict | None:
    """The class prototypes beside the thresholds file, else beside the model; None (with a hint) without."""
    folders = dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in (thresholds_path, model_path))
    for folder in folders:
        data = class_finder.load(os.path.join(folder, class_finder.FILE))
        if data is not None:
            return data
    log.info(f"no {class_finder.FILE} in {' or '.join(folders)} (a run evaluated before class finding): every "
             f"image is decided with the all-classes threshold; evaluate the run again (the training script's "
             f"--eval_only, or crr_realiad_test.py) to find each image's class, or pass --class_name")
    return None


def Detector(checkpoint: str, **options) -> "ModelDetector | PerClassDetector":
    """A trained run, ready to score images: a PerClassDetector for a run with one model per class (--per_class),
    an exported.ExportedDetector for an exported model (.onnx, .xml), else a ModelDetector. The keyword arguments
    are the predict command's flags (ModelDetector)."""
    from . import exported
    if exported.format_of(checkpoint) is not None:
        return exported.ExportedDetector(checkpoint, **options)
    if checkpoints.class_models(checkpoint) is not None:
        return PerClassDetector(checkpoint, **options)
    return ModelDetector(checkpoint, **options)


PAIR_FORMS = {"rgbd": "an (image, depth) pair: the image as above, the depth a z map or a point cloud (a TIFF "
                      "file, or an array [H, W] or [H, W, 3] of the image's size), or the path of an image in "
                      "MVTec 3D-AD's layout (<kind>/rgb/<n>.png, its depth found beside it)",
              "rgbir": "an (image, infrared image) pair, each as above, or the path of an image in MulSen-AD's "
                       "layout (.../RGB/.../<n>.png, its infrared image found in .../Infrared/.../<n>.png)"}


def pair_input(item, modality: str, image_size: int, crop_size: int) -> tuple[torch.Tensor, tuple[int, int],
                                                                               np.ndarray]:
    """A pair of a two-modality model (PAIR_FORMS) -> (normalised crops [6, crop, crop], the pair's (width,
    height), its RGB image as the model sees it, uint8). Depth is prepared and coloured as in training
    (modalities.rgbd_from)."""
    kind = modalities.PAIR_KINDS[modality]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        first, second = item
    elif isinstance(item, (str, os.PathLike)):
        first, second = item, modalities.partner(os.fspath(item), kind)
    else:
        raise InputError(f"this run's model takes pairs ({modality}): cannot use a {type(item).__name__}; pass "
                         f"{PAIR_FORMS[modality]}")
    rgb = np.asarray(as_rgb(first))
    if kind == modalities.DEPTH:
        a, b = modalities.rgbd_from(rgb, second)
    else:
        a, b = rgb, np.asarray(as_rgb(second))
        if a.shape != b.shape:
            raise InputError(f"the infrared image ({b.shape[1]} x {b.shape[0]}) is not the size of its RGB image "
                             f"({a.shape[1]} x {a.shape[0]})")
    x = torch.cat([ds.transform(Image.fromarray(i), image_size, crop_size) for i in (a, b)])
    return x, (a.shape[1], a.shape[0]), a


class Scoring:
    """What every detector does with images: prepare them as the model sees them and predict in batches. A
    detector sets image_size, crop_size and (for a model of two modalities) modality, and implements
    predict_prepared."""
    image_size: int
    crop_size: int
    modality: str = "rgb"

    def prepare(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """An image (see as_rgb), or a pair for a model of two modalities (PAIR_FORMS) -> (normalised crop
        [3 or 6, crop, crop], its (width, height))."""
        if self.modality != "rgb":
            return pair_input(image, self.modality, self.image_size, self.crop_size)[:2]
        rgb = as_rgb(image)
        return ds.transform(rgb, self.image_size, self.crop_size), rgb.size

    def predict_prepared(self, batch: torch.Tensor, sizes: list[tuple[int, int]],
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
            log.info(f"each image is decided with the thresholds of its class, found by {class_finder.FILE} "
                     f"({', '.join(self.prototypes['classes'])}); --class_name C uses one class's thresholds")
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
               classes: list[str | None] | None = None) -> list[Prediction]:
        """Maps of the crops ([B, n, n]), their scores, their images' (width, height), the classes found
        (class_finder.Match, or None each) and the classes given (see predict_prepared) -> one Prediction each:
        decided with the class's operating point, the map and mask in the image's own geometry."""
        out = []
        for amap, score, (w, h), match, name in zip(amaps, scores, sizes, matches, classes or [None] * len(sizes)):
            full, seen = uncrop(amap, w, h, self.image_size, self.crop_size)
            match = None if name is not None else match
            name = name or (match.class_name if match else self.class_name)
            point = self.point(name) if name is not None else self.default
            anomalous = score >= point.threshold
            out.append(Prediction(score=score, is_anomalous=anomalous, threshold=point.threshold,
                                  normalized_score=th.normalize(score, point.threshold, point.normal_min),
                                  anomaly_map=full, seen=seen, mask_threshold=point.mask_threshold,
                                  mask=anomalous & seen & (np.nan_to_num(full) >= point.mask_threshold),
                                  class_name=name, class_match=match))
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
        return self.predict_prepared(torch.stack([p[0] for p in prepared]), [p[1] for p in prepared], classes)

    def __call__(self, image) -> Prediction:
        return self.predict([image])[0]


class ModelDetector(Scoring):
    """A run's one model, ready to score images. See the module docstring; the keyword arguments are the flags.

    threshold: the image threshold (default: thresholds.json's, of `class_name`, else of the class found for
    each image, else of all classes); thresholds: a thresholds.json other than the run folder's. The masks use
    thresholds.mask_level; pictures the colour scale of thresholds.color_range."""

    def __init__(self, checkpoint: str, *, seg_checkpoint: str | None = None, thresholds: str | None = None,
                 threshold: float | None = None, class_name: str | None = None, device: str | None = None,
                 max_ratio: float | None = None, fusion_alpha: float | None = None, image_size: int | None = None,
                 crop_size: int | None = None, test_mask: str | None = None, mask_ratio: float | None = None):
        if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
            raise UserError(f"--threshold {threshold} must be a positive number (scores are >= 0)")
        self.model_path, seg_path = run_files(checkpoint, seg_checkpoint)
        self.device = resolve_device(device)
        calibration, calib_path = load_calibration(self.model_path, seg_path is not None, thresholds)
        if calibration is not None:
            th.select(calibration, class_name, calib_path)  # an unknown --class_name before the model loads
        given = {k: v for k, v in dict(image_size=image_size, crop_size=crop_size, test_mask=test_mask,
                                       mask_ratio=mask_ratio).items() if v is not None}
        self.mapper, self.recipe = load_mapper(self.model_path, seg_path, self.device, given,
                                               dict(max_ratio=max_ratio, fusion_alpha=fusion_alpha), calibration)
        self.image_size, self.crop_size = self.recipe.image_size, self.recipe.crop_size
        self.modality = self.recipe.modality
        self.masked = self.mapper.model.test_mask == "on"
        if self.masked:  # CRR's test-time masking is random: each image's mask is seeded with a hash of its pixels
            self.mapper.model.mask_rng = "device"
            log.info("CRR test-time masking is on (the run's setting): each image's random mask is seeded by its "
                     "pixels, the same whatever its batch (evaluation drew other masks: scores differ from its "
                     "scores.csv by up to several percent); --test_mask off (Python: test_mask='off') turns it off")
        if calibration is not None:
            check_settings(self.mapper, calibration, calib_path, self.model_path)
        self.set_thresholds(calibration, calib_path, class_name, threshold,
                            lambda: find_prototypes(calib_path, self.model_path))

    @torch.no_grad()
    def predict_prepared(self, batch: torch.Tensor, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        given = classes or [None] * len(sizes)
        seeds = [models.mask_seed(x.numpy().tobytes()) for x in batch.cpu()] if self.masked else None
        find = self.prototypes is not None and None in given
        amaps, scores, *features = self.mapper(batch.to(self.device), seeds, features=find)
        if self.modality == "rgbir":  # [RGB images, infrared images]: a pair's score is their mean (as evaluated)
            b = len(sizes)
            amaps, scores, features = amaps[:b], (scores[:b] + scores[b:]) / 2, [f[:b] for f in features]
        matches = class_finder.classify(self.prototypes, features[0]) if features else [None] * len(sizes)
        return self.decide(amaps[:, 0].cpu().numpy(), scores.cpu().tolist(), sizes, matches, given)


class PerClassDetector(Scoring):
    """A run with one model per class (--per_class): each image goes to the model of its class, `class_name` or
    the one found with the run's class_prototypes.pt, and is decided with that class's thresholds. The models
    are loaded as their classes come up; they share one encoder (its weights are the same in every class's
    model: frozen, from the same file)."""

    def __init__(self, checkpoint: str, *, seg_checkpoint: str | None = None, thresholds: str | None = None,
                 class_name: str | None = None, **options):
        self.runs = checkpoints.class_models(checkpoint)
        if seg_checkpoint is not None or thresholds is not None:
            raise UserError(f"{checkpoint} holds one model per class: --seg_checkpoint and --thresholds name one "
                            f"model's files; pass one class's folder ({checkpoint}/<class>) to use them")
        if class_name is not None and class_name not in self.runs:
            raise UserError(f"no class named {class_name} in {checkpoint}; its classes: {', '.join(self.runs)}")
        self.options, self.members = options, {}
        self.classes, self.class_name = list(self.runs), class_name
        self.prototypes = None
        unfinished = not os.path.isfile(os.path.join(checkpoint, "metrics.csv"))  # written when every class is done
        if unfinished:
            log.warning(f"warning: {checkpoint} is an unfinished run ({len(self.runs)} class"
                        f"{'es' * (len(self.runs) != 1)} trained so far: {', '.join(self.runs)}); its training "
                        f"command with --resume finishes it")
        if class_name is None:
            self.prototypes = class_finder.load(os.path.join(checkpoint, class_finder.FILE))
            if self.prototypes is None:
                raise UserError(f"{checkpoint} holds one model per class and no {class_finder.FILE} to find each "
                                f"image's class{' (the run is unfinished: --resume finishes it)' * unfinished}; "
                                f"pass --class_name (one of {', '.join(self.runs)})")
        self.finder = self.member(class_name or self.classes[0])  # its encoder's features find the classes
        self.options["device"] = str(self.finder.device)  # the others go there too (one warning about a CPU)
        self.device, self.image_size, self.crop_size = self.finder.device, self.finder.image_size, \
            self.finder.crop_size
        self.modality = self.finder.modality  # the same in every class's model: one script trained them
        self.default = self.finder.default
        if self.prototypes is not None:
            log.info(f"each image goes to the model of its class, found by {class_finder.FILE} "
                     f"({', '.join(self.prototypes['classes'])}); --class_name C uses one class's thresholds")

    def member(self, class_name: str) -> ModelDetector:
        """The one-class detector of a class of the run, loaded on first use."""
        if class_name not in self.members:
            detector = ModelDetector(self.runs[class_name], **self.options)
            if self.members:
                shared, own = self.finder.mapper.model.encoder, detector.mapper.model.encoder
                same = all(torch.equal(a, b) for a, b in zip(shared.state_dict().values(),
                                                             own.state_dict().values()))
                if same and type(shared) is type(own):
                    detector.mapper.model.encoder = shared
            self.members[class_name] = detector
        return self.members[class_name]

    def point(self, class_name: str | None) -> OperatingPoint:
        return self.member(class_name).default if class_name in self.runs else self.default

    @torch.no_grad()
    def predict_prepared(self, batch: torch.Tensor, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        given = classes or [None] * len(sizes)
        unknown = [c for c in given if c is not None and c not in self.runs]
        if unknown:
            raise UserError(f"no class named {unknown[0]} in this run; its classes: {', '.join(self.runs)}")
        matches, names = [None] * len(sizes), [c or self.class_name for c in given]
        if self.prototypes is not None and None in names:
            features = self.finder.mapper.features(batch.to(self.device))  # the encoder alone
            found = class_finder.classify(self.prototypes, features)
            matches = [m if c is None else None for m, c in zip(found, given)]
            names = [c or m.class_name for m, c in zip(found, names)]
        out = [None] * len(sizes)
        for name in dict.fromkeys(names):
            index = [i for i, n in enumerate(names) if n == name]
            found = self.member(name).predict_prepared(batch[index], [sizes[i] for i in index])
            for i, p in zip(index, found):
                p.class_name, p.class_match = name, matches[i]
                out[i] = p
        return out


# ----------------------------------------------------------------------------------------------- the command

class ImageFiles(Dataset):
    """Image files -> (index, crop tensor or None, original RGB array or None, error message or None)."""

    def __init__(self, paths: list[str], detector: Scoring):
        self.paths, self.image_size, self.crop_size = paths, detector.image_size, detector.crop_size
        self.modality = detector.modality

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            if self.modality != "rgb":  # the RGB image of a pair, its other modality found beside it
                x, _, rgb = pair_input(self.paths[i], self.modality, self.image_size, self.crop_size)
                return i, x, rgb, None
            rgb = ds.load_image(self.paths[i], upright=True, where="--input")
        except UserError as e:
            return i, None, None, str(e)
        return i, ds.transform(rgb, self.image_size, self.crop_size), np.asarray(rgb), None


def output_names(paths: list[str]) -> list[str]:
    """One PNG name per image: its path below the images' common folder without the extension, '/' as '_'
    (so its stem when all are in one folder); with the extension ('.' as '_') where only that tells two
    apart; unique case-insensitively (for case-insensitive file systems)."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, common).replace(os.sep, "_") for a in absolute]
    stems = [os.path.splitext(r)[0] for r in rel]
    counts = Counter(s.lower() for s in stems)
    names, used = [], set()
    for r, stem in zip(rel, stems):
        name = base = stem if counts[stem.lower()] == 1 else r.replace(".", "_")
        k = 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def output_files(name: str) -> tuple[str, str]:
    """The overlay's and the mask's paths relative to --out."""
    return os.path.join("overlays", name + ".png"), os.path.join("masks", name + ".png")


def overlay(rgb: np.ndarray, p: Prediction, detector: Scoring) -> np.ndarray:
    """The picture of one prediction (visualize.overlay_picture): the map over the image on its class's colour
    scale, the mask outlined, the decision as its caption."""
    verdict = "ANOMALOUS" if p.is_anomalous else "normal"
    found = f"  [{p.class_name} {p.class_match.confidence:.2f}]" if p.class_match else ""
    caption = f"{verdict}  score {p.score:.4g} {'>=' if p.is_anomalous else '<'} {p.threshold:.4g}{found}"
    marks = {"threshold": p.threshold} if p.mask_threshold == p.threshold else \
        {"threshold": p.threshold, "mask level": p.mask_threshold}
    return overlay_picture(rgb, p.anomaly_map, p.seen, p.mask, detector.point(p.class_name).color_range, caption,
                           p.is_anomalous, marks)


def write_outputs(out: str, name: str, rgb: np.ndarray, p: Prediction, detector: Scoring):
    """overlays/<name>.png and masks/<name>.png (output_files)."""
    overlay_path, mask = (os.path.join(out, f) for f in output_files(name))
    try:
        Image.fromarray(p.mask.astype(np.uint8) * 255).save(mask)
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e}); pass a writable --out") from None
    picture(overlay_path, lambda: write_png(overlay_path, overlay(rgb, p, detector)))


@dataclass(frozen=True)
class PredictOptions:
    """The predict command's flags (cli.predict_parser)."""
    checkpoint: str
    input: list[str]
    out: str
    threshold: float | None = None
    class_name: str | None = None
    thresholds: str | None = None
    normalize: bool = False
    seg_checkpoint: str | None = None
    batch_size: int = 8
    num_workers: int = 0
    device: str | None = None
    image_size: int | None = None
    crop_size: int | None = None
    test_mask: str | None = None
    mask_ratio: float | None = None
    max_ratio: float | None = None
    fusion_alpha: float | None = None


def main(options: PredictOptions):
    """The predict command: every image of --input scored, decided and pictured into --out."""
    paths = image_files.find_images(options.input, skip_dir=options.out)  # before the model, which takes longer to load
    if not paths:
        raise UserError(f"every image given is inside --out {options.out}; pass other --input or --out")
    o = options
    detector = Detector(o.checkpoint, seg_checkpoint=o.seg_checkpoint, thresholds=o.thresholds,
                        threshold=o.threshold, class_name=o.class_name, device=o.device, max_ratio=o.max_ratio,
                        fusion_alpha=o.fusion_alpha, image_size=o.image_size, crop_size=o.crop_size,
                        test_mask=o.test_mask, mask_ratio=o.mask_ratio)
    if detector.modality != "rgb":  # a pair's RGB images only: its other modality is found beside each
        kind = modalities.PAIR_KINDS[detector.modality]
        pairs = [p for p in paths if modalities.is_pair_image(p, kind)]
        if not pairs:
            raise UserError(f"this run's model takes pairs ({detector.modality}) and none of the {len(paths)} "
                            f"files of --input is the RGB image of one: pass images in " +
                            ("rgb/ folders of MVTec 3D-AD's layout" if kind == modalities.DEPTH else
                             "RGB/ folders of MulSen-AD's layout"))
        log.info(f"{len(pairs)} pairs: their RGB images of the {len(paths)} files of --input, each with its "
                 f"{kind} found beside it")
        paths = pairs
    names = output_names(paths)
    guess = class_folder(paths, detector.classes)
    if options.class_name is None and options.threshold is None and detector.prototypes is None and guess is not None:
        log.info(f"the images all lie in a folder named {guess}, a class of this run: --class_name {guess} "
                 f"decides with that class's threshold (recommended) instead of all classes'")
    try:
        for sub in ("overlays", "masks"):
            os.makedirs(os.path.join(options.out, sub), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {options.out} ({e.strerror}); pass another --out") from None
    loader = DataLoader(ImageFiles(paths, detector), batch_size=options.batch_size, num_workers=options.num_workers,
                        collate_fn=list)
    rows, skipped = [], 0
    header = ["image_path", "score", "decision", "threshold", "overlay", "mask", "class", "class_confidence"]
    # rows are written (and flushed) batch by batch, before their pictures: a crash keeps the rows so far
    try:
        f = open(os.path.join(options.out, "predictions.csv"), "w", newline="", errors="backslashreplace")
    except OSError as e:
        raise UserError(f"cannot write into {options.out} ({e.strerror}); pass a writable --out") from None
    with f, tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True, disable=None) as bar:
        table = csv.writer(f)
        table.writerow(header + (["normalized_score"] if options.normalize else []))
        for batch in loader:
            for i, _, _, error in [b for b in batch if b[3] is not None]:
                log.warning(f"skipped {paths[i]}: {error}")
                skipped += 1
            good = [b for b in batch if b[3] is None]
            if good:
                preds = detector.predict_prepared(torch.stack([b[1] for b in good]),
                                                  [(b[2].shape[1], b[2].shape[0]) for b in good])
                new = [[paths[i], repr(p.score), "anomalous" if p.is_anomalous else "normal", repr(p.threshold),
                        *output_files(names[i]), p.class_name or "",
                        repr(p.class_match.confidence) if p.class_match else ""] +
                       ([repr(p.normalized_score)] if options.normalize else [])
                       for (i, _, _, _), p in zip(good, preds)]
                table.writerows(new)
                f.flush()
                rows += new
                for (i, _, rgb, _), p in zip(good, preds):
                    write_outputs(options.out, names[i], rgb, p, detector)
                    warn_unmatched(paths[i], p)
            bar.update(len(batch))
    if not rows:
        raise UserError(f"none of the {len(paths)} images could be read (see the lines above); check --input")
    n_bad = sum(r[2] == "anomalous" for r in rows)
    log.info(f"predicted {len(rows)} image{'s' * (len(rows) != 1)} ({n_bad} anomalous, {len(rows) - n_bad} normal; "
             f"{decided_by(detector, [r[6] for r in rows])}), skipped {skipped} unreadable; "
             f"predictions.csv, overlays/ and masks/ in {options.out}")


def decided_by(detector: Scoring, classes: list[str]) -> str:
    """Which thresholds decided: 'threshold T from SOURCE', or the classes found and how often."""
    if detector.prototypes is None:
        return f"threshold {detector.default.threshold:.6g} from {detector.default.source}"
    counts = Counter(classes)
    return "classes found: " + ", ".join(f"{c} {counts[c]}" for c in detector.prototypes["classes"] if counts[c])


def warn_unmatched(path: str, p: Prediction):
    """A warning for an image far from every class of the run (class_finder.Match.well False)."""
    m = p.class_match
    if m is not None and not m.well:
        log.warning(f"warning: {path} looks like no class of this run: the nearest, {m.class_name}, is at distance "
                    f"{m.distance:.3g}, more than {class_finder.FAR:g} x the farthest of its training images "
                    f"({m.radius:.3g}); decided with {m.class_name}'s thresholds, check it (or --class_name)")


def class_folder(paths: list[str], classes: list[str]) -> str | None:
    """The one calibrated class that names a folder above every path, if there is exactly one (and the run
    has several: one class's threshold is the all-classes one)."""
    found = [c for c in classes if all(c in os.path.abspath(p).split(os.sep)[:-1] for p in paths)]
    return found[0] if len(found) == 1 and len(classes) > 1 else None
