"""Pictures for a person to look at: anomaly maps on a fixed colour scale with a colour bar and titles.

The colour scale of a class is fixed (thresholds.json's "color_range": blue at the median of the normal test
images' map values, the image threshold in the middle, red twice as far above), so a normal image stays
blue-green and red means clearly above the decision threshold; maps are never stretched to their own min-max.

- `heatmap_panel`: image | ground truth | anomaly map (evaluation heatmaps and the gallery); a pair of
  modalities gets a row per image;
- `overlay_picture`: a map over an image of any size, with the pixels outside the centre crop hatched
  (predict.py).

Without PyTorch (an exported model's predictions): the evaluation's tensors are only read, never made here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from .images import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch

COLORMAP = cv2.COLORMAP_JET
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)
RED, GREEN, DARK = (200, 30, 30), (30, 140, 60), (40, 40, 40)


def to_uint8_image(img: torch.Tensor, size: int) -> np.ndarray:
    """Normalised [3, H, W] tensor -> RGB uint8 [size, size, 3]."""
    std, mean = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
    x = img.float().cpu().numpy() * std + mean
    x = (np.clip(x, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)


def colorize(amap: np.ndarray, color_range: tuple[float, float]) -> np.ndarray:
    """Map values -> RGB uint8 on the fixed scale: color_range[0] and below blue, color_range[1] and above
    red. NaN counts as the bottom of the scale."""
    lo, hi = color_range
    a = np.nan_to_num((np.asarray(amap, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), nan=0.0)
    return cv2.applyColorMap((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), COLORMAP)[..., ::-1]


MAX_TEXT_SIDE = 2400  # text and colour bar stop growing with pictures larger than this
MAX_SIDE = 4096  # small images are enlarged by a whole factor, but not beyond this


def _text_scale(height: int) -> tuple[float, int]:
    """Font scale and thickness for a picture `height` pixels tall (bounded: MAX_TEXT_SIDE)."""
    scale = max(0.4, min(height, MAX_TEXT_SIDE) / 600)
    return scale, max(1, round(scale * 1.5))


def drawable(text: str) -> str:
    """`text` in the ASCII that OpenCV's fonts draw: other characters (and the undecodable bytes of a file name
    that is not valid UTF-8, which would crash OpenCV) as backslash escapes."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def text_band(width: int, height: int, text: str, color=DARK, scale: float = 0.5, thick: int = 1) -> np.ndarray:
    """A band of `color` with white text, left-aligned and vertically centred, smaller where it would not fit."""
    band = np.full((height, width, 3), color, np.uint8)
    text = drawable(text)
    left = max(4, height // 4)
    (tw, _), _ = cv2.getTextSize(text, FONT, scale, thick)
    scale *= min(1.0, (width - 2 * left) / max(tw, 1))
    (_, th), _ = cv2.getTextSize(text, FONT, scale, thick)
    cv2.putText(band, text, (left, (height + th) // 2), FONT, scale, WHITE, thick, cv2.LINE_AA)
    return band


def colorbar(height: int, color_range: tuple[float, float], marks: dict[str, float] | None = None,
             short_side: int | None = None) -> np.ndarray:
    """A vertical colour bar (RGB uint8, `height` tall) with the scale's ends written above and below it and
    `marks` (e.g. {"threshold": t}) as lines at their values; a mark beyond an end sits there, labelled
    (above) or (below). Text and bar width follow `short_side` (default: `height`), the picture's shorter side,
    so that a tall narrow picture gets a narrow bar."""
    short = min(height, short_side or height)
    scale, thick = _text_scale(max(short, 256))
    scale *= 0.8
    lo, hi = color_range
    labels = {k: drawable(f"{k} {v:.3g}" + (" (above)" if v > hi else " (below)" if v < lo else ""))
              for k, v in (marks or {}).items()}
    th = cv2.getTextSize("0", FONT, scale, thick)[0][1]

    def text_width(texts):
        return max([cv2.getTextSize(t, FONT, scale, thick)[0][0] for t in texts], default=0)

    size = min(short, MAX_TEXT_SIDE)
    bar_w, pad = max(12, size // 20), max(4, size // 60)
    top, bottom = th + 2 * pad, height - th - 2 * pad
    width = max(text_width([f"{hi:.3g}", f"{lo:.3g}"]) + 2 * pad, bar_w + 3 * pad + text_width(labels.values()))
    out = np.full((height, width, 3), WHITE, np.uint8)
    values = np.linspace(hi, lo, bottom - top)[:, None].repeat(bar_w, axis=1)
    out[top:bottom, pad:pad + bar_w] = colorize(values, color_range)
    cv2.putText(out, f"{hi:.3g}", (pad, top - pad), FONT, scale, BLACK, thick, cv2.LINE_AA)
    cv2.putText(out, f"{lo:.3g}", (pad, bottom + pad + th), FONT, scale, BLACK, thick, cv2.LINE_AA)
    last_text = -height  # the marks' texts top to bottom, each at least a line below the one above
    for key, text in sorted(labels.items(), key=lambda kv: -marks[kv[0]]):
        y = int(round(top + (hi - min(max(marks[key], lo), hi)) / (hi - lo) * (bottom - top - 1)))
        cv2.line(out, (pad - 2, y), (pad + bar_w + 2, y), BLACK, thick + 1)
        y_text = max(min(max(y + th // 2, top + th), bottom), last_text + th + pad)
        cv2.putText(out, text, (2 * pad + bar_w, y_text), FONT, scale, BLACK, thick, cv2.LINE_AA)
        last_text = y_text
    return out


PAIR_TITLES = {None: (("image", "ground truth", "anomaly map"),),  # a pair's kind -> its rows' panel titles
               "depth": (("RGB image", "ground truth", "map over RGB"),
                         ("depth (coloured)", "ground truth", "map over depth (grey)")),
               "infrared": (("RGB image", "RGB ground truth", "RGB image's map"),
                            ("infrared image", "infrared ground truth", "infrared image's map"))}


def heatmap_panel(img: torch.Tensor, gt: torch.Tensor, amap: torch.Tensor, color_range: tuple[float, float],
                  caption: str, marks: dict[str, float] | None = None,
                  second: tuple[str, torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Three panels with titles, image | ground truth (outlined in red) | anomaly map over the image, a colour
    bar, and a caption below (RGB uint8). A pair of modalities ([6, H, W]: RGB, then depth or infrared) gets a
    second row, `second` = (its kind, "depth" or "infrared", and its second image's ground truth and map: an RGB +
    depth pair's are its one map and mask, an RGB + infrared pair's the infrared image's own), each row labelled
    with its image."""
    size = amap.shape[-1]
    scale, thick = _text_scale(size)
    title_h = int(28 * scale / 0.43)
    rows = [(img[:3], gt, amap)] + ([(img[3:], second[1], second[2])] if second is not None else [])
    body = np.concatenate([
        np.concatenate([np.concatenate([text_band(size, title_h, title, scale=scale, thick=thick), p])
                        for title, p in zip(titles, image_panels(to_uint8_image(x, size), g, m, color_range, row > 0))],
                       axis=1)
        for row, (titles, (x, g, m)) in enumerate(zip(PAIR_TITLES[second and second[0]], rows))])
    body = np.concatenate([body, colorbar(len(body), color_range, marks, short_side=size + title_h)], axis=1)
    return np.concatenate([body, text_band(body.shape[1], title_h, caption, scale=scale, thick=thick)])


def image_panels(rgb: np.ndarray, gt: torch.Tensor, amap: torch.Tensor, color_range: tuple[float, float],
                 grey_under: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the image, the image with its ground truth outlined in red, its map over it; with `grey_under` over the
    image in grey: a pair's second image, whose colours (a coloured depth) would mix with the map's)."""
    outlined = rgb.copy()
    contours, _ = cv2.findContours(gt.cpu().numpy().astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(outlined, contours, -1, (255, 0, 0), 2)
    return rgb, outlined, blend(grey(rgb) if grey_under else rgb, colorize(amap.float().cpu().numpy(), color_range))


def grey(rgb: np.ndarray) -> np.ndarray:
    """An RGB uint8 picture in grey (its luminance in the three channels)."""
    return np.repeat(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)


def blend(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The mean of two uint8 pictures."""
    return cv2.addWeighted(np.ascontiguousarray(a), 0.5, np.ascontiguousarray(b), 0.5, 0)


def _hatch(height: int, width: int, step: int) -> np.ndarray:
    """Diagonal lines x + y = k * step: bool [height, width]."""
    lines = np.zeros((height, width), np.uint8)
    for c in range(0, height + width, step):
        cv2.line(lines, (c, 0), (c - height, height), 1, max(1, step // 4))
    return lines.astype(bool)


def overlay_picture(rgb: np.ndarray, amap: np.ndarray, seen: np.ndarray, mask: np.ndarray,
                    color_range: tuple[float, float], caption: str, anomalous: bool,
                    marks: dict[str, float] | None = None,
                    second: tuple[str, str, np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The map over the image in the image's own geometry (RGB uint8, the image at the top left; images under
    256 px are enlarged by a whole factor): predicted mask outlined in white, pixels the model never saw
    (outside the centre crop) greyed and hatched, a colour bar on the right, the caption below on red
    (anomalous) or green (normal). Enlargement stops at MAX_SIDE and text and colour bar follow the shorter
    side, so the picture takes a few times the image's own pixels (at least those of a 256 px square).
    A pair of modalities: `second` = (the RGB image's title, the second image's title, the second image, its map
    and its mask, in the same geometry): the two side by side, each titled, the second in grey under its map."""
    h, w = seen.shape
    k = max(1, min(-(-256 // min(h, w)), MAX_SIDE // max(h, w)))
    scale, thick = _text_scale(min(h, w) * k)
    out = _overlay(rgb, amap, seen, mask, k, color_range, thick)
    if second is not None:
        title_h = int(28 * scale / 0.43)
        first_title, second_title, image, image_map, image_mask = second
        out = np.concatenate([np.concatenate([text_band(p.shape[1], title_h, title, scale=scale, thick=thick), p])
                              for title, p in ((first_title, out), (second_title, _overlay(
                                  grey(image), image_map, seen, image_mask, k, color_range, thick)))], axis=1)
    if len(out) < 256:  # a flat image (its enlargement bounded by MAX_SIDE): room for the colour bar below it
        out = np.pad(out, ((0, 256 - len(out)), (0, 0), (0, 0)), constant_values=255)
    body = np.concatenate([out, colorbar(len(out), color_range, marks, short_side=min(h, w) * k)], axis=1)
    band = text_band(body.shape[1], int(28 * scale / 0.43), caption, RED if anomalous else GREEN, scale, thick)
    return np.concatenate([body, band])


def _overlay(rgb: np.ndarray, amap: np.ndarray, seen: np.ndarray, mask: np.ndarray, k: int,
             color_range: tuple[float, float], thick: int) -> np.ndarray:
    """overlay_picture's image: enlarged k times, the map over it, the unseen pixels hatched, the mask outlined."""
    if k > 1:
        rgb, amap, seen, mask = (np.repeat(np.repeat(a, k, axis=0), k, axis=1) for a in (rgb, amap, seen, mask))
    h, w = seen.shape
    out = blend(rgb, colorize(amap, color_range))
    unseen = ~seen
    out[unseen] = (0.4 * rgb[unseen] + 0.3 * 255).astype(np.uint8)
    out[unseen & _hatch(h, w, max(8, min(h, w) // 40))] = GREY
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, WHITE, thick + 1)
    return out
