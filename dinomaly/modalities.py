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


def depth_file(kind_dir: str, stem: str) -> str:
    """The depth of sample `stem` in an MVTec 3D-AD folder `<kind>`: `<kind>/z/<stem>.tiff` when it exists, else
    `<kind>/xyz/<stem>.tiff` (prepared on the fly). The path is built from the sample's own folder, not by
    replacing 'rgb' in the whole path as the preview does (which breaks when a parent folder's name holds 'rgb')."""
    for folder in DEPTH_FOLDERS:
        path = os.path.join(kind_dir, folder, stem + ".tiff")
        if os.path.isfile(path):
            return path
    raise UserError(f"no depth for {os.path.join(kind_dir, 'rgb', stem)}.png: neither {kind_dir}/z/{stem}.tiff nor "
                    f"{kind_dir}/xyz/{stem}.tiff exists; MVTec 3D-AD's layout is <class>/<split>/<kind>/"
                    f"{{rgb,xyz,gt}}")


def is_point_cloud(depth_path: str) -> bool:
    """Whether a depth file is a point cloud to prepare (xyz/), not a prepared z map (z/)."""
    return os.path.basename(os.path.dirname(depth_path)) == "xyz"


def depth_of_image(rgb_path: str) -> str:
    """The depth file of an MVTec 3D-AD image `<kind>/rgb/<n>.png`."""
    return depth_file(os.path.dirname(os.path.dirname(rgb_path)), os.path.splitext(os.path.basename(rgb_path))[0])


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


def partner(path: str, kind: str) -> str:
    """The other modality's file of an image in its dataset's layout: MVTec 3D-AD's `<kind>/rgb/<n>.png` -> its
    depth (depth_file), MulSen-AD's `.../RGB/.../<n>.png` -> `.../Infrared/.../<n>.png`."""
    if kind == DEPTH:
        if os.path.basename(os.path.dirname(path)) != "rgb":
            raise UserError(f"{path} is not in an rgb/ folder of MVTec 3D-AD's layout (<kind>/rgb/<n>.png beside "
                            f"<kind>/xyz/<n>.tiff), so its depth cannot be found; pass the pair (image, depth)")
        return depth_of_image(path)
    parts = os.path.normpath(path).split(os.sep)
    if "RGB" not in parts:
        raise UserError(f"{path} is not in an RGB/ folder of MulSen-AD's layout (.../RGB/.../<n>.png beside "
                        f".../Infrared/.../<n>.png), so its infrared image cannot be found; pass the pair (image, "
                        f"infrared image)")
    i = len(parts) - 1 - parts[::-1].index("RGB")
    other = os.sep.join(parts[:i] + ["Infrared"] + parts[i + 1:])
    if not os.path.isfile(other):
        raise UserError(f"no infrared image for {path}: {other} not found")
    return other


def is_pair_image(path: str, kind: str) -> bool:
    """Whether a file found under predict's --input is the RGB image of a pair (not a mask, a depth file or an
    infrared image): in an rgb/ folder (depth), or under an RGB/ folder and not under GT/ (infrared)."""
    parts = os.path.normpath(path).split(os.sep)
    if kind == DEPTH:
        return len(parts) > 1 and parts[-2] == "rgb"
    return "RGB" in parts and "GT" not in parts[parts.index("RGB"):]


def pair_arrays(s: "Sample") -> tuple[np.ndarray, np.ndarray]:
    """The two images of a pair sample at their own size, uint8 RGB."""
    if s.pair_kind == DEPTH:
        return rgbd_arrays(s.image_path, s.pair_path)
    return np.asarray(load_image(s.image_path)), np.asarray(load_image(s.pair_path))


def pair_crops(s: "Sample", image_size: int, crop_size: int, cache=None) -> np.ndarray:
    """A pair sample -> float32 [6, crop, crop]: both images resized, centre-cropped and normalised (`cache`: an
    ImageCache of pair_reader's, holding both)."""
    if cache is not None:
        images = [cache.get(s.image_path), cache.get(s.pair_path)]
    else:
        images = [np.asarray(resize(Image.fromarray(a), image_size)) for a in pair_arrays(s)]
    return np.concatenate([normalised_crop(Image.fromarray(a), crop_size) for a in images])


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
    return np.asarray(resize(Image.fromarray(rgbd_arrays(path, depth_of_image(path))[0]), size))


RGBD = Reader("rgbd", 3, rgbd_resized)


def pair_reader(kind: str) -> Reader:
    """The image cache's reader of a pair kind's images: RGB and infrared images are plain images."""
    return RGBD if kind == DEPTH else Reader("images", 3, pil_rgb)
