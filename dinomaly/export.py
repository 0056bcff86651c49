"""Export a trained run to ONNX or OpenVINO: the whole map computation in one graph, for deployment without
PyTorch, in fp32, fp16 or INT8 (quantize.py), checked against PyTorch on the run's own test images (the export
command, `export.py`, `dinomaly-export`; its flags and the graph's inputs and outputs are described in
cli.EXPORT_HELP; exported.py runs the files).
"""
import copy
import csv
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import __version__, class_finder, exported, modalities, quantize
from . import thresholds as th
from .anomaly_map import MAP_SIZE, AnomalyMapper
from .dataset import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError
from .images import unit_range
from .checkpoint_detector import check_settings, fitting, load_calibration, load_mapper, run_files
from .run import log
from .scoring import pair_input

OPSET = 17
MISSING = ("{what} needs {packages}: pip install -r requirements-export.txt (in a clone) or pip install "
           "'dinomaly[{extra}]'")
NEEDS = {("onnx", "fp32"): ["onnx", "onnxruntime"], ("onnx", "fp16"): ["onnx", "onnxruntime"],
         ("onnx", "int8"): ["onnx", "onnxruntime"], ("openvino", "fp32"): ["onnx", "onnxruntime", "openvino"],
         ("openvino", "fp16"): ["onnx", "onnxruntime", "openvino"],
         ("openvino", "int8"): ["onnx", "onnxruntime", "openvino", "nncf"]}
FP32_TOLERANCE = 1e-4  # largest |exported - PyTorch| score of an fp32 export
ON_THRESHOLD = 1e-5  # a score within this share of its threshold lies on it (float rounding decides)


PAIR_LAYOUTS = {"rgbd": "MVTec 3D-AD's <kind>/rgb/<n>.png beside <kind>/xyz/ or z/",
                "rgbir": "MulSen-AD's .../RGB/.../<n>.png beside .../Infrared/.../<n>.png"}


def input_names(modality: str) -> list[str]:
    """The graph's inputs: `image`, or for a model of pairs `rgb` and `depth` or `infrared`."""
    return ["image"] if modality == "rgb" else ["rgb", modalities.PAIR_KINDS[modality]]


class ExportedMapper(nn.Module):
    """[B, 3, crop, crop] RGB in [0, 1] -> (smoothed map [B, 1, 256, 256], score [B]); with the class prototypes
    [C, F] (class_finder) also the nearest class's index [B], its distance [B] and the distances to every class
    [B, C] (1 - cosine), as class_finder.classify.

    A model of pairs (`modality` "rgbd" or "rgbir", see modalities.py) takes two such images, the RGB image and
    the other modality's (the coloured depth, or the infrared image): "rgbd" gives the fused map and score as
    for one image; "rgbir" gives the RGB image's map as anomaly_map, the infrared image's as infrared_map, and
    the pair's score, the mean of the two images' (as evaluated); the class is found from both images
    (anomaly_map.pooled_features)."""

    def __init__(self, mapper: AnomalyMapper, prototypes: torch.Tensor | None = None, modality: str = "rgb"):
        super().__init__()
        self.mapper, self.modality = mapper, modality
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("prototypes", None if prototypes is None else prototypes.float())

    def inputs(self) -> list[str]:
        return input_names(self.modality)

    def outputs(self) -> list[str]:
        return ["anomaly_map", "score"] + (["infrared_map"] if self.modality == "rgbir" else []) + \
            (["class_index", "class_distance", "class_distances"] if self.prototypes is not None else [])

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = torch.cat([(image - self.mean) / self.std for image in images], dim=1)
        amap, score, *features = self.mapper(x, features=self.prototypes is not None)
        second = ()
        if self.modality == "rgbir":  # [RGB images, infrared images] (models/vitill.py): split per modality
            amap, score = amap.unflatten(0, (2, -1)), score.unflatten(0, (2, -1))
            amap, second, score = amap[0], (amap[1],), score.mean(dim=0)  # (features: one per pair already)
        if self.prototypes is None:
            return (amap, score) + second
        distances = 1 - features[0] @ self.prototypes.T
        distance, index = distances.min(dim=1)
        return (amap, score) + second + (index, distance, distances)


def levels(entry: dict | None) -> dict:
    """The metadata's thresholds of a thresholds.json entry: the image and pixel thresholds and the masks' level
    (thresholds.mask_level); None where there is none."""
    image = entry["image"]["threshold"] if entry else None
    pixel = entry["pixel"]["threshold"] if entry else None
    return dict(threshold=image, pixel_threshold=pixel,
                mask_threshold=None if image is None else th.mask_level(pixel, image))


def for_export(mapper: AnomalyMapper, crop_size: int) -> AnomalyMapper:
    """A copy of the mapper that traces to a static graph: a learned position embedding already interpolated to
    the crop's patch grid (the same values the model computes at run time), CRR's random masking off."""
    mapper = copy.deepcopy(mapper).cpu().eval()
    encoder = mapper.model.encoder
    grid = crop_size // encoder.cfg.patch_size
    encoder.fix_grid(grid, grid)
    if mapper.model.test_mask == "on":
        log.info("CRR test-time masking is random: exported with masking off")
        mapper.model.mask_in_eval = False
    return mapper


def export_onnx(model: ExportedMapper, crop_size: int, path: str):
    """torch.onnx's TorchScript exporter (no onnxscript needed): dynamic batch, opset OPSET; one input
    [B, 3, crop, crop] per image of a sample (ExportedMapper.inputs)."""
    dummy = tuple(torch.rand(1, 3, crop_size, crop_size) for _ in model.inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter notices about constants: expected here
        torch.onnx.export(model, dummy, path, dynamo=False, opset_version=OPSET, input_names=model.inputs(),
                          output_names=model.outputs(),
                          dynamic_axes={name: {0: "batch"} for name in [*model.inputs(), *model.outputs()]})


OUTPUT_SHAPES = {"anomaly_map": ["batch", 1, MAP_SIZE, MAP_SIZE], "infrared_map": ["batch", 1, MAP_SIZE, MAP_SIZE],
                 "score": ["batch"], "class_index": ["batch"], "class_distance": ["batch"],
                 "class_distances": ["batch", "classes"]}


def annotate(path: str, metadata: dict):
    """Store `metadata` (JSON values) in the ONNX file, and declare the outputs' shapes (OUTPUT_SHAPES): the
    exporter's shape inference names some fixed dimensions as dynamic ones."""
    import onnx
    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in OUTPUT_SHAPES[output.name]:
            if size == "classes":
                size = len(metadata["classes"])
            dims.add(**({"dim_param": size} if isinstance(size, str) else {"dim_value": size}))
    onnx.save(proto, path)


def write_onnx(model: ExportedMapper, crop: int, path: str, precision: str, metadata: dict, work: str,
               int8: quantize.Int8 | None = None):
    """The ONNX file at `path` in `precision` (quantize.py), with `metadata` (and for int8 the blocks kept in
    float, as int8_float_layers)."""
    plain = os.path.join(work, "fp32.onnx")
    export_onnx(model, crop, plain)
    if precision == "fp16":
        quantize.onnx_fp16(plain, os.path.join(work, "out.onnx"))
    elif precision == "int8":
        selection = quantize.onnx_int8(plain, os.path.join(work, "out.onnx"), int8)
        metadata = {**metadata, "int8_float_layers": selection.metadata()}
    else:
        shutil.copyfile(plain, os.path.join(work, "out.onnx"))
    annotate(os.path.join(work, "out.onnx"), metadata)
    shutil.move(os.path.join(work, "out.onnx"), path)


def write_openvino(model: ExportedMapper, crop: int, path: str, precision: str, metadata: dict, work: str,
                   int8: quantize.Int8 | None = None):
    """The OpenVINO IR at `path` (.xml, and its .bin beside) in `precision`, converted from the ONNX graph by
    OpenVINO's own converter (its PyTorch front end lacks aten::cosine_similarity), with `metadata` in its
    rt_info (and for int8 the blocks kept in float, as int8_float_layers). Core.read_model (its ONNX front end)
    converts, not ov.convert_model, which sends usage telemetry to Google Analytics unless the user opted out."""
    ov = exported.import_openvino()
    plain = os.path.join(work, "fp32.onnx")
    export_onnx(model, crop, plain)
    ov_model = ov.Core().read_model(plain)
    if precision == "int8":
        ov_model, selection = quantize.openvino_int8(ov_model, int8)
        metadata = {**metadata, "int8_float_layers": selection.metadata()}
    for key, value in metadata.items():
        ov_model.set_rt_info(json.dumps(value), [exported.NAMESPACE, key])
    staged = os.path.join(work, "model.xml")
    ov.save_model(ov_model, staged, compress_to_fp16=precision == "fp16")
    shutil.move(os.path.join(work, "model.bin"), os.path.splitext(path)[0] + ".bin")
    shutil.move(staged, path)


def check_out(out: str):
    """--out must name a file in a writable folder (checked before the model is loaded)."""
    out_dir = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; pass a file name, e.g. {os.path.join(out, 'model.onnx')}")
    if not os.path.isdir(out_dir):
        raise UserError(f"folder not found: {out_dir}; create it or pass another --out")
    if not os.access(out_dir, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise UserError(f"cannot write {out} (permission denied); pass another --out")
    try:  # what access() cannot tell (a read-only or special file system such as /proc, a full quota)
        tempfile.NamedTemporaryFile(dir=out_dir, prefix=".export-check-").close()
    except OSError as e:
        raise UserError(f"cannot create a file in {out_dir} ({e.strerror or e}) to write {out}; pass another "
                        f"--out") from None


def output_format(options: "ExportOptions") -> str:
    """--format, else the one --out's suffix names, else ONNX; they must agree."""
    named = exported.format_of(options.out)
    fmt = options.format or named or "onnx"
    if named not in (None, fmt):
        suffix = {"onnx": ".onnx", "openvino": ".xml"}[fmt]
        raise UserError(f"--format {fmt} writes a {suffix} file, but --out is {options.out}; pass --out "
                        f"{os.path.splitext(options.out)[0]}{suffix}")
    return fmt


def require(fmt: str, precision: str):
    """A one-line error naming what to install when a package the export needs is missing (found, not imported:
    OpenVINO and NNCF are imported later with their telemetry off)."""
    for package in NEEDS[(fmt, precision)]:
        if importlib.util.find_spec(package) is None:
            names = " and ".join(NEEDS[(fmt, precision)])
            extra = "openvino" if fmt == "openvino" else "export"
            what = f"{'OpenVINO' if fmt == 'openvino' else 'ONNX'} {precision} export"
            raise UserError(MISSING.format(what=what, packages=names, extra=extra))


# ----------------------------------------------------------------------------------------------- the check

def check_images(run_dir: str, count: int, seed: int) -> list[dict]:
    """At most `count` images of the run's scores.csv (its test images, or its held-out good images) that are
    still there, a seeded subset: {"class", "path", "label"} each; [] without."""
    path = os.path.join(run_dir, "scores.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = [dict(cls=r["class"], path=r["image_path"], label=int(r["label"])) for r in csv.DictReader(f)
                if os.path.isfile(r.get("image_path", ""))]
    if len(rows) > count:
        pick = np.random.default_rng(seed).choice(len(rows), count, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    return rows


def sample_crops(paths: list[str], modality: str, image_size: int, crop: int) -> list[np.ndarray]:
    """Image files -> the exported graph's inputs, [1, 3, crop, crop] float32 RGB in [0, 1] each; for a model of
    pairs each file is a pair's RGB image in its dataset's layout, its other image found beside it and prepared
    as predict.py does (predict.pair_input), -> [1, 6, crop, crop]: both inputs one after the other."""
    if modality == "rgb":
        return quantize.crops(paths, image_size, crop)
    return [unit_range(pair_input(p, modality, image_size, crop)[0])[None] for p in paths]


def graph_feeds(crops: list[np.ndarray], modality: str) -> list:
    """sample_crops -> what the graph runs on: the arrays, or for a graph of pairs {input name: array} each."""
    if modality == "rgb":
        return crops
    return [dict(zip(input_names(modality), np.split(x, 2, axis=1))) for x in crops]


def pair_images(paths: list[str], modality: str) -> list[str]:
    """The RGB images of pairs among image files (modalities.is_pair_image); all of them for an RGB model."""
    if modality == "rgb":
        return paths
    return [p for p in paths if modalities.is_pair_image(p, modalities.PAIR_KINDS[modality])]


def run_both(model: ExportedMapper, graph: exported.Graph, images: np.ndarray, batch: int) -> tuple[dict, dict]:
    """The outputs of PyTorch and of the exported graph on images [N, 3 per input, crop, crop] in [0, 1], by
    batches."""
    want, got = {}, {}
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        with torch.no_grad():
            for name, value in zip(model.outputs(), model(*torch.from_numpy(x).split(3, dim=1))):
                want.setdefault(name, []).append(value.numpy())
        for name, value in graph(x).items():
            got.setdefault(name, []).append(value)
    return ({k: np.concatenate(v) for k, v in want.items()}, {k: np.concatenate(v) for k, v in got.items()})


def image_auroc(labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> float | None:
    """The mean over classes (those with good and defective images) of the image AUROC."""
    from sklearn.metrics import roc_auc_score
    values = [roc_auc_score(labels[m], scores[m]) for c in dict.fromkeys(classes)
              for m in [np.array([k == c for k in classes])] if 0 < labels[m].sum() < m.sum()]
    return float(np.mean(values)) if values else None


def check(model: ExportedMapper, path: str, fmt: str, precision: str, rows: list[dict], calibration: dict | None,
          image_size: int, crop: int, batch: int) -> dict:
    """The exported file against PyTorch on the run's images `rows` (random images without), the report logged;
    for fp32 a UserError when a score differs by more than FP32_TOLERANCE. Returns the figures."""
    graph = exported.Graph(path, fmt=fmt)
    kind = "images" if model.modality == "rgb" else "pairs"
    if rows:
        images = np.concatenate(sample_crops([r["path"] for r in rows], model.modality, image_size, crop))
        what = f"{len(rows)} {kind} of the run's scores.csv"
    else:
        images = torch.rand(max(batch, 2), 3 * len(model.inputs()), crop, crop,
                            generator=torch.Generator().manual_seed(0)).numpy()
        what = f"{len(images)} random {kind} (the run's scores.csv lists no image that is still there)"
    want, got = run_both(model, graph, images, batch)
    score_gap = float(np.abs(got["score"] - want["score"]).max())
    map_gap = max(float(np.abs(got[k] - want[k]).max()) for k in ("anomaly_map", "infrared_map") if k in want)
    figures = dict(images=len(images), score_difference=score_gap, map_difference=map_gap,
                   relative_score_difference=float((np.abs(got["score"] - want["score"]) /
                                                    np.abs(want["score"]).clip(1e-12)).max()))
    if "class_index" in want:
        figures["class_changes"] = int((got["class_index"] != want["class_index"]).sum())
    log.info(f"{fmt} {precision} against PyTorch on {what}: largest score difference {score_gap:.3g} "
             f"({figures['relative_score_difference']:.2%} of the score), largest map difference {map_gap:.3g}"
             + (f", classes found differently {figures['class_changes']}" if "class_changes" in figures else ""))
    if rows:
        figures.update(decisions(rows, want["score"], got["score"], calibration))
    if precision == "fp32" and score_gap > FP32_TOLERANCE:
        raise UserError(f"the {fmt} fp32 export differs from PyTorch by {score_gap:.3g} in the score (more than "
                        f"{FP32_TOLERANCE:g}); not written; check the {exported.PACKAGES[fmt]} version")
    return figures


def decisions(rows: list[dict], want: np.ndarray, got: np.ndarray, calibration: dict | None) -> dict:
    """The change of image AUROC and of the decisions (each image with its class's threshold) on the rows."""
    labels, classes = np.array([r["label"] for r in rows]), [r["cls"] for r in rows]
    before, after = image_auroc(labels, want, classes), image_auroc(labels, got, classes)
    out = dict(auroc_pytorch=before, auroc_exported=after)
    auroc = "no image AUROC (no class with good and defective images)" if before is None else \
        f"image AUROC {before:.4f} -> {after:.4f}"
    if calibration is None:
        log.info(f"  {auroc}; no thresholds to decide with")
        return out
    limits = []
    for c in classes:
        entry = calibration["classes"].get(c) or calibration["all"]
        limits.append(entry["image"]["threshold"] if entry["image"]["threshold"] is not None else np.nan)
    limits = np.array(limits, dtype=float)
    decided = ~np.isnan(limits)
    flipped = ((want >= limits) != (got >= limits)) & decided
    # an F1-max threshold is a test image's score: that image flips with float rounding alone
    on_threshold = flipped & (np.abs(want - limits) <= ON_THRESHOLD * limits)
    changed, rounding = int(flipped.sum()), int(on_threshold.sum())
    margin = float(np.nanmax(np.abs(got - want) / limits)) if decided.any() else float("nan")
    out.update(decisions_changed=changed, decisions_on_threshold=rounding, decided=int(decided.sum()),
               largest_shift_of_threshold=margin)
    verdict = "the thresholds still hold" if changed == rounding else \
        "the thresholds do not hold for these images: check the decisions, or use fp32"
    on = f" ({rounding} of them scored on the threshold itself)" if rounding else ""
    log.info(f"  {auroc}; decisions with the run's thresholds: {changed} of {int(decided.sum())} changed{on}, "
             f"scores moved by up to {margin:.2%} of the threshold: {verdict}")
    return out


# ----------------------------------------------------------------------------------------------- the command

@dataclass(frozen=True)
class ExportOptions:
    """The export command's flags (cli.export_parser)."""
    checkpoint: str
    out: str
    format: str | None = None  # onnx or openvino; None: from --out's suffix
    precision: str = "fp32"
    seg_checkpoint: str | None = None
    thresholds: str | None = None
    check_batch: int = 2
    check_images: int = 100
    calibration_images: int = quantize.CALIBRATION_IMAGES
    calibration_data: str | None = None
    max_score_change: float = quantize.MAX_SCORE_CHANGE
    seed: int = 0


def metadata(model: ExportedMapper, recipe, calibration: dict | None, prototypes: dict | None, fmt: str,
             precision: str) -> dict:
    """What the exported file carries beside its graph (JSON values): sizes, normalisation, how the score is made,
    the thresholds (the summary keys of earlier exports, and the whole thresholds.json under "thresholds"), the
    class finding's classes and radii."""
    entry = calibration["all"] if calibration else None
    classes = {name: levels(c) for name, c in (calibration or {}).get("classes", {}).items()}
    scoring = model.mapper.scoring_settings()
    finding = {} if prototypes is None else dict(classes=prototypes["classes"], class_far=class_finder.FAR,
                                                 class_radius=prototypes["radius"].tolist())
    return {exported.MARK: 1, "dinomaly_version": __version__, "format": fmt, "precision": precision,
            "modality": model.modality, "inputs": model.inputs(), "image_size": recipe.image_size,
            "crop_size": recipe.crop_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "max_ratio": scoring["max_ratio"], "map": scoring["map"], **levels(entry),
            "color_range": entry["color_range"] if entry else None, "class_thresholds": classes,
            "thresholds": calibration, **finding}


def class_prototypes(run_dir: str, mapper: AnomalyMapper, crop_size: int) -> dict | None:
    """The run's class prototypes for the graph, checked to fit the model's features (checkpoint_detector.fitting,
    as a detector checks them); None without, or for a one-class run (nothing to find)."""
    prototypes = class_finder.load(os.path.join(run_dir, class_finder.FILE))
    if prototypes is None or len(prototypes["classes"]) < 2:
        return None
    return fitting(prototypes, mapper, crop_size)


def main(options: ExportOptions):
    """The export command: the run's map computation into one ONNX or OpenVINO file, checked against PyTorch."""
    fmt, precision = output_format(options), options.precision
    require(fmt, precision)
    check_out(options.out)
    model_path, seg_path = run_files(options.checkpoint, options.seg_checkpoint)
    run_dir = os.path.dirname(os.path.abspath(model_path))
    calibration, calib_path = load_calibration(model_path, seg_path is not None, options.thresholds)
    mapper, recipe = load_mapper(model_path, seg_path, torch.device("cpu"), {}, {}, calibration)
    crop, modality = recipe.crop_size, recipe.modality
    prototypes = class_prototypes(run_dir, mapper, crop)
    int8 = None
    if precision == "int8":  # the images first: a missing data folder stops at once
        calibrated = options.calibration_images if fmt == "openvino" else 0  # ONNX Runtime's INT8 is dynamic
        held, paths = (pair_images(p, modality) for p in quantize.training_images(
            run_dir, options.calibration_data, calibrated, options.seed))
        if not held or (calibrated and not paths):
            where = f"--calibration_data {options.calibration_data}" if options.calibration_data else \
                "the run's training data"
            raise UserError(f"{where} holds too few pairs of this run's {modality} layout "
                            f"({PAIR_LAYOUTS[modality]}) for an INT8 export (2 at least); pass --calibration_data "
                            f"DIR, a folder of such pairs")
        quantize.log_calibration(held, paths, options.calibration_data)
        int8 = quantize.Int8(*(graph_feeds(sample_crops(p, modality, recipe.image_size, crop), modality)
                               for p in (paths, held)), options.max_score_change)
    exported_mapper = for_export(mapper, crop)
    if calibration:
        check_settings(exported_mapper, calibration, calib_path, model_path)
    model = ExportedMapper(exported_mapper, None if prototypes is None else prototypes["prototypes"], modality).eval()
    meta = metadata(model, recipe, calibration, prototypes, fmt, precision)
    written = [options.out] + ([os.path.splitext(options.out)[0] + ".bin"] if fmt == "openvino" else [])
    with tempfile.TemporaryDirectory(prefix="export_", dir=os.path.dirname(os.path.abspath(options.out))) as work:
        if fmt == "onnx":
            write_onnx(model, crop, options.out, precision, meta, work, int8)
        else:
            write_openvino(model, crop, options.out, precision, meta, work, int8)
    rows = check_images(run_dir, options.check_images, options.seed)
    try:
        check(model, options.out, fmt, precision, rows, calibration, recipe.image_size, crop, options.check_batch)
    except UserError:
        for f in written:
            os.remove(f)
        raise
    found = ", class_index [B], class_distance [B], class_distances [B, C]" if prototypes is not None else ""
    second = ", infrared_map [B, 1, 256, 256]" if modality == "rgbir" else ""
    given = " and ".join(f"{name} [B, 3, {crop}, {crop}]" for name in model.inputs())
    log.info(f"wrote {' and '.join(written)} ({fmt} {precision}): {given} RGB in [0, 1] -> anomaly_map "
             f"[B, 1, 256, 256], score [B]{second}{found}")
