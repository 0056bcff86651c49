"""Lower precision for an exported graph (export.py --precision): fp16 and INT8, for ONNX Runtime and OpenVINO.

- ONNX fp16: weights and activations float16 (onnxruntime's converter), inputs and outputs float32.
- ONNX int8: ONNX Runtime's dynamic quantisation of the matrix products with a constant operand (MatMul, Gemm):
  int8 weights, activations quantised per batch at run time.
- OpenVINO fp16: the weights stored as float16 (the CPU computes in float32, a GPU in float16).
- OpenVINO int8: NNCF post-training quantisation (static: activation ranges calibrated on the run's own good
  training images, a seeded subset), transformer preset.

Both INT8 paths keep in float what quantisation breaks:
- always (KEEP_FLOAT) everything after the encoder and decoder features (the cosine map, its resizing, the
  Gaussian smoothing, the top-1 % score and the class distances), where the map is a small difference between
  two large feature vectors and int8 rounding of them would swamp it;
- and the blocks (encoder blocks, bottleneck, decoder blocks: group_of) that a measurement on good images finds
  moving the scores most (select_float), until the largest relative score change against the fp32 graph in the
  same runtime is within --max_score_change. ONNX Runtime: the kept blocks' matrix products stay float
  (nodes_to_exclude). OpenVINO: NNCF calibrates once; a kept block's activations are not quantised (its
  FakeQuantize nodes are removed), its weights stay int8 (weight-only compression) and so does NNCF's bias
  correction: the measurement includes both.
"""
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import dataset as ds
from . import exported, samples
from .errors import UserError
from .options import MAX_SCORE_CHANGE, DataOptions
from .run import log

CALIBRATION_IMAGES = 300  # NNCF's default subset size
SELECTION_IMAGES = 8  # good images, held out from the calibration, that measure the layer selection
# Nodes of the exported graph (ONNX names, which OpenVINO keeps) left in float: those outside the encoder,
# bottleneck and decoder, i.e. not under /mapper/model/ (the map, smoothing, score) and the class distances.
KEEP_FLOAT = r"^(?!/mapper/model/).*"


# The block a node of the model belongs to: encoder/blocks.3, encoder/patch_embed, bottleneck, decoder.5
GROUP = re.compile(r"^/mapper/model/(encoder/[^/]+|[^/]+)/")


@dataclass(frozen=True)
class Int8:
    """An INT8 export's inputs, good images [1, 3, crop, crop] in [0, 1] each (a graph of pairs: {input name:
    image} each): `calibration` (OpenVINO's activation ranges) and `selection` (held out from it: they measure the
    layer selection), and the selection's bound."""
    calibration: list[np.ndarray]
    selection: list[np.ndarray]
    max_score_change: float = MAX_SCORE_CHANGE


@dataclass
class Selection:
    """What the layer selection measured: the largest relative score change (against fp32, same runtime) on
    `images` good images with every block quantised (all_int8), with each block alone kept float (alone), and
    with the blocks kept (chosen)."""
    bound: float
    images: int
    all_int8: float = 0.0
    alone: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    chosen: float = 0.0

    def metadata(self) -> dict:
        """The exported file's "int8_float_layers" entry."""
        return dict(kept=self.kept, always="the map, smoothing, score and class distances (outside "
                    "/mapper/model/)", max_score_change=self.bound, measured_on_good_images=self.images,
                    score_change_all_int8=self.all_int8, score_change=self.chosen)

    def report(self, runtime: str) -> str:
        head = (f"INT8 layer selection ({runtime}, {self.images} good images, against its fp32 graph): every block "
                f"quantised moves the scores by up to {self.all_int8:.3%}")
        if not self.kept:
            return f"{head}, within --max_score_change {self.bound:.3%}: no block kept in float"
        kept = ", ".join(f"{g} (alone in float: {self.alone[g]:.3%})" for g in self.kept)
        beyond = "" if self.chosen <= self.bound else " (still more than the bound: use fp32 for a closer match)"
        return (f"{head}, more than --max_score_change {self.bound:.3%}: kept in float, the most sensitive first, "
                f"{kept}: scores move by up to {self.chosen:.3%}{beyond}")


def float_nodes(names: list[str]) -> list[str]:
    """The quantisable nodes of `names` that stay float (KEEP_FLOAT)."""
    return [n for n in names if re.match(KEEP_FLOAT, n)]


def group_of(name: str) -> str | None:
    """The block of the model (GROUP) that the node `name` belongs to; None outside the blocks."""
    m = GROUP.match(name)
    return m.group(1) if m else None


def largest_change(reference: np.ndarray, scores: np.ndarray) -> float:
    return float((np.abs(scores - reference) / np.abs(reference).clip(1e-12)).max())


def select_float(groups: list[str], scores_with: Callable[[list[str]], np.ndarray], reference: np.ndarray,
                 bound: float) -> Selection:
    """The blocks to keep in float, measured: `scores_with(kept)` scores the selection images with the blocks
    `kept` in float and the others quantised. When every block quantised moves a score by more than `bound`
    (relative to `reference`, the fp32 scores), each block is measured alone in float, and the fewest of the
    most sensitive (those whose float alone helps most) that bring the change within `bound` are kept
    (found by bisection over that ranking: the change falls as more are kept). When even all of them in float
    exceed `bound`, all are kept."""
    out = Selection(bound=bound, images=len(reference))
    out.all_int8 = out.chosen = largest_change(reference, scores_with([]))
    if out.all_int8 <= bound or not groups:
        return out
    out.alone = {g: largest_change(reference, scores_with([g])) for g in groups}
    ranked = sorted(groups, key=lambda g: out.alone[g])
    low, high, changes = 0, len(ranked), {0: out.all_int8}
    while high - low > 1:  # changes[low] > bound, and changes[high] <= bound unless high is all of them
        mid = (low + high) // 2
        changes[mid] = largest_change(reference, scores_with(ranked[:mid]))
        low, high = (low, mid) if changes[mid] <= bound else (mid, high)
    if high not in changes:
        changes[high] = largest_change(reference, scores_with(ranked[:high]))
    out.kept, out.chosen = ranked[:high], changes[high]
    return out


def onnx_fp16(src: str, dst: str):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    onnx.save(model, dst)


def onnx_int8(src: str, dst: str, int8: Int8) -> Selection:
    """ONNX Runtime's dynamic INT8 of MatMul and Gemm with a constant operand, the map's nodes and the blocks
    that select_float keeps in float (measured in ONNX Runtime, one image a call) excluded."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    names = [n.name for n in onnx.load(src).graph.node if n.op_type in ("MatMul", "Gemm")]
    images = int8.selection

    def quantise(kept: list[str], path: str):
        excluded = float_nodes(names) + [n for n in names if group_of(n) in kept]
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the graph (shape inference): done
        try:
            quantize_dynamic(src, path, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True})
        finally:
            logging.getLogger().setLevel(quiet)

    def scores(path: str) -> np.ndarray:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(["score"], x if isinstance(x, dict) else {"image": x})[0] for x in images])

    def scores_with(kept: list[str]) -> np.ndarray:
        quantise(kept, dst)
        return scores(dst)

    groups = list(dict.fromkeys(g for n in names if (g := group_of(n)) is not None))
    selection = select_float(groups, scores_with, scores(src), int8.max_score_change)
    quantise(selection.kept, dst)
    log.info(selection.report("ONNX Runtime dynamic INT8"))
    return selection


def without_quantizers(model, kept: list[str]):
    """`model` (NNCF's INT8 OpenVINO model, changed in place) with the activations of the blocks `kept` not
    quantised: their FakeQuantize nodes bypassed (the weights stay int8)."""
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in list(op.output(0).get_target_inputs()):
                if group_of(target.get_node().get_friendly_name()) in kept:
                    target.replace_source_output(op.input_value(0))
    return model


def openvino_int8(model, int8: Int8):
    """NNCF's post-training INT8 of an OpenVINO model, calibrated on int8.calibration, with the activations of the
    blocks that select_float keeps in float not quantised: (the model, the Selection). NNCF's usage telemetry
    (sent to Google Analytics unless the user opted out) is switched off: an export must not reach the network."""
    ov = exported.import_openvino()  # before nncf, which imports it
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch for CI machines; read once, when nncf is imported
    import nncf
    names = [op.get_friendly_name() for op in model.get_ops()]
    core = ov.Core()
    images = int8.selection

    def scores(m) -> np.ndarray:
        compiled = core.compile_model(m, "CPU")
        return np.concatenate([compiled(x)["score"] for x in images])

    reference = scores(model)
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.WARNING)  # at INFO it lists every operation it leaves unquantised: hundreds of lines
    try:
        quantized = nncf.quantize(model, nncf.Dataset(int8.calibration), subset_size=len(int8.calibration),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(names=float_nodes(names), validate=False))
    finally:
        nncf.set_log_level(level)
    groups = list(dict.fromkeys(
        g for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize"
        for t in op.output(0).get_target_inputs() if (g := group_of(t.get_node().get_friendly_name())) is not None))
    selection = select_float(groups, lambda kept: scores(without_quantizers(quantized.clone(), kept)), reference,
                             int8.max_score_change)
    log.info(selection.report("OpenVINO NNCF INT8"))
    return without_quantizers(quantized, selection.kept), selection


def training_images(run_dir: str, folder: str | None, count: int, seed: int) -> tuple[list[str], list[str]]:
    """Good training images, of `folder` (any good images), else the run's own (its config.json's data, split as
    in training), in a seeded order: (SELECTION_IMAGES of them, at most half, for the layer selection; at most
    `count` others for the calibration)."""
    if folder is not None:
        paths = ds.find_images([folder])
    else:
        paths = run_training_images(run_dir)
    if len(paths) < 2:
        where = folder or "the run's training data"
        raise UserError(f"INT8 export needs at least 2 good images (calibration and a held-out measurement), but "
                        f"{where} has {len(paths)}; pass --calibration_data DIR (a folder of good images of the "
                        f"run's parts)")
    paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    held = min(SELECTION_IMAGES, len(paths) // 2)
    return paths[:held], paths[held:held + count]


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


def log_calibration(selection: list[str], calibration: list[str], folder: str | None):
    where = folder or "the run's training images"
    if not calibration:  # ONNX Runtime's dynamic INT8: nothing to calibrate
        log.info(f"INT8 layer selection measured on {len(selection)} good images ({where}, a seeded subset)")
        return
    log.info(f"INT8 calibration on {len(calibration)} good images ({where}, a seeded subset; --calibration_images "
             f"sets how many), layer selection measured on {len(selection)} others")
