"""Run a saved model on your own images: one heatmap PNG per image and scores.csv, no dataset layout needed.

    python infer.py --checkpoint RUN/model.pth --images a.png some_folder/ [...]
    python infer.py --checkpoint RUN/model.pth --seg_checkpoint RUN/Seg_model_7999.pth --images ...   (CRR)

Without --seg_checkpoint the map is Dinomaly's (SPEC 5); with it, CRR's fused map
alpha * reconstruction + (1 - alpha) * segmentation (SPEC 7.5). Either is smoothed (5x5, sigma 4) and the
image score is the mean of the top --max_ratio of the 256 x 256 map. Scores are not thresholded: compare
them with the scores of known-good images.
"""
import csv
import os

import cv2
import torch

import dataset as ds
import models
from anomaly_map import MAP_SIZE as EVAL_SIZE, AnomalyMapper
from errors import UserError
from run import ArgumentParser, log, main as run_main, resolve_device, seed_everything
from visualize import heatmap_panel


def build_parser() -> ArgumentParser:
    p = ArgumentParser(__doc__)
    p.add_argument("--checkpoint", required=True, help="reconstruction model (model.pth, ours or official)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files or folders (searched recursively for " + "/".join(
                       e[1:] for e in ds.IMAGE_EXTENSIONS) + ")")
    p.add_argument("--seg_checkpoint", help="CRR segmentation network (Seg_model_*.pth): use CRR's fused map")
    p.add_argument("--fusion_alpha", type=float, default=0.7, help="fused map = a * recon + (1 - a) * seg")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/inference)")
    p.add_argument("--image_size", type=int, help="default: the run's (448 for an official checkpoint)")
    p.add_argument("--crop_size", type=int, help="default: the run's (392 for an official checkpoint)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max_ratio", type=float, default=0.01, help="image score = mean of this top share of the map")
    p.add_argument("--test_mask", choices=["on", "off"],
                   help="CRR bottleneck masking at test time (default: the run's; on = the released CRR code)")
    p.add_argument("--mask_ratio", type=float, help="bottleneck masking ratio (default: the run's)")
    return p


def check_args(args):
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    if not 0 <= args.max_ratio <= 1 or (args.max_ratio > 0 and int(EVAL_SIZE * EVAL_SIZE * args.max_ratio) < 1):
        raise UserError(f"--max_ratio {args.max_ratio} must be 0 (the maximum) or between "
                        f"{1 / EVAL_SIZE ** 2:.2g} and 1")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask_ratio {args.mask_ratio} must be in [0, 1)")


def find_images(paths: list[str], skip_dir: str | None = None) -> list[str]:
    """Image files given directly, plus the images under given folders (recursively, sorted); no duplicates.
    Files under `skip_dir` (the output folder) are left out so earlier heatmaps are not scored."""
    skip = os.path.realpath(skip_dir) + os.sep if skip_dir else None
    found, seen = [], set()

    def add(path):
        key = os.path.realpath(path)
        if key not in seen and not (skip and key.startswith(skip)):
            seen.add(key)
            found.append(path)

    for path in paths:
        if os.path.isfile(path):
            add(path)
        elif os.path.isdir(path):
            any_image = False
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and os.path.splitext(name)[1].lower() in ds.IMAGE_EXTENSIONS:
                        any_image = True
                        add(os.path.join(root, name))
            if not any_image:
                raise UserError(f"no images ({'/'.join(e[1:] for e in ds.IMAGE_EXTENSIONS)}) found in {path}; "
                                f"check --images")
        else:
            raise UserError(f"image file or folder not found: {path}; check --images")
    if not found:
        raise UserError(f"no images found in {' '.join(paths)}; check --images")
    return found


def output_names(paths: list[str]) -> list[str]:
    """One PNG name per image: its stem, or, where stems repeat, its path below the images' common folder
    ('_' for '/'); always unique (case-insensitively, for case-insensitive file systems)."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, common).replace(os.sep, "_") for a in absolute]
    rel_stems = [os.path.splitext(r)[0] for r in rel]
    lowered = [s.lower() for s in stems]
    names, used = [], set()
    for stem, r, rs in zip(stems, rel, rel_stems):
        if lowered.count(stem.lower()) == 1:
            name = stem
        elif [x.lower() for x in rel_stems].count(rs.lower()) == 1:
            name = rs
        else:  # same path apart from the extension
            name = r.replace(".", "_")
        base, k = name, 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def infer(args):
    check_args(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "inference")
    paths = find_images(args.images, skip_dir=out)
    device = resolve_device(args.device)
    model = models.load_trained(args.checkpoint, args, models.PAPER_SETTINGS[
        "crr" if args.seg_checkpoint else "dinomaly"]).to(device)
    if args.seg_checkpoint:
        segnet = models.load_segmentation_net(args.seg_checkpoint, model.encoder.cfg.embed_dim).to(device).eval()
        log.info(f"loaded {args.seg_checkpoint}; map: {args.fusion_alpha} * reconstruction + "
                 f"{1 - args.fusion_alpha:.4g} * segmentation")
    else:
        segnet = None
    mapper = AnomalyMapper(model, segnet, args.fusion_alpha, args.max_ratio)
    seed_everything(1)  # the --test_mask on masks are drawn from the CPU generator: reproducible
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out} ({e.strerror}); pass another --out") from None
    names = output_names(paths)
    no_gt = torch.zeros(EVAL_SIZE, EVAL_SIZE, dtype=torch.bool)
    rows = []
    with torch.no_grad():
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start:start + args.batch_size]
            img = torch.stack([ds.load_tensor(p, args.image_size, args.crop_size) for p in batch])
            amap, scores = mapper(img.to(device))  # [B, 1, 256, 256], [B]
            amap, scores = amap.cpu(), scores.cpu().tolist()
            for i, (path, score) in enumerate(zip(batch, scores)):
                png = os.path.join(out, names[start + i] + ".png")
                panel = heatmap_panel(img[i], no_gt, amap[i, 0], score)
                if not cv2.imwrite(png, panel[..., ::-1]):
                    raise UserError(f"cannot write {png}; check that --out is a writable folder")
                rows.append([path, repr(float(score))])
                log.info(f"{path}: {score:.6f}")
    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["image_path", "score"], *rows])
    log.info(f"{len(rows)} heatmaps and scores.csv written to {out}")


def main(argv=None):
    run_main(infer, build_parser(), argv)


if __name__ == "__main__":
    main()
