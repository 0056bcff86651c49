"""Run a trained model on new images: `Detector(path)` (a score, a decision, a map and a mask for each image, in
the image's own geometry) and the predict command (`predict.py`, `dinomaly-predict`; its flags and outputs are
described in cli.PREDICT_HELP).

Neither imports PyTorch for an exported model (.onnx, .xml: exported.ExportedDetector, run by ONNX Runtime or
OpenVINO); a run folder or a model.pth loads it (checkpoint_detector.py). Both share scoring.Scoring.
"""
import csv
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import class_finder, image_files, images
from .errors import UserError
from .report import picture, write_png
from .run import log
from .scoring import Prediction, Scoring, pair_input
from .visualize import overlay_picture


def Detector(checkpoint: str, **options) -> Scoring:
    """A trained run, ready to score images: an exported.ExportedDetector for an exported model (.onnx, .xml;
    without PyTorch), a checkpoint_detector.PerClassDetector for a run with one model per class (--per_class),
    else a checkpoint_detector.ModelDetector. The keyword arguments are the predict command's flags
    (ModelDetector)."""
    from . import exported
    if exported.format_of(checkpoint) is not None:
        return exported.ExportedDetector(checkpoint, **options)
    try:
        from . import checkpoint_detector, checkpoints
    except ImportError as e:
        if (e.name or "").partition(".")[0] not in ("torch", "timm", "torchvision"):
            raise
        raise UserError(f"{checkpoint} is a run (a checkpoint): it needs PyTorch, and {e.name} is not installed "
                        f"here; pip install -r requirements.txt, or export the run (export.py --checkpoint "
                        f"{checkpoint} --out model.xml) and pass the .xml or .onnx") from None
    if checkpoints.class_models(checkpoint) is not None:
        return checkpoint_detector.PerClassDetector(checkpoint, **options)
    return checkpoint_detector.ModelDetector(checkpoint, **options)


# ----------------------------------------------------------------------------------------------- the command

def read_image(path: str, detector: Scoring) -> tuple[np.ndarray | None, np.ndarray | tuple | None, str | None]:
    """An --input file -> (its normalised crop, its RGB image as the model sees it (uint8), None), or (None, None,
    why it cannot be read). A pair model's file is the RGB image of a pair, its other modality found beside it:
    its two images (pair_input) instead of one."""
    try:
        if detector.modality != "rgb":
            x, _, pair = pair_input(path, detector.modality, detector.image_size, detector.crop_size)
            return x, pair, None
        rgb = images.load_image(path, upright=True, where="--input")
    except UserError as e:
        return None, None, str(e)
    return images.prepare(rgb, detector.image_size, detector.crop_size), np.asarray(rgb), None


def read_batches(paths: list[str], detector: Scoring, batch_size: int, workers: int):
    """read_image of every path, batch_size at a time: lists of (index, crop, RGB image, error). `workers` threads
    read up to two batches ahead of the one being scored (image decoding and resizing run outside Python's
    lock); 0: read in this thread, one batch at a time."""
    def read(i: int):
        return (i, *read_image(paths[i], detector))

    batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    if workers == 0:
        for batch in batches:
            yield [read(i) for i in batch]
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for batch in batches:
            pending.append([pool.submit(read, i) for i in batch])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


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


def overlay(rgb: np.ndarray | tuple[np.ndarray, np.ndarray], p: Prediction, detector: Scoring) -> np.ndarray:
    """The picture of one prediction (visualize.overlay_picture): the map over the image on its class's colour
    scale, the mask outlined, the decision as its caption. `rgb`: the image, or a pair's two images (pair_input):
    each with its map (an RGB + depth pair's one map on both)."""
    verdict = "ANOMALOUS" if p.is_anomalous else "normal"
    found = f"  [{p.class_name} {p.class_match.confidence:.2f}]" if p.class_match else ""
    caption = f"{verdict}  score {p.score:.4g} {'>=' if p.is_anomalous else '<'} {p.threshold:.4g}{found}"
    marks = {"threshold": p.threshold} if p.mask_threshold == p.threshold else \
        {"threshold": p.threshold, "mask level": p.mask_threshold}
    second = None
    if isinstance(rgb, tuple):
        rgb, image = rgb
        if p.pair_map is None:  # RGB + depth: the pair's one map over both
            second = "RGB image: the pair's map", "depth (grey): the pair's map", image, p.anomaly_map, p.mask
        else:
            mask = p.is_anomalous & p.seen & (np.nan_to_num(p.pair_map) >= p.mask_threshold)
            second = "RGB image: its map", "infrared image: its map", image, p.pair_map, mask
            caption = caption.replace(" >=", " (mean of both) >=").replace(" <", " (mean of both) <")
    return overlay_picture(rgb, p.anomaly_map, p.seen, p.mask, detector.point(p.class_name).color_range, caption,
                           p.is_anomalous, marks, second)


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
        from . import modalities
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
        for batch in read_batches(paths, detector, options.batch_size, options.num_workers):
            for i, _, _, error in [b for b in batch if b[3] is not None]:
                log.warning(f"skipped {paths[i]}: {error}")
                skipped += 1
            good = [b for b in batch if b[3] is None]
            if good:
                firsts = [b[2][0] if isinstance(b[2], tuple) else b[2] for b in good]  # a pair's RGB image
                preds = detector.predict_prepared(np.stack([b[1] for b in good]),
                                                  [(a.shape[1], a.shape[0]) for a in firsts])
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
