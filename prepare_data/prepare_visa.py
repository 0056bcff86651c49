"""Raw VisA + its split csv -> the "1cls" MVTec-like layout.

    python prepare_data/prepare_visa.py --data_path <raw VisA root> --save_path ../VisA_pytorch

Reads `<raw>/split_csv/1cls.csv` (header object,split,label,image,mask; labels normal/anomaly; paths relative
to <raw>) and writes `<save_path>/1cls/<class>/{train/good, test/good, test/bad, ground_truth/bad}`. Images
are copied unchanged; masks (region ids) are binarised with `!= 0` and saved as 0/255 PNG named after the
image's stem.
"""
import argparse
import csv
import os
import shutil
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dinomaly.errors import UserError  # noqa: E402

REQUIRED_COLUMNS = ("object", "split", "label", "image", "mask")


def _read_rows(raw: str) -> tuple[str, list[dict]]:
    if not os.path.isdir(raw):
        raise UserError(f"raw VisA folder not found: {raw}; check --data_path")
    csv_path = os.path.join(raw, "split_csv", "1cls.csv")
    if not os.path.isfile(csv_path):
        raise UserError(f"split file not found: {csv_path}; it ships inside the VisA archive "
                        f"(split_csv/1cls.csv), check --data_path")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(c or "").strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in fields]
            if missing:
                raise UserError(f"malformed split file {csv_path}: missing column(s) {', '.join(missing)}; "
                                f"expected the header {','.join(REQUIRED_COLUMNS)}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read split file {csv_path} ({' '.join(str(e).split())}); "
                        f"restore it from the VisA archive") from None
    if not rows:
        raise UserError(f"split file {csv_path} has no rows; restore it from the VisA archive")
    return csv_path, rows


def _destinations(rows: list[dict], raw: str, out_root: str, csv_path: str) -> list[tuple]:
    """Check every row and work out (kind, source image, destination image, source mask, destination mask)."""
    plan = []
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, start=2):  # line numbers of the csv (line 1 is the header)
        obj, split, label = r.get("object", ""), r.get("split", "").lower(), r.get("label", "").lower()
        where = f"{csv_path} line {i}"
        if not obj or split not in ("train", "test") or label not in ("normal", "anomaly") or not r.get("image"):
            raise UserError(f"malformed row in {where}: need object, split train/test, label normal/anomaly "
                            f"and image; restore the file from the VisA archive")
        if split == "train" and label != "normal":
            raise UserError(f"malformed row in {where}: an anomalous training image; the 1cls split trains "
                            f"on normal images only")
        src = os.path.join(raw, r["image"])
        if not os.path.isfile(src):
            raise UserError(f"image not found: {src} (named in {where}); check --data_path or re-extract VisA")
        name = os.path.basename(r["image"])
        cdir = os.path.join(out_root, obj)
        if split == "train":
            kind, dst, msrc, mdst = "train", os.path.join(cdir, "train", "good", name), None, None
        elif label == "normal":
            kind, dst, msrc, mdst = "test_good", os.path.join(cdir, "test", "good", name), None, None
        else:
            if not r.get("mask"):
                raise UserError(f"malformed row in {where}: an anomalous image without a mask path")
            msrc = os.path.join(raw, r["mask"])
            if not os.path.isfile(msrc):
                raise UserError(f"mask not found: {msrc} (named in {where}); check --data_path or re-extract VisA")
            stem = os.path.splitext(name)[0]
            kind, dst = "test_bad", os.path.join(cdir, "test", "bad", name)
            mdst = os.path.join(cdir, "ground_truth", "bad", stem + ".png")
        if dst in seen:
            raise UserError(f"two rows of {csv_path} (lines {seen[dst]} and {i}) both write {dst}; "
                            f"image names must be unique per class and split")
        seen[dst] = i
        plan.append((kind, src, dst, msrc, mdst))
    return plan


def _write_mask(src: str, dst: str) -> None:
    try:
        with Image.open(src) as m:
            m.load()
            arr = np.asarray(m)
            if m.mode in ("LA", "PA", "RGBA"):
                arr = arr[..., :-1]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read mask {src} ({' '.join(str(e).split())}); re-extract VisA") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    Image.fromarray(((arr != 0) * 255).astype(np.uint8)).save(dst)


def prepare_visa(raw: str, out: str, progress: bool = True) -> dict[str, int]:
    """Convert raw VisA at `raw` into `<out>/1cls/...`; returns the counts {'train', 'test_good', 'test_bad'}."""
    from tqdm import tqdm

    csv_path, rows = _read_rows(raw)
    out_root = os.path.join(out, "1cls")
    plan = _destinations(rows, raw, out_root, csv_path)
    counts = {"train": 0, "test_good": 0, "test_bad": 0}
    made: set[str] = set()
    for kind, src, dst, msrc, mdst in tqdm(plan, desc="VisA -> 1cls", unit="img", disable=not progress):
        for d in (os.path.dirname(dst), os.path.dirname(mdst) if mdst else None):
            if d and d not in made:
                os.makedirs(d, exist_ok=True)
                made.add(d)
        shutil.copyfile(src, dst)
        if msrc is not None:
            _write_mask(msrc, mdst)
        counts[kind] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert raw VisA into the 1cls MVTec-like layout.")
    p.add_argument("--data_path", required=True, help="raw VisA root (holds split_csv/1cls.csv and the classes)")
    p.add_argument("--save_path", default="../VisA_pytorch", help="output root; writes <save_path>/1cls/<class>/")
    args = p.parse_args(argv)
    try:
        counts = prepare_visa(args.data_path, args.save_path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.save_path, '1cls')}: {counts['train']} train, {counts['test_good']} test "
          f"normal, {counts['test_bad']} test anomalous images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
