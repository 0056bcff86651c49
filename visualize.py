"""Heatmap PNGs for a person to look at: image | ground truth | anomaly map over the image."""
import os

import cv2
import numpy as np
import torch

from dataset import IMAGENET_MEAN, IMAGENET_STD


def to_uint8_image(img: torch.Tensor, size: int) -> np.ndarray:
    """Normalised [3, H, W] tensor -> RGB uint8 [size, size, 3]."""
    x = img.float().cpu() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    x = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)


def heatmap_panel(img: torch.Tensor, gt: torch.Tensor, amap: torch.Tensor, score: float) -> np.ndarray:
    """Three panels side by side (RGB uint8): the image, the ground truth outlined, the map over the image.

    The map is scaled to its own range, so a normal image can show a pattern too; the score is printed."""
    size = amap.shape[-1]
    rgb = to_uint8_image(img, size)
    a = amap.float().cpu().numpy()
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    heat = cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    overlay = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    outlined = rgb.copy()
    contours, _ = cv2.findContours(gt.cpu().numpy().astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(outlined, contours, -1, (255, 0, 0), 2)
    panel = np.concatenate([rgb, outlined, overlay], axis=1)
    cv2.putText(panel, f"score {score:.4f}", (2 * size + 6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    return panel


def save_heatmap(out_dir: str, image_path: str, img, gt, amap, score: float):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext("_".join(os.path.normpath(image_path).split(os.sep)[-2:]))[0]
    panel = heatmap_panel(img, gt, amap, score)
    cv2.imwrite(os.path.join(out_dir, f"{stem}.png"), panel[..., ::-1])
