"""Preview CRR's synthetic anomalies as one labelled PNG grid.

Rows are samples; columns are the image (cv2-resized, as the anomaly is pasted into it), the synthetic
anomaly and its mask M (white = anomalous, grey = soft). Above each row: the anomaly source (a texture file
or "self"), the 3 augmenters in the order applied, the opacity beta and the Perlin lattice resolution.

    python prepare_data/show_synthesis.py --data_path data/mvtec/bottle --anomaly_source_path data/dtd

`--data_path` is a plain folder of images (searched recursively for png/jpg/jpeg/bmp), an MVTec-style
dataset / class folder (only `train/good` images are used), or a Real-IAD class folder
`<data_path>/realiad_1024/<class>` (only the images under `OK/`; their object masks come from
`<data_path>/realiad_1024_DISthresh` when that folder exists, as in training).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dinomaly.dataset import Sample, attach_foreground, load_image  # noqa: E402
from dinomaly.errors import UserError  # noqa: E402
from dinomaly.synthesis import AnomalySynthesizer, Synthesis, list_textures, load_foreground  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
TEXT_H = 12  # height of a caption line in pixels
COLUMNS = ("image", "synthetic", "mask M")


def _walk_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if f.lower().endswith(EXTENSIONS) and not f.startswith(".")]
    return out


def find_samples(data_path: str) -> list[Sample]:
    """The images to preview as Samples (see the module docstring for the layouts); Real-IAD ones get their
    foreground_path from dataset.attach_foreground."""
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path folder not found: {data_path}")
    name = os.path.basename(os.path.normpath(data_path))
    if os.path.isdir(os.path.join(data_path, "OK")):
        samples = [Sample(p, 0, None, name, rel_path=os.path.relpath(p, data_path).replace(os.sep, "/"))
                   for p in _walk_images(os.path.join(data_path, "OK"))]
        attach_foreground(samples)
    else:
        good_dirs = [os.path.join(data_path, "train", "good")]
        good_dirs += [os.path.join(data_path, d, "train", "good") for d in sorted(os.listdir(data_path))]
        good_dirs = [d for d in good_dirs if os.path.isdir(d)]
        paths = [p for d in good_dirs for p in _walk_images(d)] if good_dirs else _walk_images(data_path)
        samples = [Sample(p, 0, None, name) for p in paths]
    if not samples:
        raise UserError(f"no images (png/jpg/jpeg/bmp) found under {data_path}")
    return samples


def caption(syn: Synthesis) -> str:
    """One line naming the draws behind a synthetic anomaly."""
    source = "self" if syn.source == "self" else os.path.basename(syn.source)
    res = "x".join(str(r) for r in syn.perlin_res)
    return f"{source} | {', '.join(syn.augmenters)} | beta {syn.beta:.2f} | perlin {res}"


def make_grid(samples: list[Sample], textures, n: int, size: int, seed: int) -> Image.Image:
    """n random samples, each as [image | synthetic | mask] at size x size, under a header naming the columns
    and a caption line per row (see caption)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(samples), size=n, replace=n > len(samples))
    synth = AnomalySynthesizer(textures, size=size)
    grid = Image.new("RGB", (3 * size, TEXT_H + n * (TEXT_H + size)))
    draw = ImageDraw.Draw(grid)
    for col, name in enumerate(COLUMNS):
        draw.text((col * size + 2, 0), name, fill=(255, 255, 0))
    for row, k in enumerate(picks):
        s = samples[int(k)]
        img = np.asarray(load_image(s.image_path))
        fg = load_foreground(s.foreground_path, size) if s.foreground_path else None
        syn = synth(img, rng, fg)
        top = TEXT_H + row * (TEXT_H + size)
        draw.text((2, top), caption(syn), fill=(255, 255, 255))
        base = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        mask_rgb = np.repeat((syn.mask * 255.0).astype(np.uint8)[..., None], 3, axis=2)
        for col, cell in enumerate((base, syn.image, mask_rgb)):
            grid.paste(Image.fromarray(cell), (col * size, top + TEXT_H))
    return grid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_path", required=True, help="image folder or MVTec-layout dataset/class folder")
    ap.add_argument("--anomaly_source_path", default=None,
                    help="DTD folder (<dtd>/images/<category>/*.jpg); omitted: self-made anomalies only")
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
        samples = find_samples(args.data_path)
        textures = list_textures(args.anomaly_source_path) if args.anomaly_source_path else None
        grid = make_grid(samples, textures, args.n, args.size, args.seed)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            grid.save(args.out)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot write {args.out}: {e}") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.n} rows x [{', '.join(COLUMNS)}], {args.size}px cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
