"""An exported model (export.py: an ONNX file, or an OpenVINO IR .xml with its .bin) run by ONNX Runtime or
OpenVINO instead of PyTorch: `Graph` (the file, its runtime and the metadata export.py stored in it) and
`ExportedDetector`, the Detector of such a file (predict.Detector chooses it for a path ending in .onnx or .xml).
The graph computes the map, the score and the distances to the class prototypes; the thresholds, the class
finding's radii, the sizes and the colour scale come from the metadata, and the decision, the class, the map and
mask in the image's own geometry from scoring.Scoring, as for a checkpoint.

Neither this module nor what it imports loads PyTorch (tests/test_deploy.py checks it): an inspection PC needs
NumPy, Pillow, OpenCV and the runtime only (requirements-runtime.txt, docs/deployment.md).
"""
import json
import os
import sys

import numpy as np

from . import class_finder
from . import thresholds as th
from .errors import UserError, one_line
from .images import unit_range
from .scoring import Prediction, Scoring

SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
MARK = "dinomaly_export"  # the metadata key every file export.py writes holds (its format version)
NAMESPACE = "dinomaly"  # OpenVINO: the metadata lives in the model's rt_info under this key
PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}
FIXED = ("seg_checkpoint", "max_ratio", "fusion_alpha", "image_size", "crop_size", "test_mask", "mask_ratio")


def format_of(path: str) -> str | None:
    """'onnx' or 'openvino' for a path naming an exported model (by its suffix), else None."""
    return SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())


def import_openvino():
    """The `openvino` module, imported with its usage telemetry off. Importing OpenVINO sends an event to Google
    Analytics unless the user has opted out (and the sender can hang a process on a machine without network),
    which a detector on an inspection line must not do: its own switch for CI machines (CI=true) is set for the
    import, then restored. (NNCF's telemetry: quantize.py.)"""
    if "openvino" not in sys.modules:
        before = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            import openvino  # noqa: F401
        finally:
            if before is None:
                del os.environ["CI"]
            else:
                os.environ["CI"] = before
    return sys.modules["openvino"]


def runtime_missing(fmt: str) -> str:
    return (f"running an exported {fmt} model needs the {PACKAGES[fmt]} package: pip install -r "
            f"requirements-export.txt (in a clone) or pip install 'dinomaly[{'openvino' if fmt == 'openvino' else 'export'}]'")


class Graph:
    """An exported model ready to run: `graph(images)` with images float32 [B, 3, crop, crop] RGB in [0, 1] ->
    {output name: array}; `metadata`: the JSON values export.py stored; `fmt`: 'onnx' or 'openvino'.
    fmt: the format, where the file's suffix does not name it. threads: the runtime's threads (None: its
    default); spin: whether ONNX Runtime's idle threads keep spinning
    after a call (its default: lower latency, but they take the processor from anything running beside)."""

    def __init__(self, path: str, device: str | None = None, threads: int | None = None, spin: bool = True,
                 fmt: str | None = None):
        self.path, self.fmt = os.fspath(path), fmt or format_of(path)
        if self.fmt is None:
            raise UserError(f"{path} is not an exported model (.onnx or .xml)")
        if not os.path.isfile(self.path):
            raise UserError(f"exported model not found: {self.path}; check the path, or export the run with "
                            f"export.py")
        device = (device or "cpu").lower()
        self.threads = threads
        if self.fmt == "onnx":
            self._open_onnx(device, threads, spin)
        else:
            self._open_openvino(device, threads)
        if MARK not in self.metadata:
            raise UserError(f"{self.path} has no Dinomaly metadata (sizes, thresholds): it was not written by "
                            f"export.py; export the run with export.py --checkpoint <run> --out {self.path}")

    def _open_onnx(self, device: str, threads: int | None, spin: bool):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(runtime_missing("onnx")) from None
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
        if device.split(":")[0] not in providers:
            raise UserError(f"--device {device}: an ONNX model runs on cpu, cuda or tensorrt (ONNX Runtime's "
                            f"execution providers)")
        wanted = providers[device.split(":")[0]]
        if wanted[0] not in onnxruntime.get_available_providers():
            raise UserError(f"--device {device}: this onnxruntime has no {wanted[0]} (it has "
                            f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu or use "
                            f"--device cpu")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(self.path, options, providers=wanted)
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise UserError(f"cannot read the ONNX model {self.path} ({one_line(e)[:200]}); export the run again "
                            f"with export.py") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = decode(meta, self.path)
        self.input_shape = [d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape]
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _open_openvino(self, device: str, threads: int | None):
        try:
            ov = import_openvino()
        except ImportError:
            raise UserError(runtime_missing("openvino")) from None
        bin_path = os.path.splitext(self.path)[0] + ".bin"
        if not os.path.isfile(bin_path):
            raise UserError(f"the weights of {self.path} are missing: {bin_path} not found (an OpenVINO model is "
                            f"the .xml and the .bin beside it); copy both, or export the run again")
        core = ov.Core()
        try:
            model = core.read_model(self.path)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report
            raise UserError(f"cannot read the OpenVINO model {self.path} ({one_line(e)[:200]}); export the run "
                            f"again with export.py") from None
        self.metadata = decode({k: str(model.get_rt_info([NAMESPACE, k]).astype(str))
                                for k in rt_keys(model)}, self.path)
        ov_device = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}.get(device.split(":")[0])
        if ov_device is None:
            raise UserError(f"--device {device}: an OpenVINO model runs on cpu, gpu or npu (OpenVINO's devices)")
        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        shape = model.inputs[0].get_partial_shape()
        self.input_shape = [d.get_length() if d.is_static else None for d in shape]
        try:
            self.compiled = core.compile_model(one_image(model), ov_device, config)
        except Exception as e:
            raise UserError(f"OpenVINO cannot run {self.path} on {ov_device} ({one_line(e)[:200]}); use --device "
                            f"cpu") from None
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in model.inputs]
        self.outputs = [o.get_any_name() for o in model.outputs]

    def check_input(self, images: np.ndarray):
        """A one-line UserError for images the graph cannot take (its fixed dimensions; its inputs side by side
        along the channels)."""
        shape = list(self.input_shape)
        if len(shape) > 1 and shape[1] is not None:
            shape[1] *= len(self.inputs)
        fixed = [(i, d) for i, d in enumerate(shape) if d is not None]
        if images.ndim != len(shape) or any(images.shape[i] != d for i, d in fixed):
            want = ", ".join("B" if d is None else str(d) for d in shape)
            raise UserError(f"{self.path} takes images of shape [{want}] (fixed when it was exported), not "
                            f"{list(images.shape)}; resize to image_size {self.metadata['image_size']} and "
                            f"centre-crop to {self.metadata['crop_size']}, or export the run again at this size")

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images [B, 3, crop, crop]; for a graph of pairs (inputs rgb and depth or infrared) [B, 6, crop, crop],
        the RGB images' channels then the other modality's."""
        images = np.asarray(images, dtype=np.float32)
        self.check_input(images)
        feeds = {name: np.ascontiguousarray(x) for name, x in zip(self.inputs, np.split(images, len(self.inputs),
                                                                                          axis=1))}
        if self.fmt == "onnx":
            return dict(zip(self.outputs, self.session.run(self.outputs, feeds)))
        results = [self.request.infer({k: x[i:i + 1] for k, x in feeds.items()}) for i in range(len(images))]
        return {name: np.concatenate([np.asarray(r[self.compiled.output(name)]) for r in results])
                for name in self.outputs}


def one_image(model):
    """An OpenVINO model reshaped to take one image (a static batch of 1), as Graph runs it, image by image: with
    the batch dynamic, OpenVINO's CPU plugin plans no memory reuse, so its memory grows by about 0.24 GB an image
    at ViT-S 224 (a ViT-B 392 batch of 8 did not fit 24 GiB), and it is slower (measured in docs/deployment.md)."""
    model.reshape({i.get_any_name(): [1, *list(i.get_partial_shape())[1:]] for i in model.inputs})
    return model


def rt_keys(model) -> list[str]:
    """The metadata keys of an OpenVINO model (its rt_info under NAMESPACE)."""
    if not model.has_rt_info([NAMESPACE]):
        return []
    entry = model.get_rt_info()[NAMESPACE]
    return list(entry if isinstance(entry, dict) else entry.astype(dict))


def decode(entries: dict, path: str) -> dict:
    """Metadata strings (JSON values) -> values; a value that is no JSON is a one-line error."""
    out = {}
    for key, text in entries.items():
        try:
            out[key] = json.loads(text)
        except ValueError:
            raise UserError(f"{path}: its metadata entry {key!r} is damaged; export the run again") from None
    return out


class ExportedDetector(Scoring):
    """An exported model (Graph), ready to score images with the same results as the checkpoint it came from
    (checkpoint_detector.ModelDetector): its thresholds (or `thresholds`, a thresholds.json, or `threshold`), the class found
    by its graph (or `class_name`). What the graph fixed (sizes, map, score, CRR's masking, the segmentation
    network) cannot be overridden: export the run again for that."""

    def __init__(self, path: str, *, thresholds: str | None = None, threshold: float | None = None,
                 class_name: str | None = None, device: str | None = None, threads: int | None = None, **fixed):
        given = [k for k in FIXED if fixed.get(k) is not None]
        unknown = set(fixed) - set(FIXED)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {', '.join(sorted(unknown))}")
        if given:
            flags = ", ".join(f"--{k}" for k in given)
            raise UserError(f"{path} is an exported model: {flags} {'is' if len(given) == 1 else 'are'} fixed in its "
                            f"graph; pass the run folder instead, or export the run again with what you want")
        if threshold is not None and not (np.isfinite(threshold) and threshold > 0):
            raise UserError(f"--threshold {threshold} must be a positive number (scores are >= 0)")
        self.graph = Graph(path, device, threads)
        meta = self.graph.metadata
        self.image_size, self.crop_size = meta["image_size"], meta["crop_size"]
        self.modality = meta.get("modality", "rgb")  # exports before pairs: RGB images
        calibration, calib_path = meta.get("thresholds"), path
        if thresholds is not None:
            calibration, calib_path = th.load(thresholds), thresholds
        if calibration is not None:
            th.select(calibration, class_name, calib_path)
        finding = {"classes": meta["classes"], "radius": meta["class_radius"]} if "classes" in meta else None
        self.set_thresholds(calibration, calib_path, class_name, threshold, lambda: finding)
        if thresholds is None:  # they live in the model file: nothing to save them into (serve's review page)
            self.calibration_path = None

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The graph on crops in [0, 1] ([B, 3, crop, crop] float32)."""
        return self.graph(images)

    def predict_prepared(self, batch, sizes: list[tuple[int, int]],
                         classes: list[str | None] | None = None) -> list[Prediction]:
        """Normalised crops [B, 3, crop, crop] (Scoring.prepare) and their images' (width, height) -> one
        Prediction each; classes: see scoring.Scoring.predict_prepared."""
        given = classes or [None] * len(sizes)
        unknown = [c for c in given if c is not None and c not in self.classes]
        if unknown:
            raise UserError(f"no class named {unknown[0]} in this model; its classes: {', '.join(self.classes)}")
        out = self.run(unit_range(batch))  # the graph normalises itself
        matches = [None] * len(sizes)
        if self.prototypes is not None and None in given:
            matches = class_finder.matches(self.prototypes, out["class_distances"])
        pair_maps = out["infrared_map"][:, 0] if "infrared_map" in out else None  # RGB + infrared: the second map
        return self.decide(out["anomaly_map"][:, 0], out["score"].tolist(), sizes, matches, given, pair_maps)
