"""Prepare MVTec 3D-AD's depth once, as the Dinomaly2 preview's two preprocessing scripts do, into a new folder.

    python prepare_data/prepare_mvtec3d.py --data_path ../mvtec_3d --out ../mvtec_3d_prepared [--workers 4]

For every sample `<class>/<split>/<kind>/xyz/<n>.tiff` (splits train, validation, test) it writes
`<out>/<class>/<split>/<kind>/z/<n>.tiff` (the z map: background plane removed, padded square, the largest cluster
kept, gaps filled; float32), `rgb/<n>.png` (padded, zeroed where points were removed) and, where the sample has
one, `gt/<n>.png` (padded): what the preview's preprocess_mvtec3d_1.py and _2.py leave in the dataset folder
(dinomaly/depth.py says how, and where ours differs). The dataset itself is not changed (the preview's scripts
rewrite it in place, so that they cannot run twice). Then train with `--data_path <out>`. Without this step,
dinomaly2_mvtec3d.py prepares each point cloud when it reads it (cached with --cache_images).
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dinomaly import depth  # noqa: E402
from dinomaly.dataset import load_image, load_mask  # noqa: E402
from dinomaly.errors import UserError  # noqa: E402

SPLITS = ("train", "validation", "test")


def samples(root: str) -> list[tuple[str, str]]:
    """(sample folder <class>/<split>/<kind> relative to root, stem) of every point cloud, sorted."""
    out = []
    for c in sorted(os.listdir(root)):
        for split in SPLITS:
            d = os.path.join(root, c, split)
            for kind in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                xyz = os.path.join(d, kind, "xyz")
                for name in sorted(os.listdir(xyz)) if os.path.isdir(xyz) else []:
                    if name.endswith(".tiff"):
                        out.append((os.path.join(c, split, kind), name[:-len(".tiff")]))
    return out


def prepare_one(root: str, out: str, folder: str, stem: str):
    src, dst = os.path.join(root, folder), os.path.join(out, folder)
    gt = os.path.join(src, "gt", stem + ".png")
    rgb = np.asarray(load_image(os.path.join(src, "rgb", stem + ".png")))
    mask = np.asarray(load_mask(gt)) if os.path.isfile(gt) else None
    z, rgb, mask = depth.prepare_scan(depth.read_tiff(os.path.join(src, "xyz", stem + ".tiff")), rgb, mask)
    for sub in ("z", "rgb") + (("gt",) if mask is not None else ()):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    depth.write_tiff(os.path.join(dst, "z", stem + ".tiff"), z)
    Image.fromarray(rgb).save(os.path.join(dst, "rgb", stem + ".png"))
    if mask is not None:
        Image.fromarray(mask).save(os.path.join(dst, "gt", stem + ".png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Prepare MVTec 3D-AD's depth (z/ files) into a new folder.")
    p.add_argument("--data_path", default="../mvtec_3d", help="MVTec 3D-AD as distributed (default ../mvtec_3d)")
    p.add_argument("--out", required=True, help="the prepared copy (rgb, gt, z), a new folder")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_path):
        print(f"error: dataset folder not found: {args.data_path}; check --data_path", file=sys.stderr)
        return 2
    if os.path.abspath(args.out) == os.path.abspath(args.data_path):
        print("error: --out must be a new folder: the dataset is not rewritten in place", file=sys.stderr)
        return 2
    todo = samples(args.data_path)
    if not todo:
        print(f"error: no <class>/<split>/<kind>/xyz/<n>.tiff in {args.data_path}; check --data_path",
              file=sys.stderr)
        return 2
    try:
        with ProcessPoolExecutor(max(1, args.workers)) as pool:
            for i, _ in enumerate(pool.map(prepare_one, *zip(*[(args.data_path, args.out, f, s) for f, s in todo]))):
                if (i + 1) % 100 == 0 or i + 1 == len(todo):
                    print(f"prepared {i + 1} of {len(todo)} samples", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: train with --data_path {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
