"""Lower precision for an exported graph (export.py --precision): fp16 and INT8, for ONNX Runtime and OpenVINO.

- ONNX fp16: weights and activations float16 (onnxruntime's converter), inputs and outputs float32.
- ONNX int8: ONNX Runtime's dynamic quantisation of the matrix products with a constant operand (MatMul, Gemm):
  int8 weights, activations quantised per batch at run time; no calibration.
- OpenVINO fp16: the weights stored as float16 (the CPU computes in float32, a GPU in float16).
- OpenVINO int8: NNCF post-training quantisation (static: activation ranges calibrated on the run's own good
  training images, a seeded subset), transformer preset.

Both INT8 paths keep in float what quantisation breaks (KEEP_FLOAT, found by measurement, see
docs/deployment.md): everything after the encoder and decoder features (the cosine map, its resizing, the
Gaussian smoothing, the top-1 % score and the class distances), where the map is a small difference between
two large feature vectors and int8 rounding of them would swamp it.
"""
import os

import numpy as np

from . import dataset as ds
from . import samples
from .errors import UserError
from .options import DataOptions
from .run import log

CALIBRATION_IMAGES = 300  # NNCF's default subset size
# Nodes of the exported graph (ONNX names, which OpenVINO keeps) left in float: those outside the encoder,
# bottleneck and decoder, i.e. not under /mapper/model/ (the map, smoothing, score) and the class distances.
KEEP_FLOAT = r"^(?!/mapper/model/).*"


def float_nodes(names: list[str]) -> list[str]:
    """The quantisable nodes of `names` that stay float (KEEP_FLOAT)."""
    import re
    return [n for n in names if re.match(KEEP_FLOAT, n)]


def onnx_fp16(src: str, dst: str):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)


def onnx_int8(src: str, dst: str):
    """ONNX Runtime's dynamic INT8 of MatMul and Gemm with a constant operand, the map's nodes kept float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    names = [n.name for n in onnx.load(src).graph.node if n.op_type in ("MatMul", "Gemm")]
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                     nodes_to_exclude=float_nodes(names), extra_options={"MatMulConstBOnly": True})


def openvino_int8(model, images: list[np.ndarray]):
    """NNCF's post-training INT8 of an OpenVINO model, calibrated on `images` ([1, 3, crop, crop] in [0, 1]
    each)."""
    import nncf
    names = [op.get_friendly_name() for op in model.get_ops()]
    keep = float_nodes(names)
    return nncf.quantize(model, nncf.Dataset(images), subset_size=len(images), model_type=nncf.ModelType.TRANSFORMER,
                         preset=nncf.QuantizationPreset.MIXED,
                         ignored_scope=nncf.IgnoredScope(names=keep, validate=False))


def training_images(run_dir: str, folder: str | None, count: int, seed: int) -> list[str]:
    """A seeded subset of at most `count` good training images: of `folder` (any good images), else the run's
    own (its config.json's data, split as in training)."""
    if folder is not None:
        paths = ds.find_images([folder])
    else:
        paths = run_training_images(run_dir)
    if len(paths) > count:
        pick = np.random.default_rng(seed).choice(len(paths), count, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    return paths


def run_training_images(run_dir: str) -> list[str]:
    """The good training images of the run in run_dir, from its config.json (the data it was trained on)."""
    import json
    path = os.path.join(run_dir, "config.json")
    fix = "pass --calibration_data DIR (a folder of good images of the run's parts)"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        raise UserError(f"INT8 calibration needs the run's training images, but {path} cannot be read; {fix}") \
            from None
    fields = {k: config[k] for k in DataOptions.__dataclass_fields__ if k in config}
    if fields.get("classes") is not None:
        fields["classes"] = tuple(fields["classes"])
    data = DataOptions(**fields)
    if not data.data_path or not os.path.isdir(data.data_path):
        raise UserError(f"INT8 calibration needs the run's training images, but its data folder {data.data_path} "
                        f"is not here; {fix}")
    out = []
    for name in ds.class_names(data.dataset, data.classes):
        out += [s.image_path for s in samples.split_training(data, config.get("seed", 1), name)[0]]
    if not out:
        raise UserError(f"no training images found in {data.data_path}; {fix}")
    return out


def crops(paths: list[str], image_size: int, crop_size: int) -> list[np.ndarray]:
    """Image files -> [1, 3, crop, crop] float32 RGB in [0, 1] each (the exported graph's input)."""
    box = ds.center_crop_box(image_size, crop_size)
    return [(np.asarray(ds.resize(ds.load_image(p), image_size).crop(box), np.float32).transpose(2, 0, 1) /
             255.0)[None] for p in paths]


def log_calibration(paths: list[str], folder: str | None):
    where = folder or "the run's training images"
    log.info(f"INT8 calibration on {len(paths)} good images ({where}, a seeded subset; --calibration_images "
             f"sets how many)")
