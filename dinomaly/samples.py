"""Which samples a run uses: its classes (also those found in your own data folder), each class's training
images and those held out of them, its test images, and the per-class log line.

- `find_classes(data)`: --classes; else the dataset's standard classes; else, for an MVTec-layout folder that
  holds none of them, its class folders (each with train/good/ or images directly inside).
- `train_samples(data, seed)`: every class's training samples; `test_samples(data, seed, name)`: one class's.
  A class without a test folder is evaluated on good images only: those of `--val DIR` (`DIR/<class>/`), else a
  seeded share (`--val_share`) of its training images, held out of training. Its image threshold is then set at
  `--false_alarm_rate` of those good images (thresholds.false_alarm_threshold).
- `metrics_line(name, metrics, entry)`: the per-class log line; a class without defect images gets one line
  saying why it has no metrics, and what its threshold rests on, instead of a row of nan.
"""
import math
import os
import zlib

import numpy as np

from . import dataset as ds
from . import image_files
from . import thresholds as th
from .errors import UserError
from .options import DataOptions
from .run import log
from .utils import METRIC_NAMES, format_metrics


def find_classes(data: DataOptions) -> list[str]:
    """The classes of the run (see the module docstring); logs them when they were found in the folder."""
    standard = ds.class_names(data.dataset, data.classes)
    root = data.data_path
    if data.classes or not mvtec_layout(data) or not os.path.isdir(root) or \
            any(os.path.isdir(os.path.join(root, c)) for c in standard):
        return standard
    folders = image_files.list_subdirs(root)
    found = [d for d in folders if is_class_folder(os.path.join(root, d))]
    above = [d for d in folders if d not in found and any(is_class_folder(os.path.join(root, d, c))
                                                          for c in image_files.list_subdirs(os.path.join(root, d)))]
    empty = [d for d in folders if d not in found and d not in above]
    if found:
        log.info(f"classes: {', '.join(found)} (the class folders in {root}; --classes chooses)")
    if found and empty:  # e.g. a class whose images are not copied yet
        log.warning(f"warning: {', '.join(os.path.join(root, d) for d in empty)} not used as a class: no images in "
                    f"it (directly, or in train/ or test/)")
    if above:  # --data_path one level too high: the classes are a folder further down
        log.warning(f"warning: {', '.join(os.path.join(root, d) for d in above)} not used: it holds class folders "
                    f"of its own; for those classes pass --data_path {os.path.join(root, above[0])}")
    if found:
        return found
    if image_files.list_images(root):
        raise UserError(f"{root} holds images but no class folders: move them into {root}/<class>/ (one folder per "
                        f"kind of part, e.g. {root}/part/) and pass --data_path {root}")
    return standard  # the reader names the first missing class folder


def mvtec_layout(data: DataOptions) -> bool:
    """Whether the dataset is read in the MVTec layout (not through Real-IAD's split files or MANTA's)."""
    return data.dataset not in (*ds.REALIAD_FOLDERS, "manta", "mvtec3d", "mulsen")


def is_class_folder(folder: str) -> bool:
    """A folder with train/ or test/ (the MVTec layout) or with images directly inside."""
    return any(os.path.isdir(os.path.join(folder, d)) for d in ("train", "test")) or \
        bool(image_files.list_images(folder))


def held_out(data: DataOptions, seed: int, name: str, samples: list[ds.Sample]) -> list[int]:
    """Indices of the training samples of class `name` held out for its threshold: a seeded share (--val_share,
    at least one, at most all but one) when the class has no test folder and no --val folder is given."""
    if not mvtec_layout(data) or data.val or os.path.isdir(os.path.join(data.data_path, name, "test")):
        return []
    share = data.val_share
    if len(samples) < 2:
        raise UserError(f"class {name} has {len(samples)} good image and no test folder: at least 2 are needed, "
                        f"to train on some and set the threshold on the others; add images or pass --val DIR")
    n = min(max(1, round(share * len(samples))), len(samples) - 1)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return sorted(rng.choice(len(samples), n, replace=False).tolist())


def split_training(data: DataOptions, seed: int, name: str) -> tuple[list[ds.Sample], list[ds.Sample]]:
    """(the training samples of class `name`, those held out of them for its threshold)."""
    samples = ds.class_samples(data.dataset, data.data_path, name, "train", data.realiad_resolution,
                               data.json_dir, allow_outside=data.allow_outside_paths)[0]
    hold = set(held_out(data, seed, name, samples))
    return [s for i, s in enumerate(samples) if i not in hold], [samples[i] for i in sorted(hold)]


def train_samples(data: DataOptions, seed: int) -> list[ds.Sample]:
    """The training samples of every class, without the held-out ones (logged per class)."""
    out = []
    for name in ds.class_names(data.dataset, data.classes):
        kept, held = split_training(data, seed, name)
        if held:
            log.info(f"{name}: no test folder: {len(held)} of its {len(kept) + len(held)} good images are held out "
                     f"of training to set its threshold (--val_share {data.val_share}, --seed {seed}; --val DIR "
                     f"gives other good images)")
        out += kept
    return out


def test_samples(data: DataOptions, seed: int, name: str, multiview: bool = False) -> tuple[list[ds.Sample], int]:
    """The test samples of one class and the number of anomalous ones without a mask: its test folder's, else
    good images only (--val DIR/<class>/, else those held out of its training images). `multiview`: see
    dataset.class_samples."""
    if data.val:
        folder = os.path.join(data.val, name)
        if not os.path.isdir(folder):
            raise UserError(f"--val folder of class {name} not found: {folder}; put good images of {name} there")
        return [ds.Sample(p, 0, None, name, rel_path=os.path.relpath(p, folder).replace(os.sep, "/"))
                for p in image_files.find_images([folder])], 0
    if mvtec_layout(data) and not os.path.isdir(os.path.join(data.data_path, name, "test")):
        return split_training(data, seed, name)[1], 0
    return ds.class_samples(data.dataset, data.data_path, name, "test", data.realiad_resolution, data.json_dir,
                            multiview, allow_outside=data.allow_outside_paths)


def metrics_line(name: str, metrics: dict, entry: dict | None = None) -> str:
    """The metrics of a class (or of the mean), or one line saying why there are none: without defect images
    no metric can be computed; the line then gives the threshold set on the good images and what it rests on."""
    missing = [k for k in METRIC_NAMES if math.isnan(metrics[k])]
    if not missing:
        return format_metrics(name, metrics)
    if len(missing) < len(METRIC_NAMES):
        pixel = all(k.startswith("P-") or k == "AUPRO" for k in missing)
        why = "no class has them" if entry is None else "no ground-truth masks" if pixel else "no good test images"
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_NAMES if k not in missing)
        return f"{name}: {shown}; not computable: {', '.join(missing)} ({why})"
    if entry is None:
        return f"{name}: no metrics (no class has defect images)"
    image = entry["image"]
    if image["n_anomalous"] or image["threshold"] is None:
        return f"{name}: no metrics ({image['n_anomalous']} defect and {image['n_normal']} good test images)"
    return (f"{name}: no metrics (no defect images); image threshold {image['threshold']:.6g} set on "
            f"{image['n_normal']} good images at a false-alarm rate of {image['false_alarm_rate']:g}")


def too_few_warning(name: str, entry: dict) -> str | None:
    """A warning when a false-alarm threshold rests on too few good images to honour its rate."""
    image = entry["image"]
    if image.get("method") != "false_alarm_rate" or image["enough_images"] or image["threshold"] is None:
        return None
    n, rate = image["n_normal"], image["false_alarm_rate"]
    return (f"warning: {name}: only {n} good images set the threshold, fewer than the {th.images_needed(rate)} a "
            f"false-alarm rate of {rate:g} needs: it is their highest score, and about 1 good image in {n + 1} "
            f"will be called anomalous; add good images (--val DIR, or a larger --val_share) or raise "
            f"--false_alarm_rate")
