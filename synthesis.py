"""CRR anomaly synthesis (SPEC section 7.1).

Every training image gets a synthetic anomaly: a Perlin-noise mask (optionally restricted to a foreground
mask) decides where, an augmented anomaly source (a DTD texture or the image itself, grid-shuffled) decides
what, and a random opacity `beta` blends it in:

    I' = I * (1 - M) + (1 - beta) * A * M + beta * I * M

The official code uses `imgaug` for the augmenters; here they are re-expressed with NumPy, OpenCV and
Pillow. Every random draw comes from an explicit `numpy.random.Generator`, so a given generator state
always gives the same anomaly.
"""
import math
import os

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset

from dataset import center_crop_box, image_to_tensor, load_image, load_mask, resize
from errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------------------
# Perlin noise and mask
# ------------------------------------------------------------------------------------------------------

def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # 6t^5 - 15t^4 + 10t^3


def perlin_noise_2d(shape, res, rng: np.random.Generator) -> np.ndarray:
    """Classic 2-D gradient Perlin noise, float32 array of `shape`, values in [-1, 1].

    `res` = (cells along axis 0, cells along axis 1). Random unit gradients sit on a (res0+1) x (res1+1)
    lattice; pixel (i, j) of a shape that is a multiple of res lies at lattice coordinate
    (i * res0 / H, j * res1 / W), so the noise is exactly 0 on lattice points. A shape that is not a multiple
    of res is computed on the next multiple and cropped. The raw noise (range +-sqrt(1/2)) is scaled by
    sqrt(2), as DRAEM does, so that the 0.5 threshold of the mask is meaningful.
    """
    h, w = int(shape[0]), int(shape[1])
    if isinstance(res, (int, np.integer)):
        res = (res, res)
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise_2d: bad shape {shape} or res {res}")
    hp, wp = -(-h // ry) * ry, -(-w // rx) * rx  # padded to multiples of res

    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # [ry+1, rx+1, 2] (d_axis0, d_axis1)

    ys = np.arange(h) * (ry / hp)
    xs = np.arange(w) * (rx / wp)
    iy, ix = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]  # fractional positions inside the cell

    def corner(dy, dx):
        g = grad[(iy + dy)[:, None], (ix + dx)[None, :]]  # [h, w, 2]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    uy, ux = _fade(fy), _fade(fx)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    noise = math.sqrt(2.0) * (top + uy * (bottom - top))
    return np.clip(noise, -1.0, 1.0).astype(np.float32)


def _rotate_float(arr: np.ndarray, angle: float) -> np.ndarray:
    h, w = arr.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(angle), 1.0)
    return cv2.warpAffine(arr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _as_foreground(foreground, size: int) -> np.ndarray | None:
    """Binary float32 [size, size] foreground, or None for 'no restriction'."""
    if foreground is None:
        return None
    f = np.asarray(foreground, dtype=np.float32)
    if f.ndim == 3:
        f = f[..., 0]
    if f.shape != (size, size):
        f = cv2.resize(f, (size, size), interpolation=cv2.INTER_NEAREST)
    return (f > 0.5).astype(np.float32)


def perlin_mask(size: int, rng: np.random.Generator, foreground=None, max_tries: int = 50,
                res=None, angle=None) -> np.ndarray:
    """Binary Perlin anomaly mask, float32 {0, 1} of shape [size, size].

    Each try: lattice resolution 2**k per axis (k uniform in {0..5}, independently), noise rotated by
    an angle uniform in [-90, 90] degrees about the centre (outside -> 0), thresholded at > 0.5, multiplied by
    the foreground F. Redrawn until non-empty, at most `max_tries` times; after that the last (empty) draw
    is returned. An all-zero foreground can never give an anomaly, so it is treated like no foreground
    (F = all ones, as DRAEM does without a mask): every sample keeps its anomaly.
    `res` / `angle` fix those draws (tests and visualisation only).
    """
    fg = _as_foreground(foreground, size)
    if fg is not None and not fg.any():
        fg = None
    mask = np.zeros((size, size), np.float32)
    for _ in range(max(1, int(max_tries))):
        if res is None:
            r = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        else:
            r = res
        a = float(rng.uniform(-90.0, 90.0)) if angle is None else float(angle)
        noise = _rotate_float(perlin_noise_2d((size, size), r, rng), a)
        mask = (noise > 0.5).astype(np.float32)
        if fg is not None:
            mask *= fg
        if mask.any():
            break
    return mask


# ------------------------------------------------------------------------------------------------------
# Augmenters: uint8 HxWx3 RGB in, uint8 HxWx3 RGB out. Optional keyword arguments fix the random draws.
# ------------------------------------------------------------------------------------------------------

def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.clip(np.round(table), 0, 255).astype(np.uint8)[img]


def gamma_contrast(img, rng, gamma=None):
    """255 * (x / 255) ** gamma, gamma ~ U(0.5, 2) drawn per channel."""
    gamma = rng.uniform(0.5, 2.0, size=3) if gamma is None else np.broadcast_to(np.asarray(gamma, float), (3,))
    x = np.arange(256) / 255.0
    out = np.empty_like(img)
    for c in range(3):
        out[..., c] = _lut(img[..., c], 255.0 * x ** gamma[c])
    return out


def brightness(img, rng, mul=None, add=None):
    """Multiply the luma (Y of YCrCb) by U(0.8, 1.2) and add U(-30, 30); chroma unchanged."""
    mul = rng.uniform(0.8, 1.2) if mul is None else float(mul)
    add = rng.uniform(-30.0, 30.0) if add is None else float(add)
    ycc = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2YCrCb)
    ycc[..., 0] = _lut(ycc[..., 0], np.arange(256) * mul + add)
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB)


def sharpness(img, rng, factor=None):
    """PIL sharpness enhancement, factor ~ U(0, 2) (0 blurred, 1 unchanged, 2 sharpened)."""
    factor = rng.uniform(0.0, 2.0) if factor is None else float(factor)
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))


def hue_saturation(img, rng, hue=None, sat=None):
    """Add U(-50, 50) to hue (0..255 scale = 360 degrees, cyclic) and, independently drawn, to saturation."""
    hue = int(rng.integers(-50, 51)) if hue is None else int(hue)
    sat = int(rng.integers(-50, 51)) if sat is None else int(sat)
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + hue) % 256).astype(np.uint8)
    hsv[..., 1] = np.clip(hsv[..., 1].astype(np.int32) + sat, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def solarize(img, rng, threshold=None, p=0.5):
    """With probability p, invert every value >= threshold (threshold uniform integer in 32..128)."""
    threshold = int(rng.integers(32, 129)) if threshold is None else int(threshold)
    if rng.random() >= p:
        return img.copy()
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def posterize(img, rng, bits=None):
    """Keep the `bits` most significant bits of each value, bits uniform in 1..8 (8 = unchanged)."""
    bits = int(rng.integers(1, 9)) if bits is None else int(bits)
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def invert(img, rng=None):
    return (255 - img).astype(np.uint8)


def autocontrast(img, rng, cutoff=None):
    """PIL autocontrast per channel, cutting `cutoff` percent (uniform integer 0..20) from each end."""
    cutoff = int(rng.integers(0, 21)) if cutoff is None else cutoff
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff))


def equalize(img, rng=None):
    return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def rotate(img, rng, angle=None):
    """Rotate by U(-45, 45) degrees about the centre, bilinear, same size, outside filled with 0."""
    angle = rng.uniform(-45.0, 45.0) if angle is None else float(angle)
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    return cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


AUGMENTERS = {
    "gamma_contrast": gamma_contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "hue_saturation": hue_saturation,
    "solarize": solarize,
    "posterize": posterize,
    "invert": invert,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
}


def random_augment(img, rng, n: int = 3, return_names: bool = False):
    """Apply `n` distinct augmenters, chosen at random (order random too), in sequence."""
    names = list(AUGMENTERS)
    picked = [names[k] for k in rng.choice(len(names), size=n, replace=False)]
    out = np.ascontiguousarray(img, dtype=np.uint8)
    for name in picked:
        out = np.ascontiguousarray(AUGMENTERS[name](out, rng))
    return (out, picked) if return_names else out


# ------------------------------------------------------------------------------------------------------
# Grid shuffle and blending
# ------------------------------------------------------------------------------------------------------

def _shuffle_axis(img, rng, strips, axis):
    parts = np.array_split(img, strips, axis=axis)
    evens = [parts[k] for k in rng.permutation(np.arange(0, len(parts), 2))]
    odds = [parts[k] for k in rng.permutation(np.arange(1, len(parts), 2))]
    return np.concatenate(evens + odds, axis=axis)


def grid_shuffle(img, rng, strips: int = 8):
    """Cut into `strips` vertical strips (np.array_split, so sizes may differ by one pixel), shuffle the
    even-indexed strips among themselves and the odd-indexed among themselves, lay out evens then odds;
    then the same with horizontal strips."""
    out = _shuffle_axis(np.asarray(img), rng, strips, axis=1)
    return np.ascontiguousarray(_shuffle_axis(out, rng, strips, axis=0))


def blend(image, source, mask, beta):
    """I' = I (1 - M) + (1 - beta) A M + beta I M; float images in [0, 1], mask [H, W, 1] (or [H, W])."""
    image = np.asarray(image, dtype=np.float32)
    source = np.asarray(source, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim == image.ndim - 1:
        mask = mask[..., None]
    return image * (1.0 - mask) + (1.0 - beta) * source * mask + beta * image * mask


# ------------------------------------------------------------------------------------------------------
# Synthesizer and dataset
# ------------------------------------------------------------------------------------------------------

def list_textures(root: str) -> list[str]:
    """Texture images for the anomaly source: `<root>/images/*/*.jpg` (DTD layout) if `<root>/images`
    exists, else any image under `root` (recursively). Sorted, so the list is the same on every run."""
    if not root or not os.path.isdir(root):
        raise UserError(f"anomaly source folder not found: {root}")
    base = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
    paths = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        dirnames.sort()
        paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not paths:
        raise UserError(f"no texture images (jpg/png/bmp/tif/webp) found under {root}; expected the DTD layout "
                        f"<dtd>/images/<category>/*.jpg")
    return paths


class AnomalySynthesizer:
    """Synthesises one anomaly per call (SPEC 7.1).

    `__call__(image, rng, foreground=None)`: image uint8 [size, size, 3] RGB (other sizes are resized),
    optional foreground [size, size] (non-zero = object). Returns (augmented uint8 image, mask float32 {0,1}).
    Order of draws from rng: source choice, texture index, the 3 augmenters, grid shuffle (self source
    only), beta, Perlin mask.
    """

    def __init__(self, texture_paths: list[str] | None = None, size: int = 448):
        self.texture_paths = list(texture_paths or [])
        self.size = int(size)

    def __call__(self, image, rng: np.random.Generator, foreground=None):
        image = np.asarray(image, dtype=np.uint8)
        if image.shape[:2] != (self.size, self.size):
            image = np.asarray(resize(Image.fromarray(image), self.size))

        use_texture = rng.random() < 0.5 and len(self.texture_paths) > 0
        if use_texture:
            path = self.texture_paths[int(rng.integers(len(self.texture_paths)))]
            source = np.asarray(resize(load_image(path), self.size))
        else:
            source = image
        source = random_augment(source, rng, 3)
        if not use_texture:
            source = grid_shuffle(source, rng, 8)
        beta = float(rng.uniform(0.2, 0.8))
        mask = perlin_mask(self.size, rng, foreground=foreground)

        out = blend(image / 255.0, source / 255.0, mask[..., None], beta)
        out = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
        return out, mask


class SyntheticAnomalyDataset(Dataset):
    """Normal training images with a synthetic anomaly each -> (img [3,c,c], aug_img [3,c,c], aug_mask [1,c,c]).

    The anomaly of index i depends only on (seed, epoch, i) via `np.random.default_rng([seed, epoch, i])`,
    so it is the same whatever worker loads it. Call `set_epoch(e)` before each pass (with DataLoader
    workers that are re-created per epoch, i.e. persistent_workers=False, the workers see the new epoch).
    """

    def __init__(self, samples, image_size: int = 448, crop_size: int = 392, texture_paths=None, seed: int = 1):
        self.samples = samples
        self.image_size, self.crop_size = int(image_size), int(crop_size)
        self.seed = int(seed)
        self.epoch = 0
        self.synthesizer = AnomalySynthesizer(texture_paths, size=self.image_size)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        img = resize(load_image(s.image_path), self.image_size)
        fg = None
        if getattr(s, "foreground_path", None):
            fg = np.asarray(resize(load_mask(s.foreground_path), self.image_size), dtype=np.float32) / 255.0
            fg = (fg >= 0.5).astype(np.float32)
        aug, mask = self.synthesizer(np.asarray(img), rng, foreground=fg)
        top, left, bottom, right = center_crop_box(self.image_size, self.crop_size)
        mask_t = torch.from_numpy(np.ascontiguousarray(mask[top:bottom, left:right], dtype=np.float32))[None]
        return (image_to_tensor(img, self.crop_size), image_to_tensor(Image.fromarray(aug), self.crop_size),
                mask_t)
