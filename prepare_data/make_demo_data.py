"""A small synthetic anomaly-detection dataset, for smoke runs without downloading anything.

    python prepare_data/make_demo_data.py --out demo_data [--size 128] [--seed 0]
        [--n_train 40] [--n_test_good 10] [--n_test_bad 12] [--views 1] [--manta]

Writes, for three classes (two textures, one object), the same images in two layouts:
- `<out>/mvtec_demo/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}`
  (MVTec AD layout: use with `--data_path <out>/mvtec_demo --classes weave woodgrain nut`);
- `<out>/realiad_demo/realiad_1024/<class>/{OK,NG/<code>}/S<nnnn>/<class>_<nnnn>_<OK|code>_C<v>_<time>.jpg`
  with the masks beside the anomalous images (`.png`), the split files
  `<out>/realiad_demo/realiad_jsons/realiad_jsons/<class>.json`, and soft-edged grey object masks for CRR
  where the released code looks for them, `<out>/realiad_demo/realiad_1024_DISthresh/<class>/DISthresh/S<nnnn>/`
  with the image's file name (every OK image). Each sample folder S<nnnn> is one object with `--views` views
  C1, C2, ... (default 1): an OK object is that many consecutive normal images (the last of a split may have
  fewer), an NG object its defective image (C1, with its mask) and the same image before the defect was added as
  the other views (listed NG without a mask, as Real-IAD lists views that do not show the defect).
- with `--manta`, `<out>/manta_demo/demo/<class>/` in MANTA-Tiny's layout (MVTec layout, each image five
  256-px views side by side): five consecutive normal images (repeated to fill the last) per normal image, a
  defective image followed by four copies of its clean version per anomalous one, masks likewise.

Everything is deterministic given --seed. The two output folders are replaced on each run.
"""
import argparse
import json
import os
import shutil
import sys

import cv2
import numpy as np
from PIL import Image

CLASSES = ("weave", "woodgrain", "nut")
DEFECTS = {  # class -> defect kinds (test folder names)
    "weave": ("scratch", "hole", "stain"),
    "woodgrain": ("scratch", "hole", "stain", "cut"),
    "nut": ("scratch", "stain", "cut"),
}
REALIAD_CODES = {"scratch": "HS", "hole": "AK", "stain": "ZW", "cut": "QS"}  # Real-IAD defect codes


# ----------------------------------------------------------------------------------------------------------
# Normal images: float32 [S, S, 3] in [0, 1], plus the object (foreground) mask as bool [S, S]


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a cells x cells lattice of normal values, bicubically upsampled."""
    lattice = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(lattice, (size, size), interpolation=cv2.INTER_CUBIC)


def _weave(rng, s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    a = np.deg2rad(rng.uniform(-4, 4))
    u = xx * np.cos(a) + yy * np.sin(a)
    v = -xx * np.sin(a) + yy * np.cos(a)
    period = s / rng.uniform(11.0, 13.0)
    pu, pv = 2 * np.pi * (u / period + rng.uniform()), 2 * np.pi * (v / period + rng.uniform())
    horiz = 0.5 + 0.5 * np.cos(pv)  # threads along u
    vert = 0.5 + 0.5 * np.cos(pu)  # threads along v
    over = np.sin(pu / 2) * np.sin(pv / 2) > 0  # over/under alternation of a plain weave
    val = np.where(over, 0.35 + 0.45 * horiz, 0.35 + 0.45 * vert)
    val += rng.normal(0, 0.03, size=(s, s)).astype(np.float32)
    tint = np.array([0.92, 0.82, 0.62], np.float32) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    img = 0.1 + 0.85 * val[..., None] * tint
    return np.clip(img, 0, 1).astype(np.float32), np.ones((s, s), bool)


def _woodgrain(rng, s: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.mgrid[0:s, 0:s][0].astype(np.float32) / s
    turb = _smooth_noise(rng, s, 5)
    freq = rng.uniform(7.0, 9.0)
    grain = np.sin(2 * np.pi * (yy * freq + 0.12 * turb + rng.uniform()))
    streaks = cv2.resize(rng.normal(size=(s, max(2, s // 16))).astype(np.float32), (s, s),
                         interpolation=cv2.INTER_LINEAR)  # fibres along x
    val = 0.55 + 0.18 * grain + 0.05 * streaks + rng.normal(0, 0.015, size=(s, s)).astype(np.float32)
    tint = np.array([0.78, 0.52, 0.28], np.float32) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    img = val[..., None] * tint * 1.2
    return np.clip(img, 0, 1).astype(np.float32), np.ones((s, s), bool)


def _nut(rng, s: int) -> tuple[np.ndarray, np.ndarray]:
    bg = np.array([0.16, 0.17, 0.2], np.float32) * rng.uniform(0.9, 1.1)
    img = np.empty((s, s, 3), np.float32)
    img[:] = bg
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    r_out, r_in = s * rng.uniform(0.31, 0.34), s * rng.uniform(0.12, 0.14)
    rot = rng.uniform(0, np.pi / 3)
    ang = rot + np.arange(6) * np.pi / 3
    hexagon = np.stack([cx + r_out * np.cos(ang), cy + r_out * np.sin(ang)], 1)
    canvas = np.zeros((s, s), np.uint8)
    cv2.fillPoly(canvas, [np.round(hexagon * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    r = np.hypot(xx - cx, yy - cy)
    fg = (canvas > 0) & (r > r_in)
    metal = np.array([0.72, 0.7, 0.64], np.float32) * rng.uniform(0.92, 1.08)
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.85 + 0.15 * np.cos(np.arctan2(yy - cy, xx - cx) - light) * (r / r_out) - 0.1 * (r / r_out) ** 2
    obj = metal * shade[..., None] + rng.normal(0, 0.015, size=(s, s, 1)).astype(np.float32)
    img = np.where(fg[..., None], obj, img + rng.normal(0, 0.01, size=(s, s, 1)).astype(np.float32))
    return np.clip(img, 0, 1).astype(np.float32), fg


MAKERS = {"weave": _weave, "woodgrain": _woodgrain, "nut": _nut}


# ----------------------------------------------------------------------------------------------------------
# Defects: each returns the changed image and the bool defect mask (always non-empty)


def _fixed(v) -> tuple[int, ...]:
    """A point or size for OpenCV drawing with shift=4 (4 fractional bits)."""
    return tuple(int(x) for x in np.round(np.asarray(v, np.float64) * 16))


def _scratch(rng, img, fg, s):
    thick = max(2, round(s / 60))
    for _ in range(100):
        p0 = rng.uniform(0.2, 0.8, size=2) * s
        a = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * s
        d = np.array([np.cos(a), np.sin(a)])
        bend = np.array([-d[1], d[0]]) * rng.uniform(-0.06, 0.06) * s
        pts = np.stack([p0, p0 + d * length / 2 + bend, p0 + d * length])
        canvas = np.zeros((s, s), np.uint8)
        cv2.polylines(canvas, [np.round(pts * 16).astype(np.int32)], False, 255, thick, cv2.LINE_8, shift=4)
        m = (canvas > 0) & fg
        if m.sum() >= 3 * s // 4:
            break
    local = img[m].mean()
    colour = 0.97 if local < 0.5 else 0.04
    out = img.copy()
    out[m] = colour
    return out, m


def _hole(rng, img, fg, s):
    for _ in range(100):
        c = rng.uniform(0.2, 0.8, size=2) * s
        axes = rng.uniform(0.04, 0.07, size=2) * s
        canvas = np.zeros((s, s), np.uint8)
        cv2.ellipse(canvas, _fixed(c), _fixed(axes),
                    rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_8, shift=4)
        m = (canvas > 0) & fg
        if m.sum() >= 20:
            break
    out = img.copy()
    yy, xx = np.nonzero(m)
    rim = np.hypot(yy - c[1], xx - c[0]) / max(axes.max(), 1.0)  # slightly lighter towards the rim
    out[yy, xx] = (0.03 + 0.08 * np.clip(rim, 0, 1))[:, None] * np.array([1.0, 0.9, 0.8], np.float32)
    return out, m


def _stain(rng, img, fg, s):
    colours = np.array([[0.85, 0.15, 0.1], [0.1, 0.3, 0.9], [0.15, 0.75, 0.2]], np.float32)
    for _ in range(100):
        c = rng.uniform(0.25, 0.75, size=2) * s
        canvas = np.zeros((s, s), np.uint8)
        for _ in range(3):
            cc = c + rng.normal(0, 0.035, size=2) * s
            axes = rng.uniform(0.03, 0.06, size=2) * s
            cv2.ellipse(canvas, _fixed(cc), _fixed(axes),
                        rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_8, shift=4)
        m = (canvas > 0) & fg
        if m.sum() >= 20:
            break
    out = img.copy()
    alpha = rng.uniform(0.65, 0.8)
    out[m] = (1 - alpha) * out[m] + alpha * colours[rng.integers(len(colours))]
    return out, m


def _cut(rng, img, fg, s):
    """A missing piece: part of the object (or of the texture) replaced by dark background."""
    ys, xs = np.nonzero(fg)
    for _ in range(100):
        if fg.all():  # texture: a hole through the material
            c = rng.uniform(0.25, 0.75, size=2) * s
        else:  # object: a bite out of the rim
            edge = fg & ~cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            ey, ex = np.nonzero(edge)
            k = rng.integers(len(ex))
            c = np.array([ex[k], ey[k]], np.float64)
        radius = rng.uniform(0.07, 0.11) * s
        canvas = np.zeros((s, s), np.uint8)
        t = np.linspace(0, 2 * np.pi, 9)[:-1] + rng.uniform(0, 1)
        pts = c + radius * np.stack([np.cos(t), np.sin(t)], 1) * rng.uniform(0.7, 1.0, size=(8, 1))
        cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
        m = (canvas > 0) & fg
        if m.sum() >= 20:
            break
    out = img.copy()
    bg = img[~fg].mean(axis=0) if (~fg).any() else np.array([0.06, 0.06, 0.07], np.float32)
    out[m] = bg + rng.normal(0, 0.01, size=(int(m.sum()), 1)).astype(np.float32)
    return out, m


DEFECT_MAKERS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut": _cut}


# ----------------------------------------------------------------------------------------------------------


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _soft_foreground(fg: np.ndarray) -> np.ndarray:
    """A uint8 object mask with soft edges (Gaussian blur, sigma 1 pixel), like a salient-object model's."""
    return cv2.GaussianBlur(fg, (0, 0), 1.0)


def _class_images(name: str, class_idx: int, size: int, seed: int, n_train: int, n_test_good: int,
                  n_test_bad: int, with_clean: bool = False):
    """Yields (split, defect or 'good', index within its folder, image uint8, mask uint8 or None, fg uint8),
    plus the image before the defect was added when `with_clean`."""
    rng = np.random.default_rng([seed, class_idx])
    make = MAKERS[name]
    for split, n in (("train", n_train), ("test", n_test_good)):
        for i in range(n):
            img, fg = make(rng, size)
            item = (split, "good", i, _to_uint8(img), None, (fg * 255).astype(np.uint8))
            yield item + (item[3],) if with_clean else item
    kinds = DEFECTS[name]
    counters = dict.fromkeys(kinds, 0)
    for i in range(n_test_bad):
        kind = kinds[i % len(kinds)]
        clean, fg = make(rng, size)
        img, m = DEFECT_MAKERS[kind](rng, clean, fg, size)
        item = ("test", kind, counters[kind], _to_uint8(img), (m * 255).astype(np.uint8), (fg * 255).astype(np.uint8))
        yield item + (_to_uint8(clean),) if with_clean else item
        counters[kind] += 1


def _realiad_object(img_root: str, fg_root: str, name: str, sample_no: int, code: str, views: list) -> list[dict]:
    """Write one Real-IAD object, views [(image, mask or None, foreground)] as C1, C2, ...; its split entries."""
    sub = f"OK/S{sample_no:04d}" if code == "OK" else f"NG/{code}/S{sample_no:04d}"
    os.makedirs(os.path.join(img_root, name, sub), exist_ok=True)
    entries = []
    for v, (img, mask, fg) in enumerate(views, 1):
        rel_stem = f"{sub}/{name}_{sample_no:04d}_{code}_C{v}_{20240101000000 + sample_no}"
        Image.fromarray(img).save(os.path.join(img_root, name, rel_stem + ".jpg"), quality=95)
        entry = {"category": name, "anomaly_class": code, "image_path": rel_stem + ".jpg", "mask_path": None}
        if mask is not None:
            Image.fromarray(mask).save(os.path.join(img_root, name, rel_stem + ".png"))
            entry["mask_path"] = rel_stem + ".png"
        if code == "OK":  # the image path with its OK folder named DISthresh
            fdir = os.path.join(fg_root, name, "DISthresh", f"S{sample_no:04d}")
            os.makedirs(fdir, exist_ok=True)
            Image.fromarray(_soft_foreground(fg)).save(os.path.join(fdir, os.path.basename(rel_stem) + ".jpg"),
                                                       quality=95)
        entries.append(entry)
    return entries


def _manta_image(folder: str, stem: str, views: list[np.ndarray]):
    """Five views, each resized to 256 x 256 (nearest for masks), side by side in one PNG."""
    os.makedirs(folder, exist_ok=True)
    strips = [cv2.resize(v, (256, 256), interpolation=cv2.INTER_NEAREST if v.ndim == 2 else cv2.INTER_LINEAR)
              for v in views]
    Image.fromarray(np.concatenate(strips, axis=1)).save(os.path.join(folder, stem + ".png"))


def make_demo_data(out: str, size: int = 128, seed: int = 0, n_train: int = 40, n_test_good: int = 10,
                   n_test_bad: int = 12, verbose: bool = False, views: int = 1,
                   manta: bool = False) -> dict[str, str]:
    """Write the demo dataset under `out`; returns {'mvtec': folder, 'realiad': folder, 'foreground': folder},
    and 'manta': folder with `manta`. `views`: views per Real-IAD object (see the module's docstring)."""
    if size < 32:
        raise ValueError("size must be at least 32")
    if min(n_train, n_test_good, n_test_bad, views) < 1:
        raise ValueError("n_train, n_test_good, n_test_bad and views must be at least 1")
    mv_root = os.path.join(out, "mvtec_demo")
    ri_root = os.path.join(out, "realiad_demo")
    ma_root = os.path.join(out, "manta_demo")
    for d in (mv_root, ri_root) + ((ma_root,) if manta else ()):  # only what is written again: not the others'
        if os.path.isdir(d):
            shutil.rmtree(d)
    img_root = os.path.join(ri_root, "realiad_1024")
    fg_root = os.path.join(ri_root, "realiad_1024_DISthresh")
    json_root = os.path.join(ri_root, "realiad_jsons", "realiad_jsons")
    os.makedirs(json_root)

    for ci, name in enumerate(CLASSES):
        split_json = {"meta": {"prefix": "", "normal_class": "OK"}, "train": [], "test": []}
        sample_no, pending = 0, []  # normal views waiting to fill an OK object: [(split, (img, None, fg))]
        manta_good, manta_no = {"train": [], "test": []}, 0

        def add_object(split, code, object_views):
            nonlocal sample_no
            sample_no += 1
            split_json[split] += _realiad_object(img_root, fg_root, name, sample_no, code, object_views)

        def flush():  # the pending normal views as one OK object
            if pending:
                add_object(pending[0][0], "OK", [v for _, v in pending])
                pending.clear()

        for split, kind, i, img, mask, fg, clean in _class_images(name, ci, size, seed, n_train, n_test_good,
                                                                  n_test_bad, with_clean=True):
            # MVTec layout
            folder = os.path.join(mv_root, name, split, kind)
            os.makedirs(folder, exist_ok=True)
            stem = f"{i:03d}"
            Image.fromarray(img).save(os.path.join(folder, stem + ".png"))
            if mask is not None:
                gdir = os.path.join(mv_root, name, "ground_truth", kind)
                os.makedirs(gdir, exist_ok=True)
                Image.fromarray(mask).save(os.path.join(gdir, stem + "_mask.png"))
            # Real-IAD layout: objects of `views` views (sample folders S<nnnn>)
            if pending and (kind != "good" or pending[0][0] != split):
                flush()
            if kind == "good":
                pending.append((split, (img, None, fg)))
                if len(pending) == views:
                    flush()
            else:
                add_object(split, REALIAD_CODES[kind], [(img, mask, fg)] + [(clean, None, fg)] * (views - 1))
            # MANTA layout: five views per image
            if manta and kind == "good":
                manta_good[split].append(img)
            elif manta:
                zeros = np.zeros_like(mask)
                _manta_image(os.path.join(ma_root, "demo", name, "test", kind), f"{i:03d}", [img] + [clean] * 4)
                _manta_image(os.path.join(ma_root, "demo", name, "ground_truth", kind), f"{i:03d}_mask",
                             [mask] + [zeros] * 4)
        flush()
        for split, images in manta_good.items():
            for j in range(0, len(images), 5):
                group = (images[j:j + 5] * 5)[:5]  # the last group repeated to five views
                _manta_image(os.path.join(ma_root, "demo", name, split, "good"), f"{j // 5:03d}", group)
        with open(os.path.join(json_root, f"{name}.json"), "w") as f:
            json.dump(split_json, f, indent=1)
        if verbose:
            print(f"  {name}: {n_train} train, {n_test_good} test normal, {n_test_bad} test anomalous "
                  f"({', '.join(DEFECTS[name])})")
    return {"mvtec": mv_root, "realiad": ri_root, "foreground": fg_root, **({"manta": ma_root} if manta else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a small synthetic dataset in MVTec and Real-IAD layouts.")
    p.add_argument("--out", default="demo_data", help="output folder (default demo_data)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128, at least 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=40, help="normal training images per class")
    p.add_argument("--n_test_good", type=int, default=10, help="normal test images per class")
    p.add_argument("--n_test_bad", type=int, default=12, help="anomalous test images per class")
    p.add_argument("--views", type=int, default=1, help="views per object in the Real-IAD layout")
    p.add_argument("--manta", action="store_true", help="also write a MANTA-Tiny-layout copy")
    args = p.parse_args(argv)
    if args.size < 32 or min(args.n_train, args.n_test_good, args.n_test_bad, args.views) < 1:
        print("error: --size must be at least 32 and the image and view counts at least 1", file=sys.stderr)
        return 2
    try:
        paths = make_demo_data(args.out, args.size, args.seed, args.n_train, args.n_test_good, args.n_test_bad,
                               verbose=True, views=args.views, manta=args.manta)
    except OSError as e:
        print(f"error: cannot write {args.out} ({' '.join(str(e).split())}); choose another --out",
              file=sys.stderr)
        return 2
    classes = " ".join(CLASSES)
    print(f"MVTec layout:   {paths['mvtec']}  (--data_path {paths['mvtec']} --classes {classes})")
    print(f"Real-IAD layout: {paths['realiad']}  (--data_path {paths['realiad']} --classes {classes})")
    print(f"object masks:   {paths['foreground']}  (--foreground_path {paths['foreground']})")
    if "manta" in paths:
        print(f"MANTA layout:   {paths['manta']}  (--dataset manta --data_path {paths['manta']} --classes "
              f"{' '.join('demo/' + c for c in CLASSES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
