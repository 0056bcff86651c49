"""The HTTP service (`serve.py`, `dinomaly-serve`; flags in cli.serve_parser): a trained run loaded once as a
Detector, answering POST /predict, GET /health and GET /info, the review page at / (package data in review/, see
docs/serving.md) and what it reads: the run's test scores, report pictures and the thresholds it saves.

A run of pairs (RGB + depth, RGB + infrared) takes one pair a request, a form with the two parts PAIR_PARTS
names (GET /info's `parts`); POST /pairs pairs a folder's files by their names for the page. Requests share the
model through a Batcher: images of concurrent requests wait up to --max_wait_ms for each other and go through
Detector.predict_prepared together, up to --max_batch at a time, the call predict.py makes, so a served score is
predict.py's. At most --max_queue images wait or run at once; beyond that a request gets 503 with Retry-After.
Every bad request is a 4xx with a one-line JSON error ({"error": "..."}); a failure inside the model
is a 500 for its request alone (logged with its traceback)."""
import asyncio
import base64
import collections
import csv
import hmac
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import image_files, modalities
from . import thresholds as th
from .errors import UserError, one_line
from .checkpoint_detector import PerClassDetector
from .images import as_rgb
from .predict import Detector, overlay
from .scoring import Prediction, Scoring, pair_input
from .run import log

TOKEN_ENV = "DINOMALY_SERVE_TOKEN"
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "MPO")  # what Image.open may report for PNG, JPEG, TIFF and BMP files
REVIEW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "review")
REPORT_FILES = (".png", ".csv", ".json", ".txt")  # what of the run folder the page may read (no weights)
MAX_BOXES = 100  # bounding boxes per image, the largest
MAX_PAIR_FILES, MAX_PATH_CHARS = 50_000, 1_000  # POST /pairs: paths a request, characters a path


@dataclass(frozen=True)
class ServeOptions:
    """The serve command's flags (cli.serve_parser)."""
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    thresholds: str | None = None
    threshold: float | None = None
    seg_checkpoint: str | None = None
    device: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_images: int = 16
    max_mb: float = 32.0
    max_pixels: int = 40_000_000
    review: str | None = None  # a folder whose images the review page scores when it opens


class RequestError(Exception):
    """A bad request: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------- images in

def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The bytes of an uploaded file -> 8-bit RGB, upright by its EXIF orientation (as predict.py reads a file:
    dataset.load_image(upright=True), as_rgb), or a
    RequestError naming the problem: empty, not an image, more pixels than max_pixels (checked from the header,
    before decoding: a decompression bomb), truncated or damaged."""
    if not data:
        raise RequestError(400, f"{name} is empty: send the image file's bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise RequestError(415, f"{name} is a {img.format} image; send PNG, JPEG, TIFF or BMP")
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(413, f"{name} declares {w} x {h} pixels, more than the limit of {max_pixels:,} "
                                        f"(--max_pixels); send a smaller image")
            img.load()
    except UnidentifiedImageError:
        raise RequestError(415, f"{name} is not an image (PNG, JPEG, TIFF or BMP)") from None
    except Image.DecompressionBombError as e:  # PIL's own limit, above ours: the size is in its message
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise RequestError(413, f"{name} declares {int(pixels[1]) if pixels else 'too many':,} pixels, more than the "
                                f"limit of {max_pixels:,} (--max_pixels); send a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(400, f"{name} cannot be decoded, truncated or damaged ({one_line(e)}); send the whole "
                                f"file") from None
    return as_rgb(img)


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes (413 beyond, also before reading when Content-Length says so)."""
    too_big = RequestError(413, f"the request is larger than the limit of {limit / 2 ** 20:g} MB (--max_mb); send "
                                f"fewer or smaller images")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def uploads(request: Request, body: bytes, max_images: int) -> list[tuple[str | None, str, bytes]]:
    """(field name, name, bytes) of each image of a request: the files of a multipart form (any field names; the
    name is the file's, else the field's), else the raw body as one image (no field name)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return [(None, "the request body", body)]

    async def replay():  # the form parser reads the body already read, once
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=100)
    except Exception as e:  # noqa: BLE001 - python-multipart's and starlette's errors: a malformed form
        raise RequestError(400, f"cannot read the multipart form ({one_line(e)})") from None
    files = [(key, f.filename or key, await f.read()) for key, f in form.multi_items() if not isinstance(f, str)]
    await form.close()
    if not files:
        raise RequestError(400, "the form holds no file; send the images as files (curl -F image=@part.png)")
    if len(files) > max_images:
        raise RequestError(400, f"too many images in one request (more than {max_images}, --max_images); send "
                                f"them in several requests")
    return files


PAIR_PARTS = {"rgbd": ("rgb", "depth"), "rgbir": ("rgb", "infrared")}  # a run of pairs: the form's parts


def pair_paths(body: bytes, modality: str) -> list[str]:
    """The paths of POST /pairs's JSON body {"files": [path, ...]}, or a one-line RequestError: not that JSON, a
    path not a non-empty string, more than MAX_PAIR_FILES paths or one longer than MAX_PATH_CHARS."""
    usage = 'send JSON {"files": ["<relative path of a file>", ...]}, the paths of a folder\'s files'
    if modality == "rgb":
        raise RequestError(400, "this run scores single images (GET /info's modality is rgb): POST /pairs is for "
                                "runs of pairs; send the images to /predict")
    try:
        paths = json.loads(body)["files"]
    except (ValueError, KeyError, TypeError):
        raise RequestError(400, usage) from None
    if not isinstance(paths, list):
        raise RequestError(400, f"files is a {type(paths).__name__}, not a list: {usage}")
    if len(paths) > MAX_PAIR_FILES:
        raise RequestError(400, f"too many files ({len(paths):,}, at most {MAX_PAIR_FILES:,}); send a smaller "
                                f"folder")
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p:
            raise RequestError(400, f"files[{i}] is {json.dumps(p)[:40]}, not a path: {usage}")
        if len(p) > MAX_PATH_CHARS:
            raise RequestError(400, f"files[{i}] ({p[:40]}...) is longer than {MAX_PATH_CHARS} characters; send "
                                    f"relative paths")
    return paths


def pair_parts(files: list[tuple[str | None, str, bytes]], parts: tuple[str, str]) -> dict[str, tuple[str, bytes]]:
    """{part: (name, bytes)} of a request for a run of pairs: a multipart form with exactly the two parts, or a
    one-line RequestError naming the part missing or not expected."""
    usage = f"send one pair as a multipart form with the parts {parts[0]} and {parts[1]} (curl -F " \
            f"{parts[0]}=@part.png -F {parts[1]}=@part{'.tiff' if parts[1] == 'depth' else '_ir.png'})"
    if files[0][0] is None:
        raise RequestError(400, f"this run takes pairs ({' + '.join(parts)}): {usage}")
    found = {}
    for field, name, data in files:
        if field not in parts or field in found:
            again = " a second time" if field in found else ""
            raise RequestError(400, f"unexpected part {field!r}{again}: {usage}")
        found[field] = (name, data)
    missing = [p for p in parts if p not in found]
    if missing:
        raise RequestError(400, f"the part {missing[0]!r} is missing: {usage}")
    return found


def open_depth(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The bytes of an uploaded depth file (TIFF: a z map [H, W] or an organised point cloud [H, W, 3], as
    MVTec 3D-AD's) -> float32, or a RequestError naming the problem: empty, not a TIFF, more pixels than
    max_pixels (checked from the header, before decoding), damaged."""
    import tifffile
    if not data:
        raise RequestError(400, f"{name} is empty: send the depth file's bytes")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            shape = tif.pages[0].shape
            if len(shape) >= 2 and shape[0] * shape[1] > max_pixels:
                raise RequestError(413, f"{name} declares {shape[1]} x {shape[0]} pixels, more than the limit of "
                                        f"{max_pixels:,} (--max_pixels); send a smaller depth file")
            return np.asarray(tif.asarray(), dtype=np.float32)
    except tifffile.TiffFileError:
        raise RequestError(415, f"{name} is not a TIFF file; send the depth as a TIFF: a z map [H, W] or an "
                                f"organised point cloud [H, W, 3] (as MVTec 3D-AD's xyz/<n>.tiff)") from None
    except (OSError, ValueError, IndexError, EOFError) as e:
        raise RequestError(400, f"{name} cannot be decoded, truncated or damaged ({one_line(e)}); send the whole "
                                f"file") from None


def prepare(detector: Scoring, image) -> tuple[np.ndarray, tuple[int, int], np.ndarray | tuple]:
    """(crop, (width, height), what the overlay is drawn on) of an image or a pair (Scoring.prepare): the image,
    or a pair's two images as the model sees them (a point cloud's: prepared, so padded; scoring.pair_input)."""
    if detector.modality != "rgb":
        return pair_input(image, detector.modality, detector.image_size, detector.crop_size)
    return (*detector.prepare(image), np.asarray(image))


# ----------------------------------------------------------------------------------------------- batching

class QueueFull(Exception):
    pass


class Batcher:
    """One thread runs the model for everyone: images submitted by concurrent requests are taken together, up to
    max_batch, waiting at most max_wait seconds after the first for others, and scored by one
    detector.predict_prepared call. At most max_queue images wait or run (submit raises QueueFull beyond). A
    failing batch is retried one image at a time, so a failure reaches only the requests of the images that
    fail."""

    def __init__(self, detector: Scoring, max_batch: int, max_wait: float, max_queue: int):
        self.detector, self.max_batch, self.max_wait, self.max_queue = detector, max_batch, max_wait, max_queue
        self.items = collections.deque()  # (crop, (width, height), class or None, Future)
        self.pending = 0
        self.batches = collections.Counter()  # batch size -> how many (GET /health)
        self.lock = threading.Condition()
        self.model_lock = threading.Lock()  # the model, also for reloading thresholds
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, items: list[tuple[np.ndarray, tuple[int, int], str | None]]) -> list[Future]:
        with self.lock:
            if self.pending + len(items) > self.max_queue:
                raise QueueFull
            self.pending += len(items)
            futures = [Future() for _ in items]
            self.items.extend((*item, f) for item, f in zip(items, futures))
            self.lock.notify()
        return futures

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    def _take(self) -> list | None:
        with self.lock:
            while not self.items and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self.items) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self.lock.wait(left)
            return [self.items.popleft() for _ in range(min(self.max_batch, len(self.items)))]

    def _work(self):
        while (batch := self._take()) is not None:
            try:
                with self.model_lock:
                    self._run(batch)
            finally:
                with self.lock:
                    self.pending -= len(batch)
                    self.batches[len(batch)] += 1

    def _run(self, batch: list):
        try:
            found = self.detector.predict_prepared(np.stack([b[0] for b in batch]), [b[1] for b in batch],
                                                   [b[2] for b in batch])
        except Exception as e:  # noqa: BLE001 - reported to the requests, which answer 500
            if len(batch) == 1:
                log.exception(f"the model failed on an image of {batch[0][1][0]} x {batch[0][1][1]} pixels:")
                batch[0][3].set_exception(e)
                return
            log.warning(f"warning: a batch of {len(batch)} images failed ({one_line(e)}); scoring them one by one")
            for item in batch:
                self._run([item])
            return
        for item, p in zip(batch, found):
            item[3].set_result(p)


# ----------------------------------------------------------------------------------------------- results out

def png_base64(rgb: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb))
    if not ok:
        raise RuntimeError("cannot encode a PNG")
    return base64.b64encode(data.tobytes()).decode()


def regions(mask: np.ndarray) -> list[dict]:
    """The mask's connected regions (8-neighbourhood), the largest first (at most MAX_BOXES): bounding box in
    pixels (x, y, width, height) and the share of the image they cover."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = []
    for i, box in enumerate(ndimage.find_objects(labels)):
        ys, xs = box
        boxes.append({"x": xs.start, "y": ys.start, "width": xs.stop - xs.start, "height": ys.stop - ys.start,
                      "area_share": float(areas[i] / mask.size)})
    return sorted(boxes, key=lambda b: -b["area_share"])[:MAX_BOXES]


def result(name: str, rgb: np.ndarray | tuple[np.ndarray, np.ndarray], p: Prediction, given: bool,
           detector: Scoring, want_mask: bool, want_overlay: bool) -> dict:
    """One image's JSON answer; `rgb`: the image, or a pair's two images as the model sees them (prepare)."""
    m = p.class_match
    first = rgb[0] if isinstance(rgb, tuple) else rgb  # the map's geometry: the (RGB) image's
    out = {"name": name, "width": first.shape[1], "height": first.shape[0], "score": p.score,
           "decision": "anomalous" if p.is_anomalous else "normal", "threshold": p.threshold,
           "normalized_score": p.normalized_score, "mask_threshold": p.mask_threshold, "class": p.class_name,
           "class_given": given, "class_confidence": m.confidence if m else None,
           "class_well_matched": m.well if m else None, "area_share": float(p.mask.mean()),
           "boxes": regions(p.mask)}
    if want_mask:
        out["mask_png"] = png_base64(p.mask.astype(np.uint8) * 255)
    if want_overlay:
        out["overlay_png"] = png_base64(overlay(rgb, p, detector))
    return out


# ----------------------------------------------------------------------------------------------- the run

def run_folder(checkpoint: str) -> str:
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def test_scores(folder: str) -> list[dict]:
    """scores.csv of the run's evaluation (class, image name, label, score), [] without one."""
    path = os.path.join(folder, "scores.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="", errors="replace") as f:
        return [{"class": r["class"], "image": "/".join(r["image_path"].replace("\\", "/").split("/")[-2:]),
                 "label": int(r["label"]), "score": float(r["score"])} for r in csv.DictReader(f)]


def read_table(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", errors="replace") as f:
        return list(csv.DictReader(f))


LOSS_LINE = re.compile(r"iter \[(\d+)/\d+\], loss: ([0-9.eE+-]+)")


def loss_curve(folder: str) -> list[list[float]]:
    """[(iteration, mean loss)] of the training log lines in log.txt (train.log_progress): of its last training
    (log.txt is appended to: an earlier one, replaced by --overwrite, ends where the iterations start again;
    a --resume goes on from the iteration it saved)."""
    path = os.path.join(folder, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as f:
        points = [[int(m[1]), float(m[2])] for m in LOSS_LINE.finditer(f.read())]
    starts = [i for i in range(1, len(points)) if points[i][0] <= points[i - 1][0]]
    return points[starts[-1] if starts else 0:]


def report_files(folder: str) -> list[str]:
    """The pictures evaluation wrote (report.py), relative to the run folder."""
    found = []
    for sub in sorted(os.listdir(folder)):
        d = os.path.join(folder, sub)
        if os.path.isdir(d) and sub.split("_")[0] in ("curves", "gallery", "heatmaps"):
            for root, _, names in os.walk(d):
                found += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
                          for n in sorted(names) if n.endswith(".png")]
    return found


def review_images(folder: str | None) -> dict[str, str]:
    """--review: {path relative to the folder, '/'-separated: path} of its images (image_files.find_images)."""
    if folder is None:
        return {}
    return {os.path.relpath(p, folder).replace(os.sep, "/"): p for p in image_files.find_images([folder])}


def model_recipe(detector: Scoring):
    """The recipe of the detector's model (None for a detector without one, e.g. of an exported model)."""
    return detector.finder.recipe if isinstance(detector, PerClassDetector) else getattr(detector, "recipe", None)


def class_thresholds(detector: Scoring) -> dict:
    out = {}
    for c in detector.classes:
        point = detector.point(c)
        out[c] = {"threshold": point.threshold, "mask_threshold": point.mask_threshold, "source": point.source}
    return out


# ----------------------------------------------------------------------------------------------- the app

def create_app(detector: Scoring, options: ServeOptions) -> FastAPI:
    """The service around a loaded detector (see the module docstring)."""
    folder = run_folder(options.checkpoint)
    parts = PAIR_PARTS.get(detector.modality)  # None: images, any field names
    batcher = Batcher(detector, options.max_batch, options.max_wait_ms / 1000, options.max_queue)
    token = options.token
    recipe = model_recipe(detector)
    app = FastAPI(title="Dinomaly", version="1", description=f"Anomaly detection with the run {folder}")
    app.state.batcher = batcher

    @app.middleware("http")
    async def authorise(request: Request, call_next):
        if token and not request.url.path.startswith("/static/"):  # the page's own code is public
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.headers.get("x-token") or request.query_params.get("token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "a token is required: send the header 'Authorization: Bearer <token>' (or "
                                  "?token=<token> in the address)")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error(e.status_code, e.detail, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/health")
    def health():
        """The model is loaded; its device and how many images wait or run."""
        return {"status": "ok", "model_loaded": True, "device": str(getattr(detector, "device", "exported model")),
                "queue_depth": batcher.pending, "max_queue": batcher.max_queue,
                "batches": {str(k): v for k, v in sorted(batcher.batches.items())}}

    @app.get("/info")
    def info():
        """The run: method, encoder, modality (and for a run of pairs the parts a request holds), classes and
        their thresholds, sizes, limits, metrics, report pictures."""
        return {"run": os.path.basename(os.path.normpath(folder)), "method": recipe and recipe.method,
                "encoder": recipe and recipe.encoder, "modality": detector.modality,
                "parts": parts and list(parts), "image_size": detector.image_size, "crop_size": detector.crop_size,
                "classes": detector.classes, "class_finding": detector.prototypes is not None,
                "thresholds": class_thresholds(detector), "default_threshold": detector.default.threshold,
                "thresholds_file": getattr(detector, "calibration_path", None),
                "metrics": read_table(os.path.join(folder, "metrics.csv")), "loss": loss_curve(folder),
                "report": report_files(folder),
                "limits": {"max_images": options.max_images, "max_mb": options.max_mb,
                           "max_pixels": options.max_pixels, "max_batch": options.max_batch,
                           "max_wait_ms": options.max_wait_ms, "max_queue": options.max_queue}}

    @app.get("/test_scores")
    def scores():
        """The scores of the run's test images (its scores.csv): class, image, label (1 anomalous), score."""
        return test_scores(folder)

    @app.post("/predict")
    async def predict(request: Request, class_name: str | None = None, mask: bool = False,
                      overlay: bool = False):
        """Score images: a multipart form of image files, or one image as the raw body; for a run of pairs a
        form with one pair, its parts named as /info's `parts`. class_name: decide with this class's thresholds
        (default: the class found); mask, overlay: add them as base64 PNG."""
        if class_name is not None and class_name not in detector.classes:
            raise RequestError(400, f"unknown class_name {class_name!r}; this run's classes: "
                                    f"{', '.join(detector.classes) or 'none (one threshold for all images)'}")
        body = await read_body(request, int(options.max_mb * 2 ** 20))
        files = await uploads(request, body, options.max_images)
        if parts is None:
            names = [name for _, name, _ in files]
            images = [await run_in_threadpool(open_image, data, name, options.max_pixels) for _, name, data in files]
        else:  # one pair: the RGB image, and the depth file or the infrared image
            found = pair_parts(files, parts)
            second = open_depth if parts[1] == "depth" else open_image
            names = [found["rgb"][0]]
            images = [(await run_in_threadpool(open_image, found["rgb"][1], found["rgb"][0], options.max_pixels),
                       await run_in_threadpool(second, found[parts[1]][1], found[parts[1]][0], options.max_pixels))]
        try:
            prepared = [await run_in_threadpool(prepare, detector, img) for img in images]
        except UserError as e:  # the Detector's own checks
            raise RequestError(400, str(e)) from None
        try:
            futures = batcher.submit([(crop, size, class_name) for crop, size, _ in prepared])
        except QueueFull:
            raise RequestError(503, f"the service is busy ({batcher.pending} images queued, at most "
                                    f"{batcher.max_queue}, --max_queue); retry shortly",
                               {"Retry-After": "1"}) from None
        try:
            found = [await asyncio.wrap_future(f) for f in futures]
        except UserError as e:
            raise RequestError(400, str(e)) from None
        except Exception as e:  # noqa: BLE001 - logged by the batcher
            return error(500, f"the model failed on this request ({one_line(e)}); the service goes on")
        answers = [await run_in_threadpool(result, name, shown, p, class_name is not None, detector, mask,
                                           overlay) for name, (_, _, shown), p in zip(names, prepared, found)]
        return {"images": answers}

    @app.post("/thresholds")
    async def save_thresholds(request: Request):
        """{"thresholds": {class: image threshold}} -> written into the run's thresholds file (the calibrated one
        kept beside it as thresholds.calibrated.json), which predict.py, the Detector, export and this service
        then use."""
        path = getattr(detector, "calibration_path", None)
        if path is None or detector.calibration is None:
            raise RequestError(400, "this run's thresholds cannot be saved here (a run with one model per class, "
                                    "an exported model's own thresholds, or no thresholds file); edit its "
                                    "thresholds.json files")
        usage = RequestError(400, 'send JSON {"thresholds": {"<class>": <threshold>, ...}}')
        try:
            chosen = json.loads(await read_body(request, 1 << 20))["thresholds"]
        except (ValueError, KeyError, TypeError):
            raise usage from None
        if not isinstance(chosen, dict):
            raise usage
        try:
            data = th.with_image_thresholds(th.load(path), chosen)
        except UserError as e:
            raise RequestError(400, str(e)) from None
        backup = os.path.join(os.path.dirname(path), "thresholds.calibrated.json")
        with batcher.model_lock:
            if not os.path.exists(backup):
                shutil.copyfile(path, backup)
            th.write(path, data)
            detector.reload_thresholds()
        log.info(f"saved the thresholds of {', '.join(chosen)} into {path} (the calibrated ones: {backup})")
        return {"path": path, "backup": backup, "thresholds": class_thresholds(detector)}

    @app.post("/pairs")
    async def pairs(request: Request):
        """A run of pairs: {"files": [the relative paths of a folder's files]} -> the pairs among them, paired by
        name as predict.py pairs files (modalities.pairs_among): {"pairs": [{"rgb": path, "<parts[1]>": path}],
        "unpaired": [{"rgb": path, "error": one line naming the missing file}]}. Only names are sent; the page
        then sends each pair to /predict."""
        paths = pair_paths(await read_body(request, int(options.max_mb * 2 ** 20)), detector.modality)
        found, unpaired = modalities.pairs_among(paths, modalities.PAIR_KINDS[detector.modality])
        return {"pairs": [{"rgb": a, parts[1]: b} for a, b in found],
                "unpaired": [{"rgb": a, "error": e} for a, e in unpaired]}

    review = review_images(options.review)

    @app.get("/review_images")
    def review_list():
        """The images of --review (paths relative to it), which the page scores when it opens."""
        return list(review)

    @app.get("/review_images/{name:path}")
    def review_image(name: str):
        if name not in review:
            raise RequestError(404, f"no image {name} in --review {options.review}")
        return FileResponse(review[name])

    @app.get("/report/{name:path}")
    def report(name: str):
        """A file of the run's report (pictures, metrics.csv, scores.csv, thresholds.json, log.txt)."""
        path = os.path.realpath(os.path.join(folder, name))
        if not path.startswith(os.path.realpath(folder) + os.sep) or not path.endswith(REPORT_FILES) or \
                not os.path.isfile(path):
            raise RequestError(404, f"no report file {name} in the run folder")
        return FileResponse(path)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(REVIEW, "index.html"))

    app.mount("/static", StaticFiles(directory=REVIEW), name="static")
    return app


class Background:
    """The service in a thread of this process, on a free loopback port (tests, benchmark.py serve): .url; close()
    stops it."""

    def __init__(self, app: FastAPI):
        import uvicorn
        listening = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        self.app, self.server = app, uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[listening]), daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.app.state.batcher.close()


def main(options: ServeOptions):
    """The serve command: load the run, serve until Ctrl-C."""
    import uvicorn
    options = options if options.token else ServeOptions(**{**vars(options), "token": os.environ.get(TOKEN_ENV)})
    detector = Detector(options.checkpoint, thresholds=options.thresholds, threshold=options.threshold,
                        seg_checkpoint=options.seg_checkpoint, device=options.device)
    app = create_app(detector, options)
    if options.host not in ("127.0.0.1", "localhost", "::1") and not options.token:
        log.warning(f"warning: serving on {options.host} without a token: anyone who reaches this machine can use "
                    f"the model and change its thresholds; pass --token (or set {TOKEN_ENV})")
    log.info(f"serving {options.checkpoint} on http://{options.host}:{options.port}/ (review page /, API /docs); "
             f"Ctrl-C stops")
    try:
        listening = socket.create_server((options.host, options.port))
    except OSError as e:
        raise UserError(f"cannot listen on {options.host}:{options.port} ({e.strerror}); pass another --port or "
                        f"--host") from None
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
    finally:
        app.state.batcher.close()
