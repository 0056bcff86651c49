"""Which class of a multi-class run an image shows: the nearest class prototype, so that prediction can use that
class's thresholds without --class_name.

An image's features are its encoder's group features pooled over the patch grid (anomaly_map.pooled_features:
unit vectors); a pair of two modalities has one feature: an RGB + depth pair its fused input's, an RGB + infrared
pair its two images' side by side, so that both images decide its class. A class's prototype is the normalised
mean of the features of its training images (at most MAX_IMAGES, chosen with the seed); its radius is the
largest distance (1 - cosine) of those images to it. Both are computed at the end of each evaluation
(evaluate.py) and saved as class_prototypes.pt in the run folder (a few kB: tensors and the class names, read
with weights_only=True).

An image belongs to the class at the smallest distance d1; its confidence is 1 - d1 / d2, d2 the distance to
the second nearest prototype (0: halfway between two classes, 1: on its prototype; 1 for a one-class run). It
matches no class well when d1 exceeds FAR times its class's radius.

An exported model computes the distances in its graph (`matches`, without PyTorch); building, reading and
applying the prototypes (build, load, classify) import PyTorch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    import torch

    from . import dataset as ds

FILE = "class_prototypes.pt"
MAX_IMAGES = 200  # training images per class that make its prototype
FAR = 2.0  # an image farther than FAR x its class's radius from the prototype matches no class well


@dataclass
class Match:
    class_name: str
    confidence: float  # 1 - d1 / d2
    distance: float  # d1 = 1 - cosine to the prototype
    radius: float  # the class's training images' largest distance
    well: bool  # distance <= FAR * radius


def build(mapper, samples: dict[str, list[ds.Sample]], image_size: int, crop_size: int, device: torch.device,
          batch_size: int = 16, num_workers: int = 0, seed: int = 0) -> dict:
    """The prototypes of the classes (name -> training samples) through `mapper` (an AnomalyMapper in eval
    mode): {"classes": names, "prototypes": [C, F], "radius": [C]}."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from . import dataset as ds
    prototypes, radii = [], []
    for name, items in samples.items():
        if len(items) > MAX_IMAGES:
            pick = np.random.default_rng(seed).choice(len(items), MAX_IMAGES, replace=False)
            items = [items[i] for i in sorted(pick)]
        loader = DataLoader(ds.TrainDataset(items, image_size, crop_size), batch_size=batch_size,
                            num_workers=num_workers)
        with torch.no_grad():
            features = torch.cat([mapper.features(x.to(device)).cpu() for x in loader])
        prototype = F.normalize(features.mean(dim=0), dim=0)
        prototypes.append(prototype)
        radii.append((1 - features @ prototype).max())
    return {"classes": list(samples), "prototypes": torch.stack(prototypes), "radius": torch.stack(radii)}


def load(path: str) -> dict | None:
    """A class_prototypes.pt, checked, with its "path"; None when there is no such file."""
    if not os.path.isfile(path):
        return None
    import torch

    from .checkpoints import load_file
    data = load_file(path, "class prototypes file")
    ok = isinstance(data, dict) and isinstance(data.get("classes"), list) and \
        all(isinstance(c, str) for c in data["classes"]) and isinstance(data.get("prototypes"), torch.Tensor) and \
        isinstance(data.get("radius"), torch.Tensor) and data["prototypes"].ndim == 2 and \
        len(data["classes"]) == data["prototypes"].shape[0] == data["radius"].numel() > 0
    if not ok:
        raise UserError(f"{path} is not a class prototypes file; delete it and evaluate the run again")
    return {**data, "path": path}


def check_width(data: dict, width: int):
    """The one check that class prototypes (load's) fit a model whose images have `width` features
    (pooled_features): prototypes of another model, or of an RGB + infrared run evaluated before a pair's
    prototypes held both images (half as wide), are refused with what to do."""
    have = data["prototypes"].shape[1]
    if have != width:
        path = data.get("path", FILE)
        raise UserError(f"{path} holds class prototypes of {have} features, this model's images have {width}: "
                        f"they were made by another model (or, for RGB + infrared, by an evaluation before a "
                        f"pair's prototypes held both images); evaluate this run again into "
                        f"{os.path.dirname(path) or 'its folder'} (its training script's --eval_only --checkpoint "
                        f"with --save_dir and --save_name naming that folder) to rewrite it")


def classify(data: dict, features: torch.Tensor) -> list[Match]:
    """The nearest class of each image: features [B, F] (pooled_features) -> one Match each."""
    check_width(data, features.shape[1])
    return matches(data, (1 - features.float().cpu() @ data["prototypes"].float().T).numpy())


def matches(data: dict, distance: np.ndarray) -> list[Match]:
    """The nearest class of each image from its distances to every prototype ([B, C]: 1 - cosine; an exported
    graph's class_distances) -> one Match each. data: "classes" and "radius" (a prototypes file's, or an exported
    model's metadata)."""
    out = []
    for row in np.asarray(distance, dtype=np.float64):
        order = np.argsort(row, kind="stable")[:2]
        d1, best = float(row[order[0]]), int(order[0])
        d2 = float(row[order[1]]) if len(order) > 1 else None
        confidence = 1.0 if d2 is None else max(0.0, 1 - d1 / d2) if d2 > 0 else 0.0
        radius = float(data["radius"][best])
        out.append(Match(data["classes"][best], confidence, d1, radius, d1 <= FAR * radius))
    return out
