"""Samples of two modalities, as Dinomaly2's preview feeds them: an RGB image with its depth (MVTec 3D-AD) or with
its infrared image (MulSen-AD). A pair is one input [6, crop, crop]: the RGB image's 3 channels, then the other
modality's as an RGB image, each through the same resize, crop and normalisation (NumPy here: an exported model's
pairs are prepared without PyTorch; dataset.py makes them tensors). The model's `modality`
("rgbd", "rgbir"; models/vitill.py) says what it does with the two halves.

- Depth (`DEPTH`): the sample's `pair_path` is its z map (`<kind>/z/<n>.tiff`, written by
  prepare_data/prepare_mvtec3d.py or by the preview's scripts) or, where there is none, its point cloud
  (`<kind>/xyz/<n>.tiff`), prepared on the fly (depth.prepare_scan; its RGB image and mask padded the same way).
  The depth is coloured and the RGB image's background zeroed per sample (depth.colour_depth, zero_background).
- Infrared (`INFRARED`): `pair_path` is the infrared image, read as RGB like any image.
- Pairing by name (`partner_candidates`, the one rule): on the file system (`partner`, predict.py's --input) and
  among the paths of a folder's files (`pairs_among`, the service's POST /pairs for the review page).

With --cache_images the two resized images of a pair are cached under their own paths (`pair_reader`), so the
on-the-fly preparation of a point cloud runs once per image size.
"""
import functools
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import depth
from .errors import UserError
from .image_cache import Reader, pil_rgb
from .images import load_image, normalised_crop, resize

if TYPE_CHECKING:
    from .dataset import Sample

DEPTH, INFRARED = "depth", "infrared"
PAIR_KINDS = {"rgbd": DEPTH, "rgbir": INFRARED}  # the model's modality -> what the second image is
DEPTH_FOLDERS = ("z", "xyz")  # a sample's depth: its prepared z map, else its point cloud


def depth_candidates(kind_dir: str, stem: str) -> list[str]:
    """Where the depth of sample `stem` in an MVTec 3D-AD folder `<kind>` may lie, the preferred first: its prepared
    z map `<kind>/z/<stem>.tiff`, then its point cloud `<kind>/xyz/<stem>.tiff` (prepared on the fly). Built from
    the sample's own folder, not by replacing 'rgb' in the whole path as the preview does (which breaks when a
    parent folder's name holds 'rgb')."""
    return [os.path.join(kind_dir, folder, stem + ".tiff") for folder in DEPTH_FOLDERS]


def depth_file(kind_dir: str, stem: str) -> str:
    """The depth of sample `stem` in an MVTec 3D-AD folder `<kind>`: the first of depth_candidates that exists."""
    return _first_file(os.path.join(kind_dir, "rgb", stem + ".png"), DEPTH, depth_candidates(kind_dir, stem))


def missing_partner(path: str, kind: str, candidates: list[str], where: str = "") -> str:
    """The one-line error of an RGB image `path` whose other modality's file is none of `candidates` (`where`:
    where it was looked for, after "not found")."""
    what = "depth" if kind == DEPTH else "infrared image"
    return f"no {what} for {path}: {' or '.join(candidates)} not found{where}"


def _first_file(path: str, kind: str, candidates: list[str]) -> str:
    """The first of `candidates` that is a file, else a UserError naming them and the layout."""
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    layout = "MVTec 3D-AD's layout is <class>/<split>/<kind>/{rgb,xyz,gt}" if kind == DEPTH else \
        "MulSen-AD's layout is <class>/{RGB,Infrared}/{train,test/<kind>}/<n>.png"
    raise UserError(f"{missing_partner(path, kind, candidates)}; {layout}")


def is_point_cloud(depth_path: str) -> bool:
    """Whether a depth file is a point cloud to prepare (xyz/), not a prepared z map (z/)."""
    return os.path.basename(os.path.dirname(depth_path)) == "xyz"


@functools.lru_cache(maxsize=2)  # a pair's image and depth are read one after the other
def prepared_scan(xyz_path: str, rgb_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(z map, RGB image) of a point cloud prepared as the preview's scripts do (depth.prepare_scan)."""
    xyz = depth.read_tiff(xyz_path)
    rgb = np.asarray(load_image(rgb_path))
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[:2] != rgb.shape[:2]:
        raise UserError(f"{xyz_path} is not an organised point cloud [H, W, 3] of its image's size "
                        f"{rgb.shape[1]} x {rgb.shape[0]} (it is {list(xyz.shape)}); replace the file")
    z, rgb, _ = depth.prepare_scan(xyz, rgb)
    return z, rgb


def rgbd_arrays(rgb_path: str, depth_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image with its background zeroed, coloured depth), uint8 [S, S, 3] each, as the preview's
    MVTec3DDataset makes them."""
    if is_point_cloud(depth_path):
        z, rgb = prepared_scan(depth_path, rgb_path)
    else:
        z, rgb = depth.read_tiff(depth_path), np.asarray(load_image(rgb_path))
        if z.shape != rgb.shape[:2]:
            raise UserError(f"{depth_path} ({z.shape[1]} x {z.shape[0]}) does not match its image {rgb_path} "
                            f"({rgb.shape[1]} x {rgb.shape[0]}); prepare the dataset again")
    return depth.zero_background(rgb, z), depth.colour_depth(z, depth_path)


def rgbd_from(rgb: np.ndarray, depth_input, name: str = "the depth array") -> tuple[np.ndarray, np.ndarray]:
    """rgbd_arrays for what a detector is given: an RGB image (uint8 [H, W, 3]) and its depth, a file (z map or
    point cloud TIFF) or an array (z map [H, W], or point cloud [H, W, 3], prepared as the dataset's)."""
    if isinstance(depth_input, (str, os.PathLike)):
        name = os.fspath(depth_input)
        z = depth.read_tiff(name)
    else:
        z = np.asarray(depth_input, dtype=np.float32)
    if z.ndim == 3 and z.shape[2] == 3 and z.shape[:2] == rgb.shape[:2]:
        z, rgb, _ = depth.prepare_scan(z, rgb)
    elif z.shape != rgb.shape[:2]:
        raise UserError(f"{name} (shape {list(z.shape)}) is neither a z map [H, W] nor a point cloud [H, W, 3] of "
                        f"its image's size {rgb.shape[1]} x {rgb.shape[0]}")
    return depth.zero_background(rgb, z), depth.colour_depth(z, name)


def partner_candidates(path: str, kind: str) -> list[str]:
    """Where the other modality's file of the RGB image `path` lies in its dataset's layout, from the path alone
    (nothing is read), the preferred first: MVTec 3D-AD's `<kind>/rgb/<n>.png` -> depth_candidates
    (`<kind>/z/<n>.tiff`, `<kind>/xyz/<n>.tiff`), MulSen-AD's `.../RGB/.../<n>.png` -> `.../Infrared/.../<n>.png`
    (the last RGB/ folder of the path). A path outside the layout is a UserError. The one pairing rule: `partner`
    looks for the candidates on the file system, `pairs_among` among a list of paths (the service's POST /pairs,
    which the review page asks)."""
    path = os.path.normpath(path)
    if kind == DEPTH:
        if os.path.basename(os.path.dirname(path)) != "rgb":
            raise UserError(f"{path} is not in an rgb/ folder of MVTec 3D-AD's layout (<kind>/rgb/<n>.png beside "
                            f"<kind>/xyz/<n>.tiff), so its depth cannot be found; pass the pair (image, depth)")
        return depth_candidates(os.path.dirname(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0])
    parts = path.split(os.sep)
    if "RGB" not in parts:
        raise UserError(f"{path} is not in an RGB/ folder of MulSen-AD's layout (.../RGB/.../<n>.png beside "
                        f".../Infrared/.../<n>.png), so its infrared image cannot be found; pass the pair (image, "
                        f"infrared image)")
    i = len(parts) - 1 - parts[::-1].index("RGB")
    return [os.sep.join(parts[:i] + ["Infrared"] + parts[i + 1:])]


def partner(path: str, kind: str) -> str:
    """The other modality's file of an image in its dataset's layout: the first of partner_candidates that
    exists."""
    return _first_file(path, kind, partner_candidates(path, kind))


def is_pair_image(path: str, kind: str) -> bool:
    """Whether a file (of predict's --input, of a folder dropped on the review page) is the RGB image of a pair (not
    a mask, a depth file or an infrared image): in an rgb/ folder (depth); under an RGB/ folder, the last of its
    RGB/ and Infrared/ folders (a folder above the dataset may be named RGB), and not under GT/ (infrared)."""
    parts = os.path.normpath(path).split(os.sep)
    if kind == DEPTH:
        return len(parts) > 1 and parts[-2] == "rgb"
    modal = [i for i, part in enumerate(parts[:-1]) if part in ("RGB", "Infrared")]
    return bool(modal) and parts[modal[-1]] == "RGB" and "GT" not in parts[modal[-1]:]


def pairs_among(paths: list[str], kind: str, where: str = " among the files given") -> tuple[
        list[tuple[str, str]], list[tuple[str, str]]]:
    """The pairs among files known by their paths alone (a folder's files, relative paths): ([(RGB image, its
    other modality's file)], [(RGB image, the one-line error naming its missing file)]), each in the order of
    `paths`. An RGB image is an image name (image_files.is_image_name) that is_pair_image; its partner is the
    first of partner_candidates among `paths`. Other files (masks, depth files, infrared images) are in
    neither list. The paths are answered as given."""
    from .image_files import is_image_name
    given = {}
    for p in paths:
        given.setdefault(os.path.normpath(p), p)
    pairs, unpaired = [], []
    for p in paths:
        if not (is_image_name(os.path.basename(p)) and is_pair_image(p, kind)):
            continue
        candidates = partner_candidates(p, kind)
        found = next((given[c] for c in candidates if c in given), None)
        if found is None:
            unpaired.append((p, missing_partner(p, kind, candidates, where)))
        else:
            pairs.append((p, found))
    return pairs, unpaired


def pair_arrays(s: "Sample") -> tuple[np.ndarray, np.ndarray]:
    """The two images of a pair sample at their own size, uint8 RGB."""
    if s.pair_kind == DEPTH:
        return rgbd_arrays(s.image_path, s.pair_path)
    return np.asarray(load_image(s.image_path)), np.asarray(load_image(s.pair_path))


def pair_crop(images: tuple[np.ndarray, np.ndarray], image_size: int | None, crop_size: int) -> np.ndarray:
    """A pair's two images (uint8 [H, W, 3] each) -> float32 [6, crop, crop]: each resized to `image_size` (None:
    already resized, as the image cache holds them), centre-cropped and normalised, the RGB image's channels first.
    The one input transform of pairs: training and evaluation (pair_crops) and every detector
    (scoring.pair_input)."""
    resized = [Image.fromarray(a) if image_size is None else resize(Image.fromarray(a), image_size) for a in images]
    return np.concatenate([normalised_crop(img, crop_size) for img in resized])


def pair_crops(s: "Sample", image_size: int, crop_size: int, cache=None) -> np.ndarray:
    """A pair sample -> float32 [6, crop, crop] (pair_crop; `cache`: an ImageCache of pair_reader's, holding both
    images resized)."""
    if cache is not None:
        return pair_crop((cache.get(s.image_path), cache.get(s.pair_path)), None, crop_size)
    return pair_crop(pair_arrays(s), image_size, crop_size)


def pair_mask(s: "Sample") -> Image.Image:
    """The mask of a pair sample; a point cloud prepared on the fly pads it as its image."""
    from .dataset import load_mask  # (the evaluation's reader, which imports PyTorch)
    m = load_mask(s.mask_path)
    if s.pair_kind == DEPTH and is_point_cloud(s.pair_path):
        return Image.fromarray(depth.pad_square(np.asarray(m)))
    return m


def rgbd_resized(path: str, size: int) -> np.ndarray:
    """The image cache's reader of MVTec 3D-AD pairs: an RGB image (with its background zeroed) or a depth file
    (coloured), resized as the input transform does."""
    if path.lower().endswith(".tiff"):
        rgb = os.path.join(os.path.dirname(os.path.dirname(path)), "rgb",
                           os.path.splitext(os.path.basename(path))[0] + ".png")
        return np.asarray(resize(Image.fromarray(rgbd_arrays(rgb, path)[1]), size))
    return np.asarray(resize(Image.fromarray(rgbd_arrays(path, partner(path, DEPTH))[0]), size))


RGBD = Reader("rgbd", 3, rgbd_resized)


def pair_reader(kind: str) -> Reader:
    """The image cache's reader of a pair kind's images: RGB and infrared images are plain images."""
    return RGBD if kind == DEPTH else Reader("images", 3, pil_rgb)
