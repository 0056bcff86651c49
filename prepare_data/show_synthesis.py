"""Preview CRR's synthetic anomalies (SPEC 7.1) as one PNG grid.

Rows are samples; columns are the original image, the synthetic anomaly and its mask (white = anomalous).

    python prepare_data/show_synthesis.py --data_path data/mvtec/bottle --anomaly_source_path data/dtd

`--data_path` is either a plain folder of images (searched recursively for png/jpg/jpeg/bmp) or an
MVTec-style dataset / class folder, in which case only `train/good` images are used.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dataset import load_image, resize  # noqa: E402
from synthesis import AnomalySynthesizer, list_textures  # noqa: E402
from errors import UserError  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _walk_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    return out


def find_images(data_path: str) -> list[str]:
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path folder not found: {data_path}")
    good_dirs = [os.path.join(data_path, "train", "good")]
    good_dirs += [os.path.join(data_path, d, "train", "good") for d in sorted(os.listdir(data_path))]
    good_dirs = [d for d in good_dirs if os.path.isdir(d)]
    paths = [p for d in good_dirs for p in _walk_images(d)] if good_dirs else _walk_images(data_path)
    if not paths:
        raise UserError(f"no images (png/jpg/jpeg/bmp) found under {data_path}")
    return paths


def make_grid(paths, textures, n: int, size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(paths), size=n, replace=n > len(paths))
    synth = AnomalySynthesizer(textures, size=size)
    grid = Image.new("RGB", (3 * size, n * size))
    for row, k in enumerate(picks):
        img = np.asarray(resize(load_image(paths[int(k)]), size))
        aug, mask = synth(img, rng)
        mask_rgb = np.repeat((mask * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        for col, cell in enumerate((img, aug, mask_rgb)):
            grid.paste(Image.fromarray(cell), (col * size, row * size))
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_path", required=True, help="image folder or MVTec-layout dataset/class folder")
    ap.add_argument("--anomaly_source_path", default=None, help="texture folder (DTD: <dtd>/images/*/*.jpg)")
    ap.add_argument("--n", type=int, default=8, help="number of samples (rows)")
    ap.add_argument("--out", default="synthesis_grid.png", help="output PNG")
    ap.add_argument("--size", type=int, default=224, help="synthesis size per cell (training uses 448)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        if args.n < 1:
            raise UserError("--n must be at least 1")
        if args.size < 8:
            raise UserError("--size must be at least 8")
        paths = find_images(args.data_path)
        textures = list_textures(args.anomaly_source_path) if args.anomaly_source_path else None
        grid = make_grid(paths, textures, args.n, args.size, args.seed)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            grid.save(args.out)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot write {args.out}: {e}") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.n} rows x [original, synthetic, mask], {args.size}px cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
