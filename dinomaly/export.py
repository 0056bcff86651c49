"""Export a trained run to ONNX: the whole map computation in one graph, for deployment without PyTorch (the
export command, `export.py`, `dinomaly-export`; its flags and the graph's inputs and outputs are described in
cli.EXPORT_HELP)."""
import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import class_finder
from . import thresholds as th
from .anomaly_map import MAP_SIZE, AnomalyMapper
from .dataset import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError
from .predict import check_settings, load_calibration, load_mapper, run_files
from .run import log

OPSET = 17
MISSING = ("ONNX export needs onnx and onnxruntime: pip install -r requirements-export.txt (in a clone) or "
           "pip install 'dinomaly[export]'")


class ExportedMapper(nn.Module):
    """[B, 3, crop, crop] RGB in [0, 1] -> (smoothed map [B, 1, 256, 256], score [B]); with the class prototypes
    [C, F] (class_finder) also the nearest class's index [B] and its distance [B], as class_finder.classify."""

    def __init__(self, mapper: AnomalyMapper, prototypes: torch.Tensor | None = None):
        super().__init__()
        self.mapper = mapper
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("prototypes", None if prototypes is None else prototypes.float())

    def outputs(self) -> list[str]:
        return ["anomaly_map", "score"] + (["class_index", "class_distance"] if self.prototypes is not None else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image - self.mean) / self.std
        if self.prototypes is None:
            return self.mapper(x)
        amap, score, features = self.mapper(x, features=True)
        distance, index = (1 - features @ self.prototypes.T).min(dim=1)
        return amap, score, index, distance


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
    """torch.onnx's TorchScript exporter (no onnxscript needed): dynamic batch, opset OPSET."""
    dummy = torch.rand(1, 3, crop_size, crop_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter notices about constants: expected here
        torch.onnx.export(model, (dummy,), path, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=model.outputs(),
                          dynamic_axes={name: {0: "batch"} for name in ["image", *model.outputs()]})


def max_difference(model: ExportedMapper, path: str, crop_size: int, batch: int = 2) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs on `batch` random images."""
    import onnxruntime
    x = torch.rand(batch, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(model.outputs(), {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


OUTPUT_SHAPES = {"anomaly_map": ["batch", 1, MAP_SIZE, MAP_SIZE], "score": ["batch"], "class_index": ["batch"],
                 "class_distance": ["batch"]}


def annotate(path: str, metadata: dict):
    """Store `metadata` (JSON values) in the ONNX file, and declare the outputs' shapes (OUTPUT_SHAPES): the
    exporter's shape inference names some fixed dimensions as dynamic ones."""
    import onnx
    proto = onnx.load(path)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in OUTPUT_SHAPES[output.name]:
            dims.add(**({"dim_param": size} if isinstance(size, str) else {"dim_value": size}))
    onnx.save(proto, path)


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


@dataclass(frozen=True)
class ExportOptions:
    """The export command's flags (cli.export_parser)."""
    checkpoint: str
    out: str
    seg_checkpoint: str | None = None
    thresholds: str | None = None
    check_batch: int = 2


def main(options: ExportOptions):
    """The export command: the run's map computation into one ONNX file, checked against PyTorch."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(MISSING) from None
    check_out(options.out)
    model_path, seg_path = run_files(options.checkpoint, options.seg_checkpoint)
    calibration, calib_path = load_calibration(model_path, seg_path is not None, options.thresholds)
    mapper, recipe = load_mapper(model_path, seg_path, torch.device("cpu"), {}, {}, calibration)
    if recipe.modality != "rgb":
        raise UserError(f"{model_path} is a model of {recipe.modality} inputs (pairs of two modalities), whose ONNX "
                        f"export with two inputs is not written yet; use predict.py or the Detector")
    crop = recipe.crop_size
    exported = for_export(mapper, crop)
    if calibration:
        check_settings(exported, calibration, calib_path, model_path)
    prototypes = class_finder.load(os.path.join(os.path.dirname(os.path.abspath(model_path)), class_finder.FILE))
    if prototypes is not None and len(prototypes["classes"]) < 2:
        prototypes = None  # a one-class run: nothing to find
    model = ExportedMapper(exported, None if prototypes is None else prototypes["prototypes"]).eval()
    export_onnx(model, crop, options.out)
    entry = calibration["all"] if calibration else None
    classes = {name: levels(c) for name, c in (calibration or {}).get("classes", {}).items()}
    scoring = exported.scoring_settings()
    finding = {} if prototypes is None else dict(classes=prototypes["classes"], class_far=class_finder.FAR,
                                                 class_radius=prototypes["radius"].tolist())
    annotate(options.out, dict(image_size=recipe.image_size, crop_size=crop, max_ratio=scoring["max_ratio"],
                            map=scoring["map"], **levels(entry), color_range=entry["color_range"] if entry else None,
                            class_thresholds=classes, **finding))
    diff = max_difference(model, options.out, crop, options.check_batch)
    found = ", class_index [B], class_distance [B]" if prototypes is not None else ""
    log.info(f"wrote {options.out}: image [B, 3, {crop}, {crop}] RGB in [0, 1] -> anomaly_map [B, 1, 256, 256], "
             f"score [B]{found}; onnxruntime vs PyTorch on {options.check_batch} random images: max difference "
             f"{diff:.2g}")
    if diff > 1e-3:
        log.warning(f"warning: the ONNX model differs from PyTorch by {diff:.2g}; check the onnxruntime version")
