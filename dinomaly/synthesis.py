"""CRR anomaly synthesis, as the released CRR code does it (RealIADDataset.transform_image).

Every training image gets a synthetic anomaly. The image is resized with `cv2.resize` (bilinear, no
antialiasing) to S x S; a thresholded, rotated Perlin noise times the object (foreground) mask F gives the
anomaly mask M (soft where F is soft); an anomaly source A (a DTD texture with probability 0.5, else the
image itself, cut into strips and shuffled), changed by 3 random augmenters, is blended in with opacity beta:

    I' = I * (1 - M) + (1 - beta) * A * M + beta * I * M,   then (I' * 255).astype(uint8)

The clean training target is resized with PIL instead (dataset.resize), so the synthetic image differs from
it slightly everywhere, as in the released code.

The released code uses `imgaug` 0.4.0 for the augmenters; each is re-expressed here with NumPy, OpenCV and
Pillow, following imgaug's uint8 code paths. Every random draw comes from an explicit
`numpy.random.Generator`, so a given generator state always gives the same anomaly.
"""
import glob
import logging
import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import Dataset

from .dataset import epoch_key, image_to_tensor, load_image, mask_to_tensor, resize
from .errors import UserError
from .image_cache import PIL_RGB, Reader, build_caches

log = logging.getLogger("anomaly")

DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/"
PERLIN_TRIES = 50  # Perlin draws per image before giving up (the mask then stays empty)


# ------------------------------------------------------------------------------------------------------
# Reading the anomaly sources and the foreground masks
# ------------------------------------------------------------------------------------------------------

def list_textures(path: str) -> list[str] | None:
    """The DTD texture images `<path>/images/*/*.jpg`, sorted; None for the literal `none`.

    `none` trains with self-made anomalies only (the image itself as the anomaly source), which is not the
    paper's recipe: a warning says so. A missing folder, or one without DTD images, is a UserError saying
    where DTD comes from.
    """
    if path == "none":
        log.warning("warning: --anomaly_source_path none: every anomaly is cut from the training image itself; "
                    "the paper's recipe pastes a DTD texture into half of them")
        return None
    fix = (f"CRR pastes textures from the Describable Textures Dataset ({DTD_URL}): unpack it so that "
           f"{os.path.join(path, 'images', '<category>', '*.jpg')} exist, or pass --anomaly_source_path none "
           f"to train with self-made anomalies only")
    if not os.path.isdir(path):
        raise UserError(f"anomaly source folder not found: {path}; {fix}")
    paths = sorted(glob.glob(os.path.join(glob.escape(path), "images", "*", "*.jpg")))
    if not paths:
        raise UserError(f"no DTD images in {path}; {fix}")
    return paths


def load_texture(path: str, size: int) -> np.ndarray:
    """A texture as uint8 RGB [size, size, 3]: read by OpenCV, resized with cv2.resize (bilinear)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"cannot read texture image {path}; replace or remove the file")
    return cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_LINEAR)


def load_foreground(path: str, size: int, cache=None) -> np.ndarray:
    """An object mask as float32 [size, size] in [0, 1]: read as grey by OpenCV, resized with cv2.resize
    (bilinear), divided by 255 and never binarised, so soft edges stay soft. `cache`: an ImageCache of
    FOREGROUND masks, or None."""
    grey = cache.get(path) if cache is not None else foreground_grey(path, size)
    return grey.astype(np.float32) / 255.0


def foreground_grey(path: str, size: int) -> np.ndarray:
    """An object mask as uint8 [size, size]: read as grey by OpenCV, resized with cv2.resize (bilinear)."""
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise UserError(f"cannot read foreground mask {path}; replace the file")
    return cv2.resize(grey, (size, size), interpolation=cv2.INTER_LINEAR)


def cv2_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 RGB of any size -> [size, size, 3] by cv2.resize (bilinear, no antialiasing): the synthesis' base."""
    return cv2.resize(np.ascontiguousarray(image, dtype=np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)


def cv2_rgb(path: str, size: int) -> np.ndarray:
    """A training image as the synthesis' base: read as RGB (dataset.load_image), cv2-resized."""
    return cv2_resize(np.asarray(load_image(path)), size)


# What --cache_images keeps for the synthesis, besides the clean images (image_cache.PIL_RGB)
CV2_RGB = Reader("images_cv2", 3, cv2_rgb)
FOREGROUND = Reader("foreground", 1, foreground_grey)
TEXTURE = Reader("textures", 3, load_texture)


def synthesis_caches(mode: str, samples, texture_paths: list[str] | None, size: int, folder: str | None) -> dict:
    """The --cache_images caches of CRR's training data ({} for "none"): "clean" (PIL-resized images), "base"
    (cv2-resized images), "foreground" (object masks) and "texture" (DTD textures) where there are any."""
    images = [s.image_path for s in samples]
    return build_caches(mode, {"clean": (images, PIL_RGB), "base": (images, CV2_RGB),
                               "foreground": ([s.foreground_path for s in samples if s.foreground_path], FOREGROUND),
                               "texture": (texture_paths or [], TEXTURE)}, size, folder)


# ------------------------------------------------------------------------------------------------------
# Perlin noise and mask
# ------------------------------------------------------------------------------------------------------

def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # 6t^5 - 15t^4 + 10t^3


def perlin_noise_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient Perlin noise, float64 array of `shape`, scaled by sqrt(2) as DRAEM and CRR do.

    `res` = (lattice cells along axis 0, along axis 1). Random unit gradients (angles uniform in [0, 2 pi))
    sit on a (res0+1) x (res1+1) lattice; pixel (i, j) lies at lattice coordinate (i * res0 / H, j * res1 / W)
    when H, W are multiples of res, so the noise is 0 on lattice points. Other shapes are computed on the
    next multiples and cropped.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"perlin_noise_2d: bad shape {shape} or res {res}")
    hp, wp = -(-h // ry) * ry, -(-w // rx) * rx

    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    grad_y, grad_x = np.cos(angles), np.sin(angles)  # the gradients' components along axis 0 and axis 1
    ys, xs = np.arange(h) * (ry / hp), np.arange(w) * (rx / wp)
    iy, ix = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        """Dot product of the gradient at lattice corner (+dy, +dx) with the offset from that corner."""
        out = grad_y[iy + dy][:, ix + dx]
        out *= fy - dy
        out += grad_x[iy + dy][:, ix + dx] * (fx - dx)
        return out

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    uy, ux = _fade(fy), _fade(fx)
    left = n00 + uy * (n10 - n00)  # interpolated along axis 0
    right = n01 + uy * (n11 - n01)
    return math.sqrt(2.0) * (left + ux * (right - left))


def affine_rotate(arr: np.ndarray, angle: float) -> np.ndarray:
    """Rotate by `angle` degrees about the pixel centre ((W-1)/2, (H-1)/2), as imgaug's Affine(rotate=...):
    positive angles turn clockwise on screen (y down), bilinear, same size, outside filled with 0."""
    h, w = arr.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    forward = np.array([[c, -s, cx - c * cx + s * cy],
                        [s, c, cy - s * cx - c * cy]])
    return cv2.warpAffine(np.ascontiguousarray(arr), forward, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def perlin_resolution(rng: np.random.Generator) -> tuple[int, int]:
    """Lattice cells per axis, 2**k with k uniform in {0, ..., 5}, drawn independently for the two axes."""
    return 2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6))


def perlin_mask(size: int, res: tuple[int, int], rng: np.random.Generator, foreground=None,
                max_tries: int = PERLIN_TRIES) -> np.ndarray:
    """Anomaly mask M = F * [rotated Perlin noise > 0.5], float32 [size, size] in [0, 1].

    With the lattice resolution `res` fixed, each try draws new noise and a rotation angle uniform in
    [-90, 90] degrees, until M is non-empty, at most `max_tries` times (then M stays empty). F (float
    [size, size] in [0, 1], None = all ones) keeps its soft values. A foreground without any positive value
    gives an empty mask at once: no try could succeed.
    """
    fg = np.ones((size, size), np.float32) if foreground is None else np.asarray(foreground, np.float32)
    if fg.shape != (size, size):
        raise ValueError(f"foreground of shape {fg.shape}, expected {(size, size)}")
    mask = np.zeros((size, size), np.float32)
    if not (fg > 0).any():
        return mask
    for _ in range(max_tries):
        noise = perlin_noise_2d((size, size), res, rng)
        noise = affine_rotate(noise, float(rng.uniform(-90.0, 90.0)))
        mask = ((noise > 0.5) * fg).astype(np.float32)
        if mask.any():
            break
    return mask


# ------------------------------------------------------------------------------------------------------
# Augmenters (imgaug 0.4.0 behaviour): uint8 HxWx3 RGB in, uint8 HxWx3 RGB out.
# Optional keyword arguments fix the random draws.
# ------------------------------------------------------------------------------------------------------

def gamma_contrast(img, rng, gamma=None):
    """GammaContrast((0.5, 2.0), per_channel=True): per channel a gamma ~ U(0.5, 2); the table
    255 * (v / 255) ** gamma is computed in float32 and truncated to uint8."""
    gamma = rng.uniform(0.5, 2.0, size=3) if gamma is None else np.broadcast_to(np.asarray(gamma, float), (3,))
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    out = np.empty_like(img)
    for c in range(3):
        table = np.clip(levels ** np.float32(gamma[c]) * 255, 0, 255).astype(np.uint8)
        out[..., c] = table[img[..., c]]
    return out


# colour space -> (from RGB, back to RGB, index of the brightness channel), as imgaug's WithBrightnessChannels
BRIGHTNESS_SPACES = {
    "YCrCb": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0),
    "HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
    "HLS": (cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1),
    "Lab": (cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
    "Luv": (cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0),
    "YUV": (cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0),
}


def brightness(img, rng, space=None, multiply_first=None, mul=None, add=None):
    """MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)).

    A colour space drawn per image among YCrCb, HSV, HLS, Lab, Luv, YUV (OpenCV uint8 conversions); its
    brightness channel is multiplied by mul ~ U(0.8, 1.2) (float32 table, truncated) and gets
    round(add), add ~ U(-30, 30), added (clipped to 0..255), the two in random order; then back to RGB.
    """
    names = list(BRIGHTNESS_SPACES)
    space = names[int(rng.integers(len(names)))] if space is None else space
    multiply_first = bool(rng.random() < 0.5) if multiply_first is None else multiply_first
    mul = rng.uniform(0.8, 1.2) if mul is None else mul
    add = rng.uniform(-30.0, 30.0) if add is None else add
    to_space, to_rgb, channel = BRIGHTNESS_SPACES[space]
    mul_table = np.clip(np.arange(256, dtype=np.float32) * np.float32(mul), 0, 255).astype(np.uint8)
    add_table = np.clip(np.arange(256) + int(np.round(add)), 0, 255).astype(np.uint8)
    converted = cv2.cvtColor(np.ascontiguousarray(img), to_space)
    tables = (mul_table, add_table) if multiply_first else (add_table, mul_table)
    for table in tables:
        converted[..., channel] = table[converted[..., channel]]
    return cv2.cvtColor(converted, to_rgb)


def sharpness(img, rng, factor=None):
    """pillike.EnhanceSharpness(): PIL sharpness with factor ~ U(0, 2) (0 blurred, 1 unchanged)."""
    factor = rng.uniform(0.0, 2.0) if factor is None else float(factor)
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor))


def hue_saturation(img, rng, hue=None, sat=None):
    """AddToHueAndSaturation((-50, 50), per_channel=True): hue and saturation values drawn independently,
    integers in -50..50. In OpenCV's HSV (hue 0..179) the hue moves by int(hue / 255 * 180) (cyclic) and
    the saturation by sat (clipped)."""
    hue = int(rng.integers(-50, 51)) if hue is None else int(hue)
    sat = int(rng.integers(-50, 51)) if sat is None else int(sat)
    shift = int(np.float32(hue) / np.float32(255.0) * np.float32(180.0))
    hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = np.mod(hsv[..., 0] + shift, 180)
    hsv[..., 1] = np.clip(hsv[..., 1] + sat, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def solarize(img, rng, threshold=None, apply=None):
    """Solarize(0.5, threshold=(32, 128)): with probability 0.5, invert every value v >= int(threshold),
    threshold ~ U(32, 128) continuous (imgaug's uint8 table cuts at int(threshold))."""
    apply = bool(rng.random() < 0.5) if apply is None else apply
    threshold = rng.uniform(32.0, 128.0) if threshold is None else threshold
    if not apply:
        return img.copy()
    return np.where(img >= int(threshold), 255 - img, img).astype(np.uint8)


def posterize(img, rng, bits=None):
    """Posterize(): keep the `bits` most significant bits of each value, bits uniform in 1..8."""
    bits = int(rng.integers(1, 9)) if bits is None else int(bits)
    return img & np.uint8((0xFF << (8 - bits)) & 0xFF)


def invert(img, rng):
    """Invert(): 255 - v."""
    return (255 - img).astype(np.uint8)


def autocontrast(img, rng, cutoff=None):
    """pillike.Autocontrast(): PIL autocontrast per channel, cutting `cutoff` percent (integer in 0..20)."""
    cutoff = int(rng.integers(0, 21)) if cutoff is None else cutoff
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff))


def equalize(img, rng):
    """pillike.Equalize(), imgaug's own histogram formula (what it runs on images of 4096 values or more):
    per channel, step = (count of all values but 255) // 255; level v maps to
    min(255, (step // 2 + count of values below v) // step); identity when step is 0 or one level only."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        hist = np.bincount(img[..., c].ravel(), minlength=256)
        step = int(hist[:-1].sum()) // 255
        if np.count_nonzero(hist) <= 1 or step == 0:
            out[..., c] = img[..., c]
            continue
        below = np.concatenate([[0], np.cumsum(hist)[:-1]])
        table = np.minimum((step // 2 + below) // step, 255).astype(np.uint8)
        out[..., c] = table[img[..., c]]
    return out


def rotate(img, rng, angle=None):
    """Affine(rotate=(-45, 45)): angle ~ U(-45, 45) degrees, see affine_rotate."""
    angle = rng.uniform(-45.0, 45.0) if angle is None else float(angle)
    return affine_rotate(img, angle)


# in the order of the released code's list, from which 3 distinct ones are drawn
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


def random_augment(img: np.ndarray, rng: np.random.Generator, n: int = 3) -> tuple[np.ndarray, tuple[str, ...]]:
    """Apply `n` distinct augmenters, drawn at random (their order too), in sequence.
    Returns (augmented image, augmenter names in the order applied)."""
    names = list(AUGMENTERS)
    picked = tuple(names[k] for k in rng.choice(len(names), size=n, replace=False))
    out = np.ascontiguousarray(img, dtype=np.uint8)
    for name in picked:
        out = np.ascontiguousarray(AUGMENTERS[name](out, rng))
    return out, picked


# ------------------------------------------------------------------------------------------------------
# Grid shuffle and blending
# ------------------------------------------------------------------------------------------------------

def _strips(img: np.ndarray, axis: int, parts: int) -> list[np.ndarray]:
    """Strips of int(n / parts) pixels along `axis` (n the image's extent), the remainder as one more strip."""
    n = img.shape[axis]
    width = n // parts
    if width < 1:
        raise ValueError(f"grid_shuffle: an image of {n} pixels cannot be cut into {parts} strips")
    return np.split(img, range(width, n, width), axis=axis)


def _evens_then_odds(strips: list, rng: np.random.Generator) -> list:
    """Even-indexed strips shuffled among themselves, then the odd-indexed ones shuffled among themselves."""
    evens, odds = strips[::2], strips[1::2]
    return [evens[k] for k in rng.permutation(len(evens))] + [odds[k] for k in rng.permutation(len(odds))]


def grid_shuffle(img: np.ndarray, rng: np.random.Generator, parts: int = 8) -> np.ndarray:
    """The released code's strip shuffle of the self-made anomaly source.

    Vertical strips: evens shuffled, then odds shuffled, laid out evens then odds. Horizontal strips: all
    shuffled first, then the same even/odd shuffle and layout. Strips are int(n / 8) pixels wide, so an
    extent that is not a multiple of 8 gives a ninth, narrower strip.
    """
    out = np.concatenate(_evens_then_odds(_strips(np.asarray(img), 1, parts), rng), axis=1)
    rows = _strips(out, 0, parts)
    rows = [rows[k] for k in rng.permutation(len(rows))]
    return np.ascontiguousarray(np.concatenate(_evens_then_odds(rows, rng), axis=0))


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """I' = I (1 - M) + (1 - beta) A M + beta I M in float32 on [0, 1] images, then (I' * 255) truncated to
    uint8. image, source: uint8 [H, W, 3]; mask: float [H, W] in [0, 1]."""
    m = np.asarray(mask, np.float32)[..., None]
    i = image.astype(np.float32) / 255.0
    a = source.astype(np.float32) * m / 255.0
    b = np.float32(beta)
    out = i * (1 - m) + (1 - b) * a + b * i * m
    return (out * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------
# Synthesizer and dataset
# ------------------------------------------------------------------------------------------------------

@dataclass
class Synthesis:
    """One synthetic anomaly and the draws that made it."""
    image: np.ndarray  # uint8 [S, S, 3] RGB: the cv2-resized image with the anomaly blended in
    mask: np.ndarray  # float32 [S, S] in [0, 1]: M = F * Perlin (all zero: no anomaly)
    source: str  # the texture file, or "self"
    augmenters: tuple[str, ...]
    beta: float
    perlin_res: tuple[int, int]


class AnomalySynthesizer:
    """Synthesises one anomaly per call.

    `__call__(image, rng, foreground=None) -> Synthesis`: image uint8 RGB of any size, resized with
    cv2.resize (bilinear) to `size`, then `synthesize`. `synthesize(base, rng, foreground=None)`: base the
    resized image, uint8 [size, size, 3]; foreground float32 [size, size] in [0, 1] (None: all ones).
    Draws, in order: Perlin resolution, Perlin tries, the source (a texture with probability 0.5 when
    there are textures, else the image), 3 augmenters and their parameters, the grid shuffle (self source
    only), beta ~ U(0.2, 0.8). `texture_cache`: an ImageCache of the textures (reader TEXTURE), or None.
    """

    def __init__(self, texture_paths: list[str] | None = None, size: int = 448, texture_cache=None):
        self.texture_paths = list(texture_paths or [])
        self.size = int(size)
        self.texture_cache = texture_cache

    def __call__(self, image: np.ndarray, rng: np.random.Generator, foreground=None) -> Synthesis:
        return self.synthesize(cv2_resize(image, self.size), rng, foreground)

    def synthesize(self, base: np.ndarray, rng: np.random.Generator, foreground=None) -> Synthesis:
        res = perlin_resolution(rng)
        mask = perlin_mask(self.size, res, rng, foreground)
        if self.texture_paths and rng.random() < 0.5:
            name = self.texture_paths[int(rng.integers(len(self.texture_paths)))]
            texture = self.texture_cache.get(name) if self.texture_cache is not None else load_texture(name, self.size)
            source, augmenters = random_augment(texture, rng)
        else:
            name = "self"
            source, augmenters = random_augment(base, rng)
            source = grid_shuffle(source, rng)
        beta = float(rng.uniform(0.2, 0.8))
        return Synthesis(blend(base, source, mask, beta), mask, name, augmenters, beta, res)


class SyntheticAnomalyDataset(Dataset):
    """Normal training images with a synthetic anomaly each -> (img [3,c,c], aug_img [3,c,c], aug_mask [1,c,c]).

    img: the clean image, PIL-resized (dataset.resize), centre-cropped, ImageNet-normalised. aug_img: the
    synthetic image (made at image_size from a cv2 resize, see AnomalySynthesizer), cropped and normalised
    the same way. aug_mask: (M * 255) truncated to uint8, cropped, / 255 (soft where the foreground is).
    A sample's `foreground_path` (see dataset.attach_foreground) gives F; without one F is all ones.
    `caches` (see synthesis_caches): the decoded, resized images, masks and textures; the tensors are the same.

    The anomaly of an item depends only on (seed, epoch, i) via `np.random.default_rng([seed, epoch, i])`,
    so it is the same whatever worker loads it; items are keyed by (epoch, index) (dataset.epoch_key).
    """

    keyed_by_epoch = True

    def __init__(self, samples, image_size: int = 448, crop_size: int = 392, texture_paths=None, seed: int = 1,
                 caches: dict | None = None):
        self.samples = samples
        self.image_size, self.crop_size = int(image_size), int(crop_size)
        self.seed = int(seed)
        self.caches = caches or {}
        self.synthesizer = AnomalySynthesizer(texture_paths, size=self.image_size,
                                              texture_cache=self.caches.get("texture"))

    def __len__(self):
        return len(self.samples)

    def images(self, path: str) -> tuple[Image.Image, np.ndarray]:
        """(the clean image PIL-resized, the synthesis' cv2-resized base), the file decoded once for both (and
        both stored when cached)."""
        clean, base = self.caches.get("clean"), self.caches.get("base")
        if clean is not None and clean.has(path) and base.has(path):
            return Image.fromarray(clean.get(path)), base.get(path)
        img = load_image(path)
        resized, cv2_base = resize(img, self.image_size), cv2_resize(np.asarray(img), self.image_size)
        if clean is not None:
            clean.put(path, np.asarray(resized))
            base.put(path, cv2_base)
        return resized, cv2_base

    def __getitem__(self, key):
        epoch, i = epoch_key(key)
        s = self.samples[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        clean, base = self.images(s.image_path)
        fg = load_foreground(s.foreground_path, self.image_size, self.caches.get("foreground")) \
            if s.foreground_path else None
        syn = self.synthesizer.synthesize(base, rng, fg)
        mask = Image.fromarray((syn.mask * 255.0).astype(np.uint8))
        return (image_to_tensor(clean, self.crop_size), image_to_tensor(Image.fromarray(syn.image), self.crop_size),
                mask_to_tensor(mask, self.crop_size))
