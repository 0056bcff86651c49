"""Checks of a job's input files before any training or evaluation starts, so that a bad file stops the run at
once with one line naming it (not hours later, inside a data-loader worker).

`check_data(data, seed, train)`: every training image (with its foreground mask), texture and test image opens,
every test mask exists, opens and has its image's size. Only headers and file structure are read, not the
pixels (PIL's `Image.open` + `verify`), in a thread pool, so that a dataset of 100k images takes seconds.
"""
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from . import dataset as ds
from . import samples
from .errors import UserError, one_line
from .options import DataOptions
from .run import log

THREADS = 16  # file opening waits on the disk more than on the CPU


@dataclass
class Item:
    """One file to check: its path, what it is ("training image", "mask", ...) and the sample it belongs to."""
    path: str
    what: str
    sample: ds.Sample | None = None
    size: tuple[int, int] | None = None  # (width, height) once opened
    problem: str | None = None  # why it does not open


def probe(item: Item) -> Item:
    """Open the file's header and check its structure (no decoding); sets item.size or item.problem."""
    try:
        with Image.open(item.path) as img:
            item.size = img.size
            img.verify()
    except FileNotFoundError:
        item.problem = "not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        item.problem = one_line(e)
    return item


def items(data: DataOptions, seed: int, train: list[ds.Sample] | None, textures: list[str],
          test: bool) -> list[Item]:
    """The files a job reads: training images and their foreground masks, textures, test images and masks."""
    out = []
    for s in train or []:
        out.append(Item(s.image_path, "training image", s))
        if s.pair_kind == "infrared":  # a depth file is a TIFF of floats, read when used
            out.append(Item(s.pair_path, "training infrared image", s))
        if s.foreground_path:
            out.append(Item(s.foreground_path, "foreground mask", s))
    out += [Item(p, "texture image") for p in textures]
    for c in ds.class_names(data.dataset, data.classes) if test else []:
        for s in samples.test_samples(data, seed, c)[0]:
            if s.strip:  # MANTA: the file of views 2 to 5 is that of view 1
                continue
            out.append(Item(s.image_path, "test image", s))
            if s.pair_kind == "infrared":
                out.append(Item(s.pair_path, "test infrared image", s))
            if s.label and s.mask_path:
                out.append(Item(s.mask_path, "mask", s))
    return out


def listed_in(data: DataOptions, item: Item) -> str:
    """' (listed in <split file>)' for a Real-IAD (Variety) image or mask, whose path comes from a split file."""
    if data.dataset not in ds.REALIAD_FOLDERS or item.sample is None or item.what == "foreground mask":
        return ""
    json_dir = ds.realiad_folders(data.dataset, data.data_path, data.realiad_resolution, data.json_dir)[1]
    json_path = ds.realiad_json_path(data.data_path, item.sample.class_name, json_dir)
    return f" (listed in {json_path})"


def others(bad: list, checked: int, noun: str, fault: str) -> str:
    """'the other N files checked are fine' or 'K more of the N files checked <fault> too'."""
    if len(bad) == 1:
        return f"the other {checked - 1} {noun} checked are fine"
    return f"{len(bad) - 1} more of the {checked} {noun} checked {fault} too"


def check_data(data: DataOptions, seed: int, train: list[ds.Sample] | None = None, textures: list[str] = (),
               test: bool = True):
    """Every file the job will read opens, and every mask has its image's size; one UserError naming the first
    bad file (and how many others were checked) otherwise. Logs how many files were checked."""
    start = time.time()
    todo = items(data, seed, train, list(textures), test)
    with ThreadPoolExecutor(THREADS) as pool:
        done = list(pool.map(probe, todo))
    bad = [i for i in done if i.problem]
    if bad:
        i, fault = bad[0], "are missing or unreadable"
        where, rest = listed_in(data, i), others(bad, len(done), "files", fault)
        if i.problem == "not found":
            raise UserError(f"{i.what} not found: {i.path}{where}; {rest}; add the file, or fix the dataset")
        raise UserError(f"cannot read {i.what} {i.path}{where} ({i.problem}); {rest}; replace the file, or remove "
                        f"it from the dataset")
    sizes = {i.path: i.size for i in done if i.what.endswith("image")}
    masks = [i for i in done if i.what == "mask"]
    wrong = [m for m in masks if m.size != sizes[m.sample.image_path]]
    if wrong:
        m = wrong[0]
        (w, h), (iw, ih) = m.size, sizes[m.sample.image_path]
        raise UserError(f"mask {m.path}{listed_in(data, m)} is {w}x{h} px, but its image {m.sample.image_path} is "
                        f"{iw}x{ih}; {others(wrong, len(masks), 'masks', 'differ from their image')}; fix the masks")
    matched = f", {len(masks)} masks match their images" if masks else ""
    kinds = "image and mask files" if masks else "image files"
    log.info(f"input check: {len(done)} {kinds} open{matched} ({time.time() - start:.1f}s)")
