"""MVTec 3D-AD's depth, as the Dinomaly2 preview prepares and reads it (its prepare_data/preprocess_mvtec3d_1.py,
preprocess_mvtec3d_2.py and dataset.py:MVTec3DDataset), without open3d:

1. `prepare_scan`: the background plane removed from the organised point cloud (xyz/<n>.tiff, [H, W, 3]): a plane
   fitted to the non-zero points of the 10-pixel border, every point within 5 mm of it zeroed; the cloud padded
   with zeros to a square (sides rounded up to 100); every point outside the largest DBSCAN cluster (eps 6 mm,
   30 points) zeroed; then its z channel with the gaps filled 3 times (each zero pixel with a non-zero neighbour
   takes the sum of its 3 x 3 window over the number of positive values there; row 0 and column 0 never, as the
   preview's slicing). The RGB image and the mask get the same padding, and the RGB image is zeroed where points
   were removed. These are the preview's z/<n>.tiff files (float32) and its rewritten rgb/ and gt/ files.
2. `colour_depth`, `zero_background`: per sample, depth > 0 is the foreground; d = 1 - 0.8 (z - min_fg) /
   (max - min_fg), 0 on the background, as uint8(255 d) through OpenCV's HOT colour map (then RGB order); the RGB
   image zeroed on the background.

What differs from the preview: its plane is open3d's RANSAC (random; 50 points a try, inliers within 4 mm); ours is
deterministic: a least-squares plane of the border points, refitted three times on those within 4 mm of it.
On a flat background both find the table to well within the 5 mm that decides, but a point right at 5 mm may fall
either way. The clustering is scikit-learn's DBSCAN, open3d's algorithm (a point with at least 30 points within
6 mm, itself included, is a core point); it holds every point's neighbours in memory at once, as open3d does.
"""
import math

import cv2
import numpy as np

from .errors import UserError, one_line

EDGE = 10  # border width (px) whose points fit the background plane
PLANE_FIT_DISTANCE = 0.004  # inlier distance of the plane fit (m)
PLANE_DISTANCE = 0.005  # points this close to the plane are background (m)
CLUSTER_EPS, CLUSTER_MIN_POINTS = 0.006, 30  # DBSCAN: the largest cluster is the object
FILL_ROUNDS = 3  # gap-filling rounds (each grows the outline by one pixel)
DEPTH_SPAN = 0.8  # the foreground's depth spans [1 - 0.8, 1] before the colour map


def read_tiff(path: str) -> np.ndarray:
    """A TIFF file (xyz point cloud [H, W, 3] or z map [H, W]) as float32; a one-line UserError if unreadable."""
    import tifffile
    try:
        return np.asarray(tifffile.imread(path), dtype=np.float32)
    except FileNotFoundError:
        raise UserError(f"depth file not found: {path}; check the dataset folder") from None
    except Exception as e:  # tifffile raises many kinds for a damaged file
        raise UserError(f"cannot read depth file {path} ({one_line(e)}); replace or remove the file") from None


def write_tiff(path: str, z: np.ndarray):
    """A float32 z map as TIFF, as the preview's Image.fromarray(z).save(path) writes it (one float32 page)."""
    import tifffile
    tifffile.imwrite(path, np.asarray(z, dtype=np.float32))


def border_points(pc: np.ndarray) -> np.ndarray:
    """The points of the EDGE-pixel border (top, bottom, left, right bands; corners twice, as the preview) with
    no zero coordinate."""
    bands = [pc[:EDGE], pc[-EDGE:], pc[:, :EDGE], pc[:, -EDGE:]]
    pts = np.concatenate([b.reshape(-1, 3) for b in bands])
    return pts[np.all(pts != 0, axis=1)]


def fit_plane(points: np.ndarray, rounds: int = 3) -> np.ndarray:
    """(a, b, c, d) with a unit normal: the least-squares plane of `points`, refitted `rounds` times on those
    within PLANE_FIT_DISTANCE of the last fit."""
    pts = points.astype(np.float64)
    if len(pts) < 3:
        raise ValueError("fewer than 3 border points to fit the background plane")
    use = pts
    plane = None
    for _ in range(rounds + 1):
        centre = use.mean(axis=0)
        normal = np.linalg.svd(use - centre, full_matrices=False)[2][-1]
        plane = np.append(normal, -normal @ centre)
        near = np.abs(pts @ plane[:3] + plane[3]) < PLANE_FIT_DISTANCE
        if near.sum() < 3:
            break
        use = pts[near]
    return plane


def pad_square(a: np.ndarray) -> np.ndarray:
    """Zero padding to a square of side max(H, W) rounded up to a multiple of 100, centred (the extra pixel of an
    odd margin after the image), as the preview's pad_cropped_pc."""
    h, w = a.shape[:2]
    side = max(int(math.ceil(h / 100.0)) * 100, int(math.ceil(w / 100.0)) * 100)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - top - h), (left, side - left - w)) + ((0, 0),) * (a.ndim - 2)
    return np.pad(a, pad, mode="constant")


def outside_largest_cluster(pc: np.ndarray) -> np.ndarray:
    """[H, W] bool: the non-zero points (no zero coordinate) outside the largest DBSCAN cluster (the noise label
    counting as a cluster, and the first of equally large ones, as the preview's np.unique + argmax)."""
    from sklearn.cluster import DBSCAN
    flat = pc.reshape(-1, 3)
    idx = np.flatnonzero(np.all(flat != 0, axis=1))
    out = np.zeros(len(flat), bool)
    if len(idx):
        labels = DBSCAN(eps=CLUSTER_EPS, min_samples=CLUSTER_MIN_POINTS).fit_predict(flat[idx].astype(np.float64))
        ids, sizes = np.unique(labels, return_counts=True)
        out[idx[labels != ids[np.argmax(sizes)]]] = True
    return out.reshape(pc.shape[:2])


def fill_gaps(z: np.ndarray) -> np.ndarray:
    """One round of the preview's gap filling: each zero pixel (not in row 0 or column 0) whose 3 x 3 window
    (clipped at the far edges) holds a positive value takes the window's sum over the number of positive values,
    summed in float32 row by row."""
    h, w = z.shape
    p = np.pad(z, 1)
    total = np.zeros_like(z)
    count = np.zeros(z.shape, np.int64)
    for dy in range(3):
        for dx in range(3):
            window = p[dy:dy + h, dx:dx + w]
            total += window
            count += window > 0
    fill = (z == 0) & (count > 0)
    fill[0, :] = fill[:, 0] = False
    out = z.copy()
    out[fill] = total[fill] / count[fill].astype(z.dtype)
    return out


def prepare_scan(xyz: np.ndarray, rgb: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The preview's two preprocessing scripts on one sample: (z map float32 [S, S] with gaps filled, the RGB
    image padded and zeroed where points were removed, the mask padded); rgb and mask None give None."""
    xyz = np.asarray(xyz, dtype=np.float32)
    plane = fit_plane(border_points(xyz))
    removed = np.abs(xyz.reshape(-1, 3).astype(np.float64) @ plane[:3] + plane[3]) < PLANE_DISTANCE
    removed = removed.reshape(xyz.shape[:2])
    pc = pad_square(np.where(removed[..., None], np.float32(0), xyz))
    removed = pad_square(removed)
    outliers = outside_largest_cluster(pc)
    pc[outliers] = 0
    removed |= outliers
    z = pc[..., 2]
    for _ in range(FILL_ROUNDS):
        z = fill_gaps(z)
    if rgb is not None:
        rgb = pad_square(np.asarray(rgb))
        rgb[removed] = 0
    return z, rgb, None if mask is None else pad_square(np.asarray(mask))


def colour_depth(z: np.ndarray, path: str = "depth") -> np.ndarray:
    """[H, W] z map -> uint8 [H, W, 3] RGB: the foreground's depth (z > 0) normalised per sample to [1 - 0.8, 1]
    (nearest brightest), 0 on the background, through OpenCV's HOT colour map (float32 as the preview)."""
    z = np.asarray(z, dtype=np.float32)
    fg = z > 0
    if not fg.any():
        raise UserError(f"{path} has no foreground (every depth is 0): nothing to colour; check the file, or "
                        f"remove the sample")
    low, high = z[fg].min(), z.max()
    d = (z - low) / (high - low)
    d = 1 - d * DEPTH_SPAN
    d[~fg] = 0
    return np.ascontiguousarray(cv2.applyColorMap((d * 255).astype(np.uint8), cv2.COLORMAP_HOT)[:, :, ::-1])


def zero_background(rgb: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The RGB image with the background (z == 0, or below) set to black."""
    out = np.array(rgb, copy=True)
    out[~(np.asarray(z) > 0)] = 0
    return out
