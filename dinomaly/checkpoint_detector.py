"""A trained run's checkpoint run by PyTorch: `ModelDetector` (a run's one model: model.pth and, for CRR, its
segmentation network) and `PerClassDetector` (a run with one model per class). predict.Detector chooses one
for a run folder or a model.pth; what they share with an exported model (exported.py), the decision, the class,
the map and mask in the image's geometry, is scoring.Scoring.
"""
import os

import numpy as np
import torch

from . import checkpoints, class_finder, models
from . import thresholds as th
from .anomaly_map import AnomalyMapper, check_max_ratio
from .errors import UserError
from .recipes import Recipe
from .run import log, resolve_device
from .scoring import OperatingPoint, Prediction, Scoring

SCORING_DEFAULTS = dict(max_ratio=0.01, fusion_alpha=0.7)  # without a thresholds.json that says otherwise


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


def fitting(prototypes: dict | None, mapper: AnomalyMapper, crop_size: int) -> dict | None:
    """`prototypes` (class_finder.load's, or None), refused at once with what to do when they do not fit the
    model's features (class_finder.check_width), rather than at each image."""
    if prototypes is not None:
        class_finder.check_width(prototypes, mapper.feature_width(crop_size))
    return prototypes


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
                            lambda: fitting(find_prototypes(calib_path, self.model_path), self.mapper, self.crop_size))

    @torch.no_grad()
    def predict_prepared(self, batch: np.ndarray | torch.Tensor, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        given = classes or [None] * len(sizes)
        batch = torch.as_tensor(batch)
        seeds = [models.mask_seed(x.numpy().tobytes()) for x in batch.cpu()] if self.masked else None
        find = self.prototypes is not None and None in given
        amaps, scores, *features = self.mapper(batch.to(self.device), seeds, features=find)
        pair_maps = None
        if self.modality == "rgbir":  # [RGB images, infrared images]: a pair's score is their mean (as evaluated)
            b = len(sizes)
            amaps, scores, pair_maps = amaps[:b], (scores[:b] + scores[b:]) / 2, amaps[b:, 0].cpu().numpy()
        matches = class_finder.classify(self.prototypes, features[0]) if features else [None] * len(sizes)
        return self.decide(amaps[:, 0].cpu().numpy(), scores.cpu().tolist(), sizes, matches, given, pair_maps)


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
        self.prototypes = fitting(self.prototypes, self.finder.mapper, self.finder.crop_size)
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
    def predict_prepared(self, batch: np.ndarray | torch.Tensor, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        given = classes or [None] * len(sizes)
        batch = torch.as_tensor(batch)
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
