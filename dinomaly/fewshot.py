"""Dinomaly2's few-shot setting: K normal training images per class, chosen as the preview code chooses them, and
its strong training augmentation.

- `select_shots`: per class, in the class order, `random.sample(<the class's sorted training images>, K)` from one
  Python random stream seeded with --seed (the preview: `random.seed(1)`, then ImageFolder's sorted samples).
- `AugmentedDataset`: resize (as every input) -> RandomResizedCrop to the crop size with the fixed area
  (crop / size)^2 and aspect ratio in [0.95, 1.05] -> a rotation by 0, 90, 180 or 270 degrees -> horizontal flip
  (p 0.5) -> vertical flip (p 0.5) -> ImageNet normalisation: torchvision's transforms in the preview's order with
  its parameters. Item i of epoch e draws from generators seeded with (seed, e, i), so a resumed run and any
  number of loader workers see the same images.
"""
import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from .dataset import IMAGENET_MEAN, IMAGENET_STD, Sample, epoch_key, load_image, resize
from .errors import UserError

SHOTS_FILE = "shots.txt"  # the chosen training images, in the run folder: "<class>\t<path>" per line
ASPECT_RATIOS = (0.95, 1.05)
ROTATIONS = (0, 90, 180, 270)


def select_shots(samples: list[Sample], shot: int, seed: int) -> list[Sample]:
    """`shot` samples of each class (classes in their order in `samples`, each class's samples in their order
    there, i.e. sorted by file name), drawn class after class from one random.Random(seed)."""
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.class_name, []).append(s)
    rng = random.Random(seed)
    chosen = []
    for name, members in by_class.items():
        if shot > len(members):
            raise UserError(f"--shot {shot} is more than the {len(members)} training images of class {name}; "
                            f"use --shot {len(members)} or fewer")
        chosen += rng.sample(members, shot)
    return chosen


class AugmentedDataset(Dataset):
    """Few-shot training images -> strongly augmented, normalised tensors [3, crop, crop] (see the module's
    docstring). `cache`: an optional ImageCache of the resized images. Items are keyed by (epoch, index)
    (dataset.epoch_key): the augmentation of an image depends on the seed, the epoch and its index alone."""

    keyed_by_epoch = True

    def __init__(self, samples: list[Sample], image_size: int, crop_size: int, seed: int = 1, cache=None):
        self.samples, self.image_size, self.crop_size, self.seed, self.cache = samples, image_size, crop_size, seed, \
            cache
        scale = (crop_size / image_size) ** 2
        self.crop = T.RandomResizedCrop((crop_size, crop_size), scale=(scale, scale), ratio=ASPECT_RATIOS)
        self.flips = T.Compose([T.RandomHorizontalFlip(), T.RandomVerticalFlip()])
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.samples)

    def resized(self, path: str) -> Image.Image:
        if self.cache is not None:
            return Image.fromarray(self.cache.get(path))
        return resize(load_image(path), self.image_size)

    def __getitem__(self, key):
        epoch, i = epoch_key(key)
        seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        img = self.resized(self.samples[i].image_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = self.crop(img)
            img = TF.rotate(img, random.Random(seed).choice(ROTATIONS))
            img = self.flips(img)
        return self.normalize(img)
