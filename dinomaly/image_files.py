"""Finding image files, importable without PyTorch (so that predict.py's --input is checked at once): the
image names, a folder's images and subfolders (a symbolic link that leads nowhere named, never silently left out),
and the images of the predict command's --input (files, folders searched recursively, glob patterns)."""
import errno
import glob
import logging
import os

from .errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def find_images(inputs: list[str], skip_dir: str | None = None) -> list[str]:
    """Image files named directly or by a glob pattern, and the images under named folders (recursively:
    a folder's own files sorted, then its subfolders); no duplicates, nothing under `skip_dir` (an output
    folder). A missing path, or a folder or pattern without images, is a UserError. An image name that is a
    symbolic link leading nowhere (a missing target, a loop) is listed: reading it fails and says why (predict
    reports and skips it); a folder link that loops is skipped with a warning."""
    skip = os.path.realpath(skip_dir) + os.sep if skip_dir else None
    found, seen = [], set()
    for item in inputs:
        pattern = glob.has_magic(item)
        if pattern:
            matches = sorted(glob.glob(item, recursive=True))
        elif os.path.lexists(item):
            matches = [item]
        else:
            raise UserError(f"file or folder not found: {item}; check --input")
        images = []
        for path in matches:
            if os.path.isdir(path):
                images += _walk_images(path, set())
            elif not pattern or is_image_name(os.path.basename(path)):
                images.append(path)  # a file named directly is tried whatever its extension
        if not images:
            raise UserError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {item}; check --input")
        for path in images:
            key = os.path.realpath(path)
            if key not in seen and not (skip and key.startswith(skip)):
                seen.add(key)
                found.append(path)
    return found


def _walk_images(folder: str, visited: set[str]) -> list[str]:
    """The images in `folder` (sorted), then those in its subfolders, recursively; each folder once; broken
    links as find_images says."""
    real = os.path.realpath(folder)
    if real in visited:  # a symbolic link back up the tree
        return []
    visited.add(real)
    images = [os.path.join(folder, name) for name in list_images(folder, keep_broken=True)]
    for sub in list_subdirs(folder, keep_broken=True):
        images += _walk_images(os.path.join(folder, sub), visited)
    return images


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def entries(folder: str, wanted, on_broken=None) -> list[str]:
    """Sorted names of the entries of `folder` for which wanted(entry) holds. An entry that cannot be examined
    (a symbolic link that loops) is a UserError naming it, or on_broken(entry, error)'s when given (True: list
    it)."""
    names = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if wanted(e):
                    names.append(e.name)
            except OSError as err:
                if on_broken is None:
                    raise UserError(f"cannot read {e.path} ({err.strerror}: a symbolic link that points to "
                                    f"itself?); remove or fix it") from None
                if on_broken(e, err):
                    names.append(e.name)
    return sorted(names)


def list_images(folder: str, keep_broken: bool = False) -> list[str]:
    """Sorted file names of the images directly in `folder` (hidden files and other extensions skipped). An image
    name that is a symbolic link leading nowhere (to a missing file, or round in a loop) is a UserError naming it
    (the dataset readers: a test set is never silently smaller), or listed with keep_broken (find_images)."""
    def broken(e, err):
        if not keep_broken:
            raise UserError(f"cannot read {e.path} ({err.strerror}: a symbolic link to {os.readlink(e.path)}); "
                            f"remove or fix it")
        return True

    def wanted(e):
        if not is_image_name(e.name) or e.is_file():
            return is_image_name(e.name)
        if e.is_symlink() and not os.path.exists(e.path):  # is_file() is False for a link to a missing file
            return broken(e, FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
        return False  # a folder named like an image

    return entries(folder, wanted, broken)


def list_subdirs(folder: str, keep_broken: bool = False) -> list[str]:
    """Sorted names of the folders in `folder` (hidden ones skipped). A link that loops is a UserError, or with
    keep_broken skipped (with a warning unless its name is an image's: _list_images lists it)."""
    def skipped(e, err):
        if not is_image_name(e.name):
            logging.getLogger("anomaly").warning(f"warning: skipped {e.path} ({err.strerror}: a symbolic link that "
                                                 f"points to itself?)")
        return False

    return entries(folder, lambda e: not e.name.startswith(".") and e.is_dir(), skipped if keep_broken else None)
