"""A cache of decoded, resized images, so that a training step does not wait for JPEG/PNG decoding.

`ImageCache(paths, size, mode, folder, reader).get(path)` returns exactly what `reader.read(path, size)` gives:
by default (PIL_RGB) `dataset.resize(dataset.load_image(path), size)` as uint8 [size, size, 3]; CRR's synthesis
adds readers of its own (OpenCV resizes, grey object masks). What follows (crop, normalisation, synthesis) is
unchanged, so cached and uncached tensors are bit-identical. Each image is decoded on its first use and kept in
one shared array:

- "memory": an anonymous shared memory map, shared by the DataLoader workers forked after it was made
  (size x size x 3 bytes per image: 0.6 MB at 448 px, 2.2 GB for MVTec AD's 3,629 training images).
- "disk": a file `<folder>/<reader name>_<size>_<key>.u8` mapped into memory. It outlives the run, so a later run on
  the same images (same paths, sizes and modification times: the key) starts with them decoded; the page
  cache shares it between workers and between the processes of a torchrun job.
"""
import hashlib
import mmap
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .arguments import CACHE_MODES as MODES
from .images import load_image, resize
from .errors import UserError

_ALIGN = 4096  # the pixels start on a page boundary after the per-image "filled" flags


@dataclass(frozen=True)
class Reader:
    """How a file becomes a cached uint8 array: read(path, size) -> [size, size, 3] (channels 3) or [size, size]
    (channels 1). `name` starts the disk cache's file name. `read` must be a module-level function (workers
    started by spawn receive it by name)."""
    name: str
    channels: int
    read: Callable[[str, int], np.ndarray]


def pil_rgb(path: str, size: int) -> np.ndarray:
    """The training and test transform's resize: RGB, PIL bilinear (antialiased) to size x size."""
    return np.asarray(resize(load_image(path), size))


PIL_RGB = Reader("images", 3, pil_rgb)


def cache_key(paths: list[str], size: int) -> str:
    """A hash of the size and of each image's path, byte size and modification time."""
    h = hashlib.sha1(f"{size}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class ImageCache:
    """Decoded, resized uint8 images of a fixed list of files as `reader` makes them, filled on first use (see
    the module)."""

    def __init__(self, paths: list[str], size: int, mode: str = "memory", folder: str | None = None,
                 reader: Reader = PIL_RGB):
        if mode not in ("memory", "disk"):
            raise ValueError(f"unknown image cache mode {mode!r} (expected 'memory' or 'disk')")
        self.paths, self.size, self.mode, self.reader = list(dict.fromkeys(paths)), int(size), mode, reader
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.offset = flag_bytes(len(self.paths))
        self.shape = (self.size, self.size, 3) if reader.channels == 3 else (self.size, self.size)
        self.nbytes = cache_bytes(len(self.paths), self.size, reader.channels)
        self.file = None
        if mode == "memory":
            check_memory(self.nbytes)
            self._map(mmap.mmap(-1, self.nbytes))
        else:
            os.makedirs(folder, exist_ok=True)
            self.file = os.path.join(folder, f"{reader.name}_{self.size}_{cache_key(self.paths, self.size)}.u8")
            create_file(self.file, self.nbytes)
            self._open_file()

    def _map(self, buffer: mmap.mmap):
        self.buffer = buffer
        self.filled = np.frombuffer(buffer, np.uint8, len(self.paths))
        self.pixels = np.frombuffer(buffer, np.uint8, offset=self.offset).reshape(-1, *self.shape)

    def _open_file(self):
        with open(self.file, "r+b") as f:
            self._map(mmap.mmap(f.fileno(), self.nbytes))

    def __len__(self) -> int:
        return len(self.paths)

    def filled_count(self) -> int:
        return int(np.count_nonzero(self.filled))

    def get(self, path: str) -> np.ndarray:
        """The resized image at `path` as the reader gives it (uint8 [size, size, 3] or [size, size]), read-only."""
        i = self._position(path)
        if not self.filled[i]:
            self.put(path, self.reader.read(path, self.size))
        out = self.pixels[i]
        out.flags.writeable = False
        return out

    def has(self, path: str) -> bool:
        """Whether the image at `path` is in the cache already."""
        return bool(self.filled[self._position(path)])

    def put(self, path: str, pixels: np.ndarray):
        """Store what `reader.read(path, size)` gives, read by the caller."""
        i = self._position(path)
        self.pixels[i] = pixels
        self.filled[i] = 1

    def _position(self, path: str) -> int:
        i = self.index.get(path)
        if i is None:
            raise KeyError(f"{path} is not one of the {len(self.paths)} images of this cache")
        return i

    def __getstate__(self):
        """Disk caches travel to spawned worker processes as their file name; memory caches cannot."""
        if self.mode == "memory":
            raise UserError("an in-memory image cache is shared only with loader workers started by fork; "
                            "use --cache_images disk with other start methods")
        state = self.__dict__.copy()
        for k in ("buffer", "filled", "pixels"):
            del state[k]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_file()


def create_file(path: str, nbytes: int):
    """Create the cache file (zero-filled, its blocks reserved so that a full disk cannot interrupt the run
    later) unless it exists with the right size; atomic, so processes starting together use the same file."""
    if os.path.isfile(path) and os.path.getsize(path) == nbytes:
        return
    free = shutil.disk_usage(os.path.dirname(path)).free
    if nbytes > free:
        raise UserError(f"the image cache needs {nbytes / 1e9:.1f} GB but {os.path.dirname(path)} has "
                        f"{free / 1e9:.1f} GB free; pass another --cache_dir or --cache_images none")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    try:
        os.link(tmp, path)  # fails if another process made it first: then theirs is used
    except FileExistsError:
        if os.path.getsize(path) != nbytes:
            os.replace(tmp, path)
    except OSError:  # a file system without hard links
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def flag_bytes(images: int) -> int:
    """Bytes of the "filled" flags of `images` images, in whole pages: where the pixels start."""
    return -(-images // _ALIGN) * _ALIGN


def cache_bytes(images: int, size: int, channels: int) -> int:
    """Bytes of a cache of `images` images: their "filled" flags, then the pixels."""
    return flag_bytes(images) + images * size * size * channels


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux: MemAvailable, which counts the reclaimable page
    cache; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(nbytes: int):
    """`nbytes` for each process of this machine (torchrun's LOCAL_WORLD_SIZE: each keeps its own memory cache)
    against 80 % of the available memory; a UserError when they would not fit."""
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available, total = available_memory(), nbytes * copies
    if total > 0.8 * available:
        each = f" ({copies} processes, one copy each)" if copies > 1 else ""
        raise UserError(f"the image cache needs {total / 1e9:.1f} GB of memory{each} but {available / 1e9:.1f} GB "
                        f"is free; use --cache_images disk or none")


def build_cache(mode: str, paths: list[str], size: int, folder: str | None,
                reader: Reader = PIL_RGB) -> ImageCache | None:
    """The cache for --cache_images `mode` ("none" -> None); `folder` holds disk caches."""
    if mode not in MODES:
        raise ValueError(f"unknown image cache mode {mode!r} (expected one of {', '.join(MODES)})")
    return None if mode == "none" else ImageCache(paths, size, mode, folder, reader)


def build_caches(mode: str, parts: dict[str, tuple[list[str], Reader]], size: int, folder: str | None) -> dict:
    """{name: cache} for --cache_images `mode` of several file lists (none for "none" or an empty list); in
    memory their total size is checked against the free memory first."""
    parts = {k: (paths, reader) for k, (paths, reader) in parts.items() if paths and mode != "none"}
    if mode == "memory":
        check_memory(sum(cache_bytes(len(set(paths)), size, r.channels) for paths, r in parts.values()))
    return {k: build_cache(mode, paths, size, folder, reader) for k, (paths, reader) in parts.items()}
