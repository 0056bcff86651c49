"""Dataset readers, the dataset registry and the input transform.

Every reader turns a dataset folder into a list of `Sample`s; `TrainDataset` and `TestDataset` turn samples
into tensors with the R448-C392 transform.

Readers:
- `mvtec_samples(root, class_name, phase)`: any MVTec-layout folder (MVTec AD, prepared VisA 1cls, MPDD,
  BTAD, user data).
- `realiad_samples(root, class_name, phase, resolution, json_dir)`: Real-IAD through its split JSON files.
- `attach_foreground(samples, foreground_root)`: CRR's object masks, where the released code looks for them.
"""
import glob
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from errors import UserError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MVTEC_CLASSES = [
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill",
    "screw", "toothbrush", "transistor", "zipper",
]
VISA_CLASSES = [
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
]
REALIAD_CLASSES = [
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "usb",
    "usb_adaptor", "u_block", "vcpill", "wooden_beads", "woodstick", "zipper",
]

MPDD_CLASSES = ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"]
BTAD_CLASSES = ["01", "02", "03"]
MIAD_CLASSES = ["catenary_dropper", "electrical_insulator", "metal_welding", "nut_and_bolt", "photovoltaic_module",
                "wind_turbine", "witness_mark"]
UNIMEDICAL_CLASSES = ["BraTS2021", "LIVER", "RESC"]

# name -> standard classes; every dataset but realiad is read in the MVTec layout
DATASETS = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "realiad": REALIAD_CLASSES, "mpdd": MPDD_CLASSES,
            "btad": BTAD_CLASSES, "miad": MIAD_CLASSES, "unimedical": UNIMEDICAL_CLASSES}

# Image and mask files are recognised by extension, case-insensitively; the order is the mask search order.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Folder names that hold normal images (MVTec, VisA 1cls, MPDD: "good"; BTAD as distributed: "ok").
NORMAL_DIR_NAMES = ("good", "ok")


@dataclass
class Sample:
    image_path: str
    label: int  # 0 normal, 1 anomalous
    mask_path: str | None  # None: no pixel ground truth (always None for normal images)
    class_name: str
    foreground_path: str | None = None  # CRR: optional object mask
    rel_path: str = ""  # the image path relative to its class folder, '/'-separated (used for foreground masks)


def _open(path: str, what: str, where: str) -> Image.Image:
    """Image.open + load (the file is closed afterwards), with one-line UserErrors for a missing or unreadable
    file."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}; check {where}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path} ({one_line(e)}); replace or remove the file") from None
    return img


def load_image(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB (see to_rgb)."""
    return to_rgb(_open(path, "image", "the dataset folder"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: grey becomes 3 channels, alpha is dropped, 16-bit is scaled to 8-bit."""
    if img.mode.startswith("I;16"):
        # 16-bit grey: always the full 16-bit range (65535 -> 255)
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "I":
        # 32-bit integer grey (older PIL opens 16-bit PNGs like this): 16-bit range when it exceeds 8 bits
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        # float grey: [0, 1] when it fits there, else taken as 8-bit values
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_mask(path: str) -> Image.Image:
    """Open a mask with its grey values kept: masks are resized first and binarised after (by the evaluation's
    threshold), as the reference transforms resize the mask file as it is.

    Bilevel ("1") and 8-bit grey ("L") masks are returned unchanged; PIL resizes mode "1" with nearest
    neighbour, as torchvision does. Any other mode becomes 8-bit grey: the maximum over the channels of its
    load_image RGB version (alpha is not part of a mask; 16-bit values are scaled to 8 bits).
    """
    m = _open(path, "mask", "the dataset's ground-truth folder")
    if m.mode in ("1", "L"):
        return m
    return Image.fromarray(np.asarray(load_image(path)).max(axis=2))


def resize(img: Image.Image, size: int) -> Image.Image:
    """Square resize, aspect ratio not kept, bilinear (PIL antialiases when downscaling)."""
    return img.resize((size, size), Image.BILINEAR)


def center_crop_box(size: int, crop: int) -> tuple[int, int, int, int]:
    top = int(round((size - crop) / 2.0))
    return (top, top, top + crop, top + crop)


def image_to_tensor(img: Image.Image, crop_size: int) -> torch.Tensor:
    """Resized RGB image -> centre crop -> [3, crop, crop] float, ImageNet-normalised."""
    img = img.crop(center_crop_box(img.size[0], crop_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def mask_to_tensor(mask: Image.Image, crop_size: int) -> torch.Tensor:
    """Resized mask (grey "L" or bilevel "1") -> centre crop -> [1, crop, crop] float in [0, 1], not binarised:
    grey / 255, bilevel 0 or 1 (as torchvision's ToTensor)."""
    mask = mask.crop(center_crop_box(mask.size[0], crop_size))
    arr = np.asarray(mask, dtype=np.float32)
    if mask.mode != "1":
        arr = arr / 255.0
    return torch.from_numpy(arr)[None]


def check_sizes(image_size: int, crop_size: int):
    """The crop must be a whole number of 14-px patches and fit in the resized image."""
    if crop_size % 14:
        raise UserError(f"--crop_size {crop_size} is not a multiple of the patch size 14")
    if crop_size > image_size:
        raise UserError(f"--crop_size {crop_size} is larger than --image_size {image_size}")


def load_tensor(path: str, image_size: int, crop_size: int, cache=None) -> torch.Tensor:
    """The input transform: image file -> RGB -> resize -> centre crop -> normalised [3, crop, crop]. With an
    `image_cache.ImageCache` of that image size, the resized pixels come from the cache (bit-identical)."""
    if cache is None:
        return transform(load_image(path), image_size, crop_size)
    return image_to_tensor(Image.fromarray(cache.get(path)), crop_size)


def transform(img: Image.Image, image_size: int, crop_size: int) -> torch.Tensor:
    """The input transform of an RGB image: resize -> centre crop -> normalised [3, crop, crop]."""
    return image_to_tensor(resize(img, image_size), crop_size)


def find_images(inputs: list[str], skip_dir: str | None = None) -> list[str]:
    """Image files named directly or by a glob pattern, and the images under named folders (recursively:
    a folder's own files sorted, then its subfolders); no duplicates, nothing under `skip_dir` (an output
    folder). A missing path, or a folder or pattern without images, is a UserError."""
    skip = os.path.realpath(skip_dir) + os.sep if skip_dir else None
    found, seen = [], set()
    for item in inputs:
        pattern = glob.has_magic(item)
        if pattern:
            matches = sorted(glob.glob(item, recursive=True))
        elif os.path.exists(item):
            matches = [item]
        else:
            raise UserError(f"file or folder not found: {item}; check --input")
        images = []
        for path in matches:
            if os.path.isdir(path):
                images += _walk_images(path, set())
            elif not pattern or _is_image_name(os.path.basename(path)):
                images.append(path)  # a file named directly is tried whatever its extension
        if not images:
            raise UserError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {item}; check --input")
        for path in images:
            key = os.path.realpath(path)
            if key not in seen and not (skip and key.startswith(skip)):
                seen.add(key)
                found.append(path)
    return found


def _walk_images(folder: str, visited: set[str]) -> list[str]:
    """The images in `folder` (sorted), then those in its subfolders, recursively; each folder once."""
    real = os.path.realpath(folder)
    if real in visited:  # a symbolic link back up the tree
        return []
    visited.add(real)
    images = [os.path.join(folder, name) for name in _list_images(folder)]
    for sub in _list_subdirs(folder):
        images += _walk_images(os.path.join(folder, sub), visited)
    return images


class TrainDataset(Dataset):
    """Normal training images -> normalised tensors [3, crop, crop]; `cache`: an optional ImageCache."""

    def __init__(self, samples: list[Sample], image_size: int = 448, crop_size: int = 392, cache=None):
        self.samples, self.image_size, self.crop_size, self.cache = samples, image_size, crop_size, cache

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return load_tensor(self.samples[i].image_path, self.image_size, self.crop_size, self.cache)


class TestDataset(Dataset):
    """Test images -> (image [3,c,c], mask [1,c,c] in [0,1], label, has_mask, image_path).

    `has_mask` is False for an anomalous image without pixel ground truth; such images count for the image
    metrics only. Normal images always have an all-zero mask. `cache`: an optional ImageCache for the images.
    """

    def __init__(self, samples: list[Sample], image_size: int = 448, crop_size: int = 392, cache=None):
        self.samples, self.image_size, self.crop_size, self.cache = samples, image_size, crop_size, cache

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        img = load_tensor(s.image_path, self.image_size, self.crop_size, self.cache)
        if s.label != 0 and s.mask_path is not None:
            mask = mask_to_tensor(resize(load_mask(s.mask_path), self.image_size), self.crop_size)
        else:
            mask = torch.zeros(1, self.crop_size, self.crop_size)
        has_mask = s.label == 0 or s.mask_path is not None
        return img, mask, s.label, has_mask, s.image_path


# ----------------------------------------------------------------------------------------------------------
# Folder readers


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _entries(folder: str, wanted) -> list[str]:
    """Sorted names of the entries of `folder` for which wanted(entry) holds. An entry that cannot be examined
    (a symbolic link that points to itself) is a UserError naming it."""
    names = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if wanted(e):
                    names.append(e.name)
            except OSError as err:
                raise UserError(f"cannot read {e.path} ({err.strerror}: a symbolic link that points to itself?); "
                                f"remove or fix it") from None
    return sorted(names)


def _list_images(folder: str) -> list[str]:
    """Sorted file names of the images directly in `folder` (hidden files and other extensions skipped)."""
    return _entries(folder, lambda e: _is_image_name(e.name) and e.is_file())


def _list_subdirs(folder: str) -> list[str]:
    return _entries(folder, lambda e: not e.name.startswith(".") and e.is_dir())


def _name_map(folder: str) -> dict[str, str]:
    """lower-cased file name -> actual file name, for the files in `folder` ({} when it does not exist)."""
    try:
        names = _entries(folder, lambda e: e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(n.lower(), n)
    return out


def _available(folder: str, suffix: str | None = None) -> str:
    """' (the classes there: a, b)': the subfolders of `folder`, or the stems of its `suffix` files."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name.removesuffix(suffix or "") for e in it if not e.name.startswith(".") and
                           (e.is_dir() if suffix is None else e.name.endswith(suffix)))
    except OSError:
        names = []
    return f" (the classes there: {', '.join(names)})" if names else f" ({folder} holds no classes)"


def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}; check --data_path")


def _class_dir(root: str, class_name: str) -> str:
    _check_root(root)
    d = os.path.join(root, class_name)
    if not os.path.isdir(d):
        raise UserError(f"class folder not found: {d}; check --data_path and --classes{_available(root)}")
    return d


def mvtec_samples(root: str, class_name: str, phase: str) -> list[Sample]:
    """Samples of one class of an MVTec-layout dataset.

    phase 'train': `<root>/<class>/train/good/*` (label 0). phase 'test': every subfolder of
    `<root>/<class>/test/` ('good' -> 0, anything else -> 1), sorted by folder then file name. Anomalous
    samples get their mask from `<root>/<class>/ground_truth/<defect>/<stem>_mask.<ext>` or `<stem>.<ext>`;
    when the class has no `ground_truth` folder at all, their mask_path is None (image metrics only).
    """
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    cdir = _class_dir(root, class_name)
    samples: list[Sample] = []

    if phase == "train":
        candidates = [os.path.join(cdir, "train", n) for n in NORMAL_DIR_NAMES]
        folder = next((c for c in candidates if os.path.isdir(c)), None)
        if folder is None:
            raise UserError(f"training folder not found: {candidates[0]}; the class folder must hold "
                            f"train/good with the normal training images")
        sub = os.path.basename(folder)
        for name in _list_images(folder):
            samples.append(Sample(os.path.join(folder, name), 0, None, class_name, rel_path=f"train/{sub}/{name}"))
        if not samples:
            raise UserError(f"no images in {folder}; expected {', '.join(IMAGE_EXTENSIONS)} files there")
        return samples

    test_dir = os.path.join(cdir, "test")
    if not os.path.isdir(test_dir):
        raise UserError(f"test folder not found: {test_dir}; the class folder must hold test/<good|defect>")
    gt_dir = os.path.join(cdir, "ground_truth")
    has_gt = os.path.isdir(gt_dir)
    for sub in _list_subdirs(test_dir):
        folder = os.path.join(test_dir, sub)
        label = 0 if sub.lower() in NORMAL_DIR_NAMES else 1
        names = _list_images(folder)
        mask_names = _name_map(os.path.join(gt_dir, sub)) if (label and has_gt) else {}
        for name in names:
            mask_path = None
            if label and has_gt:
                mask_path = _find_mask(gt_dir, sub, name, mask_names, os.path.join(folder, name))
            samples.append(Sample(os.path.join(folder, name), label, mask_path, class_name,
                                  rel_path=f"test/{sub}/{name}"))
    if not samples:
        raise UserError(f"no test images in {test_dir}; expected test/<good|defect>/ folders with images")
    return samples


def _find_mask(gt_dir: str, defect: str, image_name: str, mask_names: dict[str, str], image_path: str) -> str:
    stem = os.path.splitext(image_name)[0]
    for suffix in ("_mask", ""):
        for ext in IMAGE_EXTENSIONS:
            actual = mask_names.get(f"{stem}{suffix}{ext}".lower())
            if actual is not None:
                return os.path.join(gt_dir, defect, actual)
    exts = ",".join(e[1:] for e in IMAGE_EXTENSIONS)
    d = os.path.join(gt_dir, defect)
    raise UserError(f"no mask for {image_path}: looked for {d}/{stem}_mask.{{{exts}}} and {d}/{stem}.{{{exts}}}; "
                    f"add the mask, or remove {gt_dir} to evaluate without pixel ground truth")


def realiad_json_path(root: str, class_name: str, json_dir: str = "realiad_jsons") -> str:
    """The split file `<root>/<json_dir>/<json_dir>/<class>.json`, else `<root>/<json_dir>/<class>.json`."""
    candidates = [os.path.join(root, json_dir, json_dir, f"{class_name}.json"),
                  os.path.join(root, json_dir, f"{class_name}.json")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    folder = next((os.path.dirname(c) for c in candidates if os.path.isdir(os.path.dirname(c))), None)
    there = _available(folder, ".json") if folder else ""
    raise UserError(f"Real-IAD split file not found: {candidates[0]} or {candidates[1]}; "
                    f"check --data_path and --classes{there}, and unpack the {json_dir} archive into the dataset "
                    f"folder")


def realiad_samples(root: str, class_name: str, phase: str, resolution: str = "realiad_1024",
                    json_dir: str = "realiad_jsons", allow_outside: bool = False) -> tuple[list[Sample], int]:
    """Samples of one Real-IAD class from its split JSON; paths are relative to `<root>/<resolution>/<class>/`.
    An image listed twice in the file (in either list), and a path leading out of `root` (`../`) unless
    `allow_outside`, are UserErrors naming the entries.

    Returns (samples, number of anomalous samples without a mask_path); those get mask_path None.
    """
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    _check_root(root)
    jpath = realiad_json_path(root, class_name, json_dir)
    cdir = os.path.join(root, resolution, class_name)
    if not os.path.isdir(cdir):
        raise UserError(f"class folder not found: {cdir}; check --data_path and --classes "
                        f"(Real-IAD images are read from <data_path>/{resolution}/<class>)"
                        f"{_available(os.path.join(root, resolution))}")
    fix = "re-extract the Real-IAD split files"
    try:
        with open(jpath, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"malformed split file {jpath} ({one_line(e)}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get(phase), list):
        raise UserError(f"malformed split file {jpath}: no '{phase}' list at the top level; {fix}")
    meta = data.get("meta")
    normal_class = meta.get("normal_class", "OK") if isinstance(meta, dict) else "OK"
    _check_listed_once(data, jpath, normal_class, fix)

    samples: list[Sample] = []
    missing = 0
    for i, item in enumerate(data[phase]):
        problem = _entry_problem(item)
        if problem:
            raise UserError(f"malformed split file {jpath}: entry {i} of '{phase}' {problem}; {fix}")
        rel = _split_path(item["image_path"])
        label = 0 if item["anomaly_class"] == normal_class else 1
        mask_path = None
        if label:
            m = item.get("mask_path")
            if m:
                mask_path = os.path.join(cdir, _split_path(m))
            else:
                missing += 1
        for path in (os.path.join(cdir, rel), mask_path):
            if path is not None and not allow_outside and not _inside(path, root):
                raise UserError(f"split file {jpath}: entry {i} of '{phase}' leads out of the dataset folder {root} "
                                f"({path}); fix the split file, or pass --allow_outside_paths if that is meant")
        samples.append(Sample(os.path.join(cdir, rel), label, mask_path, class_name, rel_path=rel))
    if not samples:
        raise UserError(f"no '{phase}' samples in {jpath}; {fix}")
    return samples, missing


def _split_path(path: str) -> str:
    """A path from a split file, '/'-separated and relative (a leading '/' is dropped)."""
    return path.replace("\\", "/").lstrip("/")


def _inside(path: str, root: str) -> bool:
    """Whether `path` lies in the folder `root` once '..' are resolved (lexically: links are not followed)."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _check_listed_once(data: dict, jpath: str, normal_class: str, fix: str):
    """Each image once in a split file, over its 'train' and 'test' lists (an image in both, twice in one, or
    once normal and once anomalous is a UserError naming both entries)."""
    seen: dict[str, tuple[str, int, bool]] = {}
    for phase in ("train", "test"):
        items = data.get(phase)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if _entry_problem(item):
                continue  # reported when its list is read
            key = os.path.normpath(_split_path(item["image_path"]))
            normal = item["anomaly_class"] == normal_class
            if key in seen:
                other_phase, j, other_normal = seen[key]
                how = "as normal and as anomalous" if normal != other_normal else "twice"
                raise UserError(f"split file {jpath} lists {key} {how}: entry {j} of '{other_phase}' and entry {i} "
                                f"of '{phase}'; keep one; {fix}")
            seen[key] = (phase, i, normal)


def _entry_problem(item) -> str | None:
    """What is wrong with one entry of a Real-IAD split list, or None."""
    if not isinstance(item, dict):
        return "is not an object"
    if not isinstance(item.get("image_path"), str) or not item["image_path"]:
        return "has no image_path"
    if "anomaly_class" not in item:
        return f"({item['image_path']}) has no anomaly_class"
    if not (item.get("mask_path") is None or isinstance(item["mask_path"], str)):
        return f"({item['image_path']}) has a mask_path that is neither a path nor null"
    return None


def class_names(dataset: str, classes: list[str] | None) -> list[str]:
    """--classes, or the dataset's standard class list."""
    return list(classes or DATASETS[dataset])


def class_samples(dataset: str, root: str, class_name: str, phase: str, resolution: str = "realiad_1024",
                  json_dir: str = "realiad_jsons", allow_outside: bool = False) -> tuple[list[Sample], int]:
    """The samples of one class through the dataset's reader: (samples, anomalous samples without a mask)."""
    if dataset == "realiad":
        return realiad_samples(root, class_name, phase, resolution, json_dir, allow_outside)
    return mvtec_samples(root, class_name, phase), 0


def attach_foreground(samples: list[Sample], foreground_root: str | None = None) -> int:
    """Set each sample's `foreground_path` (CRR's object mask); returns how many samples got one.

    The mask of an image at `rel_path` under its class folder is
    `<foreground_root>/<class>/<rel_path with its OK folder named DISthresh>`, e.g.
    `<root>/<class>/DISthresh/S0001/x.jpg` for the Real-IAD image `OK/S0001/x.jpg`, and
    `<root>/<class>/train/good/x.png` for an MVTec-layout image (no OK folder there).

    foreground_root None (Real-IAD samples only): the released code's folder beside the images,
    `<data_path>/<resolution>_DISthresh` for images in `<data_path>/<resolution>/<class>/`. When that folder
    does not exist, a warning says so and every sample keeps foreground_path None (all-ones foreground), which
    deviates from the paper: its masks come from a salient-object model and are not released.
    A given foreground_root must exist (UserError). Where the folder exists, a missing mask file is a UserError
    naming it.
    """
    roots: dict[str, bool] = {}
    found = 0
    for s in samples:
        s.foreground_path = None
        rel = s.rel_path.split("/")
        root = foreground_root
        if root is None:
            class_dir = s.image_path[: len(s.image_path) - len(s.rel_path)].rstrip("/" + os.sep)
            root = os.path.dirname(class_dir) + "_DISthresh"
        if root not in roots:
            roots[root] = os.path.isdir(root)
            if not roots[root] and foreground_root is not None:
                raise UserError(f"foreground folder not found: {root}; check --foreground_path")
            if not roots[root]:
                logging.getLogger("anomaly").warning(
                    f"warning: no foreground masks ({root} does not exist): anomalies may cover the background, "
                    f"unlike the paper, whose object masks (from a salient-object model) are not released; "
                    f"pass --foreground_path DIR to use your own")
        if not roots[root]:
            continue
        path = os.path.join(root, s.class_name, *["DISthresh" if c == "OK" else c for c in rel])
        if not os.path.isfile(path):
            raise UserError(f"foreground mask not found: {path} (for {s.image_path}); every training image needs "
                            f"one in {root}")
        s.foreground_path = path
        found += 1
    return found
