"""Small synthetic datasets of two modalities, for smoke runs of Dinomaly2's RGB + depth and RGB + infrared settings.

    python prepare_data/make_demo_pairs.py --out demo_data [--size 100] [--seed 0] [--n_train 24]
        [--n_test_good 6] [--n_test_bad 6]

Writes two classes of objects on a tilted table, `dome` and `block`, in two layouts:
- `<out>/mvtec3d_demo/<class>/{train,validation,test}/<kind>/{rgb/<n>.png, xyz/<n>.tiff, gt/<n>.png}`: MVTec
  3D-AD's layout as distributed. xyz is the organised point cloud (float32 [S, S, 3], metres; about 1 mm a
  pixel, the table 0.6 m from the camera, the object up to 2 cm above it), with a few missing points (zeros) and a
  small cluster of stray points above the table. Test kinds: `good`, `dent` (a dent in the object's surface, seen
  in the depth only) and `stain` (a stain, seen in the colour only); gt the defect's mask.
- `<out>/mulsen_demo/<class>/{RGB,Infrared}/{train,test/<kind>,GT/<kind>}/<n>.png`,
  `RGB/GT/<kind>/data.csv` (object, RGB, Infrared and point-cloud labels) and `Pointcloud/{train,test/<kind>}/<n>.stl`
  (a coarse binary STL mesh of the object's surface; our reader does not read it, the preview's pairs it with the
  images): MulSen-AD's layout. The infrared image is the object's heat (warm object, cool table). Test kinds: `good`, `hotspot` (a hot spot, seen in the infrared
  image only), `stain` (seen in the RGB image only), `crack` (both) and `inner` (labelled in the point cloud only,
  seen in neither image, as MulSen-AD's internal defects).

Everything is deterministic given --seed. Each of the two folders is replaced on each run.
"""
import argparse
import csv
import os
import shutil
import sys

import numpy as np
from PIL import Image

CLASSES = ("dome", "block")
SPACING = 0.001  # metres a pixel
TABLE = 0.6  # the table's distance from the camera (m)
HEIGHT = 0.02  # the object's height (m)
KINDS_3D = ("dent", "stain")
KINDS_IR = {"hotspot": (0, 1, 0), "stain": (1, 0, 0), "crack": (1, 1, 0), "inner": (0, 0, 1)}  # RGB, IR, PC labels


def _noise(rng, size: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1] (a cells x cells lattice, bicubically upsampled)."""
    lattice = rng.normal(size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(lattice).resize((size, size), Image.BICUBIC)) / 2


def _object(rng, name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(height above the table in metres [S, S], the object's mask): a dome or a rounded block, its centre and
    radius jittered."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    r = size * rng.uniform(0.28, 0.33)
    if name == "dome":
        d = np.hypot(yy - cy, xx - cx) / r
        h = HEIGHT * np.sqrt(np.clip(1 - d ** 2, 0, None))
    else:
        d = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
        h = HEIGHT * 0.8 * np.clip((r - d) / 3, 0, 1)
    return h, h > 0


def _spot(rng, fg: np.ndarray, size: int, radius: float) -> np.ndarray:
    """A soft round spot [S, S] in [0, 1], centred on the object."""
    ys, xs = np.nonzero(fg)
    i = rng.integers(len(ys))
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * radius ** 2)) * fg


def _point_cloud(rng, h: np.ndarray, size: int) -> np.ndarray:
    """The organised point cloud [S, S, 3] float32 of a height map on the tilted table, with missing points and a
    small cluster of stray points."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = (xx - size / 2) * SPACING, (yy - size / 2) * SPACING
    z = TABLE + 0.05 * x + 0.03 * y - h
    pc = np.stack([x, y, z], axis=-1)
    stray = (slice(3, 6), slice(size - 8, size - 5))  # 9 points 3 cm above the table: not the object
    pc[stray + (2,)] -= 0.03
    pc[rng.random((size, size)) < 0.005] = 0  # missing measurements
    return pc.astype(np.float32)


def _rgb(rng, name: str, h: np.ndarray, fg: np.ndarray, size: int) -> np.ndarray:
    """float [S, S, 3] in [0, 1]: a grey table, the object in its class's colour, shaded by its height."""
    base = np.array([0.85, 0.55, 0.25]) if name == "dome" else np.array([0.3, 0.5, 0.8])
    table = 0.45 + 0.05 * _noise(rng, size, 8)[..., None]
    shade = 0.75 + 0.25 * (h / HEIGHT)[..., None] + 0.05 * _noise(rng, size, 16)[..., None]
    return np.where(fg[..., None], base * shade, table).clip(0, 1)


def _infrared(rng, h: np.ndarray, fg: np.ndarray, size: int) -> np.ndarray:
    """float [S, S] in [0, 1]: a warm object on a cool table, warmest where it is thickest."""
    heat = 0.55 + 0.25 * (h / HEIGHT) + 0.03 * _noise(rng, size, 12)
    return np.where(fg, heat, 0.15 + 0.03 * _noise(rng, size, 6)).clip(0, 1)


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save(path: str, array: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".tiff"):
        import tifffile
        tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    else:
        Image.fromarray(array).save(path)


def _stain(rng, rgb: np.ndarray, fg: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    spot = _spot(rng, fg, size, size * 0.05)
    return rgb * (1 - 0.6 * spot[..., None]) + 0.6 * spot[..., None] * np.array([0.2, 0.15, 0.1]), spot > 0.3


def _save_stl(path: str, h: np.ndarray, step: int = 8):
    """A binary STL of the height map h [S, S] (metres) sampled every `step` pixels: two triangles a grid cell,
    vertices (x, y, height) in metres."""
    idx = np.arange(0, h.shape[0], step)
    yy, xx = np.meshgrid(idx, idx, indexing="ij")
    v = np.stack([xx * SPACING, yy * SPACING, h[yy, xx]], axis=-1)
    a, b, c, d = v[:-1, :-1], v[:-1, 1:], v[1:, :-1], v[1:, 1:]
    tri = np.concatenate([np.stack([a, c, b], -2).reshape(-1, 3, 3), np.stack([b, c, d], -2).reshape(-1, 3, 3)])
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    rows = np.zeros(len(tri), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rows["n"], rows["v"] = normal, tri
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"make_demo_pairs: object surface".ljust(80, b" ") + np.uint32(len(tri)).tobytes() + rows.tobytes())


def make_mvtec3d_demo(root: str, size: int, seed: int, n_train: int, n_test_good: int, n_test_bad: int):
    """The RGB + depth classes in MVTec 3D-AD's layout under `root` (see the module)."""
    for ci, name in enumerate(CLASSES):
        rng = np.random.default_rng([seed, 3, ci])
        plan = [("train", "good")] * n_train + [("validation", "good")] * 2 + [("test", "good")] * n_test_good + \
            [("test", k) for k in KINDS_3D for _ in range(n_test_bad)]
        counts = {}
        for split, kind in plan:
            i = counts[split, kind] = counts.get((split, kind), -1) + 1
            h, fg = _object(rng, name, size)
            rgb, mask = _rgb(rng, name, h, fg, size), None
            if kind == "dent":
                spot = _spot(rng, fg & (h > HEIGHT / 2), size, size * 0.04)
                h, mask = h - 0.005 * spot, spot > 0.3
            elif kind == "stain":
                rgb, mask = _stain(rng, rgb, fg, size)
            folder = os.path.join(root, name, split, kind)
            _save(os.path.join(folder, "rgb", f"{i:03d}.png"), _u8(rgb))
            _save(os.path.join(folder, "xyz", f"{i:03d}.tiff"), _point_cloud(rng, h, size))
            if mask is not None:
                _save(os.path.join(folder, "gt", f"{i:03d}.png"), mask.astype(np.uint8) * 255)


def make_mulsen_demo(root: str, size: int, seed: int, n_train: int, n_test_good: int, n_test_bad: int):
    """The RGB + infrared classes in MulSen-AD's layout under `root` (see the module)."""
    for ci, name in enumerate(CLASSES):
        rng = np.random.default_rng([seed, 4, ci])
        for i in range(n_train + n_test_good):
            h, fg = _object(rng, name, size)
            split = "train" if i < n_train else os.path.join("test", "good")
            n = i if i < n_train else i - n_train
            _save(os.path.join(root, name, "RGB", split, f"{n}.png"), _u8(_rgb(rng, name, h, fg, size)))
            _save(os.path.join(root, name, "Infrared", split, f"{n}.png"), _u8(_infrared(rng, h, fg, size)))
            _save_stl(os.path.join(root, name, "Pointcloud", split, f"{n}.stl"), h)
        for kind, labels in KINDS_IR.items():
            rows = []
            for n in range(n_test_bad):
                h, fg = _object(rng, name, size)
                rgb, ir = _rgb(rng, name, h, fg, size), _infrared(rng, h, fg, size)
                rgb_mask = ir_mask = None
                if kind == "crack":  # a dark line, cooler in the infrared image
                    spot = _spot(rng, fg, size, size * 0.03)
                    rgb, ir = rgb * (1 - 0.7 * spot[..., None]), ir - 0.3 * spot
                    rgb_mask = ir_mask = spot > 0.3
                elif kind == "stain":
                    rgb, rgb_mask = _stain(rng, rgb, fg, size)
                elif kind == "hotspot":
                    spot = _spot(rng, fg, size, size * 0.04)
                    ir, ir_mask = ir + 0.4 * spot, spot > 0.3
                for modality, image, mask in (("RGB", _u8(rgb), rgb_mask), ("Infrared", _u8(ir), ir_mask)):
                    _save(os.path.join(root, name, modality, "test", kind, f"{n}.png"), image)
                    if mask is not None:
                        _save(os.path.join(root, name, modality, "GT", kind, f"{n}.png"), mask.astype(np.uint8) * 255)
                _save_stl(os.path.join(root, name, "Pointcloud", "test", kind, f"{n}.stl"), h)
                rows.append([str(n), *map(str, labels)])
            os.makedirs(os.path.join(root, name, "RGB", "GT", kind), exist_ok=True)
            with open(os.path.join(root, name, "RGB", "GT", kind, "data.csv"), "w", newline="") as f:
                csv.writer(f).writerows([["object", "RGB", "Infrared", "Pointcloud"], *rows])


def make_demo_pairs(out: str, size: int = 100, seed: int = 0, n_train: int = 24, n_test_good: int = 6,
                    n_test_bad: int = 6) -> dict[str, str]:
    """Write both datasets under `out`; returns {'mvtec3d': folder, 'mulsen': folder}."""
    if size < 64:
        raise ValueError("size must be at least 64")
    if min(n_train, n_test_good, n_test_bad) < 1:
        raise ValueError("the image counts must be at least 1")
    paths = {"mvtec3d": os.path.join(out, "mvtec3d_demo"), "mulsen": os.path.join(out, "mulsen_demo")}
    for d in paths.values():
        if os.path.isdir(d):
            shutil.rmtree(d)
    make_mvtec3d_demo(paths["mvtec3d"], size, seed, n_train, n_test_good, n_test_bad)
    make_mulsen_demo(paths["mulsen"], size, seed, n_train, n_test_good, n_test_bad)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write small synthetic RGB + depth and RGB + infrared datasets.")
    p.add_argument("--out", default="demo_data", help="output folder (default demo_data)")
    p.add_argument("--size", type=int, default=100, help="image side in pixels (default 100, at least 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=24, help="normal training samples per class")
    p.add_argument("--n_test_good", type=int, default=6, help="normal test samples per class")
    p.add_argument("--n_test_bad", type=int, default=6, help="anomalous test samples per class and defect kind")
    args = p.parse_args(argv)
    if args.size < 64 or min(args.n_train, args.n_test_good, args.n_test_bad) < 1:
        print("error: --size must be at least 64 and the sample counts at least 1", file=sys.stderr)
        return 2
    try:
        paths = make_demo_pairs(args.out, args.size, args.seed, args.n_train, args.n_test_good, args.n_test_bad)
    except OSError as e:
        print(f"error: cannot write {args.out} ({' '.join(str(e).split())}); choose another --out", file=sys.stderr)
        return 2
    classes = " ".join(CLASSES)
    print(f"RGB + depth (MVTec 3D-AD layout):   {paths['mvtec3d']}  (--data_path {paths['mvtec3d']} --classes "
          f"{classes})")
    print(f"RGB + infrared (MulSen-AD layout): {paths['mulsen']}  (--data_path {paths['mulsen']} --classes "
          f"{classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
