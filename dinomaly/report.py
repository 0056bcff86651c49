"""What evaluation shows a person about each class, on the class's fixed colour scale (thresholds.json):

- `heatmaps<tag>/<class>/<image>.png`: image | ground truth | map of the first N anomalous test images (a pair of
  modalities: a row for each image, an RGB + infrared pair's with each image's own map);
- `curves<tag>/<class>.png`: image- and pixel-level ROC and precision-recall curves, with the F1-max
  operating points (the calibrated thresholds) marked;
- `gallery<tag>/<class>.png`: the GALLERY_SIZE highest-scored normal and lowest-scored anomalous test
  images with their maps: the false alarms and missed defects, or the closest calls.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .errors import one_line
from .visualize import heatmap_panel, text_band

if TYPE_CHECKING:
    import torch

log = logging.getLogger("anomaly")

GALLERY_SIZE = 4


def image_name(path: str) -> str:
    """A heatmap's file stem: the image's folder and name, e.g. 'scratch_001'; in MVTec 3D-AD's layout
    (<kind>/rgb/<n>.png) the kind's, e.g. 'crack_001'."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 2 and parts[-2] == "rgb":
        parts = parts[:-2] + parts[-1:]
    return os.path.splitext("_".join(parts[-2:]))[0]


class ClassReport:
    """Fed each evaluation batch of one class; keeps only what its pictures need (the first `n_heatmaps`
    anomalous images and the gallery candidates), then draws them with `save`. `pair_kind`: the samples' second
    modality ("depth", "infrared"), None for images."""

    def __init__(self, n_heatmaps: int, gallery_size: int = GALLERY_SIZE, pair_kind: str | None = None):
        self.n_heatmaps, self.gallery_size, self.pair_kind = n_heatmaps, gallery_size, pair_kind
        self.heatmaps, self.normal, self.anomalous = [], [], []  # lists of (score, path, img, gt, amap, infrared)

    def add(self, img: torch.Tensor, gt: torch.Tensor, amap: torch.Tensor, score: torch.Tensor,
            label: torch.Tensor, paths: list[str], infrared: tuple[torch.Tensor, ...] | None = None):
        """One batch: images [B,3,c,c] (pairs [B,6,c,c]), ground truth [B,256,256], maps [B,256,256], scores [B],
        labels [B]; RGB + infrared pairs: `infrared` = (the infrared images' ground truth [B,256,256] and maps
        [B,256,256], the RGB and the infrared images' scores [B] each), `amap` and `gt` the RGB images'."""
        for i, (s, lab) in enumerate(zip(score.tolist(), label.tolist())):
            item = (s, paths[i], img[i].clone(), gt[i].clone(), amap[i].clone(),
                    None if infrared is None else tuple(t[i].clone() for t in infrared))
            if lab == 1 and len(self.heatmaps) < self.n_heatmaps:
                self.heatmaps.append(item)
            (self.anomalous if lab == 1 else self.normal).append(item)
        self.normal = sorted(self.normal, key=lambda t: -t[0])[: self.gallery_size]
        self.anomalous = sorted(self.anomalous, key=lambda t: t[0])[: self.gallery_size]

    @classmethod
    def merge(cls, reports: list["ClassReport"]) -> "ClassReport":
        """One report from those of the processes that shared a class (under torchrun): the heatmaps of the
        first anomalous images by path, the gallery over all."""
        if len(reports) == 1:
            return reports[0]
        out = cls(reports[0].n_heatmaps, reports[0].gallery_size, reports[0].pair_kind)
        out.heatmaps = sorted((h for r in reports for h in r.heatmaps), key=lambda t: t[1])[: out.n_heatmaps]
        out.normal = sorted((t for r in reports for t in r.normal), key=lambda t: -t[0])[: out.gallery_size]
        out.anomalous = sorted((t for r in reports for t in r.anomalous), key=lambda t: t[0])[: out.gallery_size]
        return out

    def save(self, run_dir: str, tag: str, name: str, entry: dict, labels: np.ndarray, scores: np.ndarray,
             pixels: tuple[np.ndarray, np.ndarray]):
        """Write the class's heatmaps, curves and gallery. entry: its thresholds.json entry; labels, scores: all
        its test images'; pixels: (map values, anomalous flags), a sample for the pixel-level curves."""
        color_range = entry["color_range"] or (0.0, float(scores.max()) or 1.0)
        marks = {name: entry[level]["threshold"] for name, level in (("image thr", "image"), ("pixel thr", "pixel"))
                 if entry[level]["threshold"] is not None}
        if self.heatmaps:
            os.makedirs(os.path.join(run_dir, f"heatmaps{tag}", name), exist_ok=True)
        for s, path, img, gt, amap, infrared in self.heatmaps:
            out = os.path.join(run_dir, f"heatmaps{tag}", name, image_name(path) + ".png")
            picture(out, lambda: write_png(out, self.panel(img, gt, amap, infrared, color_range,
                                                           f"{image_name(path)}  {self.scored(s, infrared)}", marks)))
        out = os.path.join(run_dir, f"curves{tag}", name + ".png")
        picture(out, lambda: plot_curves(out, name, labels, scores, *pixels, entry))
        out = os.path.join(run_dir, f"gallery{tag}", name + ".png")
        picture(out, lambda: self.save_gallery(out, name, entry, color_range, marks))

    def save_gallery(self, path: str, name: str, entry: dict, color_range, marks: dict):
        threshold = entry["image"]["threshold"]
        sections = ((f"{name}: highest-scored normal images", self.normal, ("correct", "FALSE ALARM")),
                    (f"{name}: lowest-scored anomalous images", self.anomalous, ("MISSED", "detected")))
        parts = []
        for title, items, (below, above) in sections:
            if items:
                parts.append(title)
            for s, p, img, gt, amap, infrared in items:
                verdict = "" if threshold is None else \
                    f"  {above} (>= {threshold:.4g})" if s >= threshold else f"  {below} (< {threshold:.4g})"
                parts.append(self.panel(img, gt, amap, infrared, color_range,
                                        f"{image_name(p)}  {self.scored(s, infrared)}{verdict}", marks))
        if parts:
            width = max(p.shape[1] for p in parts if not isinstance(p, str))
            write_png(path, np.concatenate([  # a white line below each image's panel
                text_band(width, 40, p, scale=0.7, thick=2) if isinstance(p, str) else
                np.pad(p, ((0, 6), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in parts]))


    def panel(self, img, gt, amap, infrared, color_range, caption: str, marks: dict) -> np.ndarray:
        """One image's panel (visualize.heatmap_panel): a pair's second row shows its depth with the pair's map, or
        its infrared image with that image's map."""
        second = None if self.pair_kind is None else (self.pair_kind, gt, amap) if infrared is None else \
            (self.pair_kind, *infrared[:2])
        return heatmap_panel(img, gt, amap, color_range, caption, marks, second)

    @staticmethod
    def scored(score: float, infrared: tuple | None) -> str:
        """'score S', for an RGB + infrared pair with the two images' scores whose mean it is."""
        if infrared is None:
            return f"score {score:.4g}"
        return f"score {score:.4g} (mean of RGB {float(infrared[2]):.4g}, infrared {float(infrared[3]):.4g})"


def picture(path: str, draw):
    """draw(), which writes the picture `path`; a failure costs this picture only (a warning), not the run."""
    try:
        draw()
    except Exception as e:  # noqa: BLE001 - a picture is never worth the results
        log.warning(f"warning: could not write the picture {path} ({one_line(e)})")


def write_png(path: str, rgb: np.ndarray):
    """An RGB picture as PNG, written by Python (any file name, also one that is not valid UTF-8)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"cannot encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def plot_curves(path: str, name: str, labels: np.ndarray, scores: np.ndarray, px_values: np.ndarray,
                px_flags: np.ndarray, entry: dict):
    """ROC (left) and precision-recall (right) curves of the image scores and the pixel values, each with
    its F1-max threshold marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    if np.asarray(labels).astype(bool).all() or not np.asarray(labels).any():
        plot_scores(path, name, scores, entry, plt, "defective" if np.asarray(labels).any() else "good")
        return
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.6))
    for level, y, s, threshold, color in (("image", labels, scores, entry["image"]["threshold"], "C0"),
                                          ("pixel", px_flags, px_values, entry["pixel"]["threshold"], "C1")):
        y = np.asarray(y).astype(bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        ax_roc.plot(fpr, tpr, color=color, label=f"{level} (AUROC {auc(fpr, tpr):.3f})")
        ax_pr.plot(recall, precision, color=color, label=f"{level} (AP {average_precision_score(y, s):.3f})")
        if threshold is not None:
            pred = s >= threshold
            tp = np.count_nonzero(pred & y)
            ax_roc.plot(np.count_nonzero(pred & ~y) / np.count_nonzero(~y), tp / np.count_nonzero(y), "o",
                        color=color, label=f"{level} threshold {threshold:.4g}")
            ax_pr.plot(tp / np.count_nonzero(y), tp / max(np.count_nonzero(pred), 1), "o", color=color,
                       label=f"{level} F1-max {entry[level]['f1']:.3f}")
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    for ax, (xl, yl) in ((ax_roc, ("false positive rate", "true positive rate")), (ax_pr, ("recall", "precision"))):
        ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
    ax_roc.set_title(f"{name}: ROC")
    ax_pr.set_title(f"{name}: precision-recall")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scores(path: str, name: str, scores: np.ndarray, entry: dict, plt, kind: str):
    """Without both normal and anomalous images (no curves to draw): the histogram of the scores of the images of
    the one `kind` ("good": test/good or held-out good images; "defective") with the image threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=max(5, min(30, len(scores) // 2)), color="C0", alpha=0.8, label=f"{len(scores)} images")
    threshold = entry["image"]["threshold"]
    if threshold is not None:
        how = entry["image"].get("method", "f1max").replace("_", " ")
        ax.axvline(threshold, color="C3", label=f"threshold {threshold:.4g} ({how})")
    ax.set(xlabel="image score", ylabel="images", title=f"{name}: scores of {kind} images (no curves: one kind)")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of images
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
