"""Images as the model sees them, without PyTorch: reading a file as 8-bit RGB, accepting what a detector is given
(a path, a PIL image, a NumPy array), and the input transform (square resize, centre crop, ImageNet
normalisation) as NumPy arrays. The training and evaluation tensors (dataset.py) are these arrays, so an exported
model run without PyTorch sees the very pixels the checkpoint saw.
"""
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, UserError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_file(path: str, what: str, where: str) -> Image.Image:
    """Image.open + load (the file is closed afterwards), with one-line UserErrors for a missing or unreadable
    file."""
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"cannot read {what} {path} (a symbolic link to {os.readlink(path)}, which does not "
                            f"exist); fix or remove the link") from None
        raise UserError(f"{what} not found: {path}; check {where}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {what} {path} ({one_line(e)}); replace or remove the file") from None
    return img


def load_image(path: str, upright: bool = False, where: str = "the dataset folder") -> Image.Image:
    """Open an image file as 8-bit RGB (see to_rgb). The readers of training and test images keep the pixels as
    stored, as the reference code does; `upright` (prediction) applies the file's EXIF orientation first, as
    image viewers do. `where`: what to check when the file is missing."""
    img = open_file(path, "image", where)
    return to_rgb(ImageOps.exif_transpose(img) if upright else img)


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


# ----------------------------------------------------------------------------------------------- the transform

def resize(img: Image.Image, size: int) -> Image.Image:
    """Square resize, aspect ratio not kept, bilinear (PIL antialiases when downscaling)."""
    return img.resize((size, size), Image.BILINEAR)


def center_crop_box(size: int, crop: int) -> tuple[int, int, int, int]:
    top = int(round((size - crop) / 2.0))
    return (top, top, top + crop, top + crop)


def normalised_crop(img: Image.Image, crop_size: int) -> np.ndarray:
    """Resized RGB image -> centre crop -> float32 [3, crop, crop], ImageNet-normalised."""
    img = img.crop(center_crop_box(img.size[0], crop_size))
    x = (np.asarray(img, dtype=np.float32) / np.float32(255.0)).transpose(2, 0, 1)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def prepare(img: Image.Image, image_size: int, crop_size: int) -> np.ndarray:
    """The input transform of an RGB image: resize -> centre crop -> normalised float32 [3, crop, crop]."""
    return normalised_crop(resize(img, image_size), crop_size)


def unit_range(x: np.ndarray) -> np.ndarray:
    """Normalised crops (normalised_crop's; [..., 3 k, crop, crop]: a pair's two images side by side) back to RGB
    in [0, 1], float32: what an exported graph takes (it normalises itself)."""
    x = np.asarray(x, dtype=np.float32)
    k = x.shape[-3] // 3
    mean = np.tile(np.asarray(IMAGENET_MEAN, np.float32), k).reshape(3 * k, 1, 1)
    std = np.tile(np.asarray(IMAGENET_STD, np.float32), k).reshape(3 * k, 1, 1)
    return x * std + mean


# ----------------------------------------------------------------------------------------------- what a detector takes

IMAGE_FORMS = ("a path, a PIL image or a numpy array: H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), of uint8, "
               "uint16, bool, or float in [0, 1] or [0, 255]")


def as_rgb(image) -> Image.Image:
    """The one check and conversion of what a detector is given (IMAGE_FORMS) -> 8-bit RGB PIL image. A file or a
    PIL image is turned upright by its EXIF orientation (as viewers show it; the training and evaluation readers
    keep the reference's pixels as stored). Anything else is an InputError naming it and the expected form."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(os.fspath(image), upright=True, where="the path")
    if isinstance(image, np.ndarray):
        image = array_image(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"cannot use a {type(image).__name__} as an image; pass {IMAGE_FORMS}")
    return to_rgb(ImageOps.exif_transpose(image))


def array_image(a: np.ndarray) -> Image.Image:
    """A numpy array (IMAGE_FORMS) -> PIL image, checked: shape, channels, type, finite values and range. Floats
    are read as [0, 1] when they all fit there, else as 0..255; uint16 as 0..65535."""
    def refuse(problem: str):
        raise InputError(f"cannot use an array of shape {a.shape} and type {a.dtype} as an image ({problem}); "
                         f"pass {IMAGE_FORMS.split(': ', 1)[1]}")

    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        refuse(f"{a.ndim} dimension{'s' * (a.ndim != 1)}")
    if a.ndim == 3 and a.shape[2] not in (3, 4):
        refuse(f"{a.shape[2]} channels")
    if a.size == 0:
        refuse("it is empty")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a * (255 / 65535) + 0.5).astype(np.uint8)
    elif a.dtype.kind in "iu" and a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            refuse(f"values from {a.min()} to {a.max()}: integers other than uint16 must lie in 0..255")
        a = a.astype(np.uint8)
    elif a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            refuse(f"{bad} of its values are NaN or infinite")
        if a.min() < 0 or a.max() > 255:
            refuse(f"values from {a.min():g} to {a.max():g}, outside [0, 255]")
        a = (a.astype(np.float64) * (255.0 if a.max() <= 1 else 1.0) + 0.5).astype(np.uint8)
    elif a.dtype != np.uint8:
        refuse("not a number type")
    return Image.fromarray(np.ascontiguousarray(a))
