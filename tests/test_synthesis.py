"""Tests for the CRR anomaly synthesis (SPEC 7.1): synthesis.py and prepare_data/show_synthesis.py."""
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import synthesis as S  # noqa: E402
from dataset import Sample  # noqa: E402
from errors import UserError  # noqa: E402


def rng(seed=0):
    return np.random.default_rng(seed)


def colourful(h=64, w=64, seed=0):
    """Smooth, saturated test image (uint8 RGB)."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), 255 - xx * 255 // max(w - 1, 1)], -1)
    return img.astype(np.uint8)


def random_image(h=64, w=64, seed=0):
    return rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def n_components(mask):
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


# ---------------------------------------------------------------------------------------------- Perlin

def test_perlin_noise_bounded_and_zero_on_lattice():
    for res in [(1, 1), (2, 8), (4, 4), (32, 16)]:
        n = S.perlin_noise_2d((128, 64), res, rng(1))
        assert n.shape == (128, 64) and n.dtype == np.float32
        assert np.isfinite(n).all() and n.min() >= -1.0 and n.max() <= 1.0
        assert n.std() > 0.05  # not degenerate
        lattice = n[:: 128 // res[0], :: 64 // res[1]]
        assert np.abs(lattice).max() < 1e-6
        # off-lattice points are generally not zero
        assert np.abs(n[128 // res[0] // 2 :: 128 // res[0], :: 64 // res[1]]).max() > 1e-3 or res[0] == 1


def test_perlin_noise_non_divisible_shape_and_determinism():
    n = S.perlin_noise_2d((100, 37), (8, 32), rng(3))
    assert n.shape == (100, 37) and np.isfinite(n).all() and np.abs(n).max() <= 1.0
    assert np.array_equal(S.perlin_noise_2d((50, 50), (4, 2), rng(5)), S.perlin_noise_2d((50, 50), (4, 2), rng(5)))
    assert not np.array_equal(S.perlin_noise_2d((50, 50), (4, 2), rng(5)), S.perlin_noise_2d((50, 50), (4, 2), rng(6)))


def test_perlin_mask_binary_nonempty_inside_foreground():
    fg = np.zeros((128, 128), np.float32)
    cv2.circle(fg, (64, 64), 40, 1.0, -1)
    for seed in range(15):
        m = S.perlin_mask(128, rng(seed), foreground=fg)
        assert m.shape == (128, 128) and m.dtype == np.float32
        assert set(np.unique(m).tolist()) <= {0.0, 1.0}
        assert m.sum() > 0
        assert m[fg == 0].sum() == 0
    # no foreground: still binary and non-empty
    for seed in range(5):
        m = S.perlin_mask(64, rng(seed))
        assert set(np.unique(m).tolist()) == {0.0, 1.0}


def test_perlin_mask_all_zero_foreground_falls_back_to_whole_image():
    m = S.perlin_mask(64, rng(0), foreground=np.zeros((64, 64)))
    assert m.sum() > 0


def test_perlin_mask_scale_follows_resolution():
    coarse = [n_components(S.perlin_mask(224, rng(s), res=(1, 1))) for s in range(6)]
    fine = [n_components(S.perlin_mask(224, rng(s), res=(32, 32))) for s in range(6)]
    assert np.mean(fine) > 10 * max(np.mean(coarse), 1)
    # random resolutions: both fine and coarse masks occur across draws
    counts = [n_components(S.perlin_mask(224, rng(s))) for s in range(40)]
    assert min(counts) <= 3 and max(counts) >= 20


def test_perlin_mask_threshold_half():
    # sqrt(2)-scaled Perlin noise exceeds 0.5 on about 5.5% of the area (0.4 would give ~10%, 0.6 ~2%)
    cover = np.mean([S.perlin_mask(128, rng(s), res=(8, 8), angle=0.0).mean() for s in range(30)])
    assert 0.035 < cover < 0.08


def test_perlin_mask_rotation_changes_mask_and_zeroes_corners():
    a = S.perlin_mask(128, rng(2), res=(8, 8), angle=0.0)
    b = S.perlin_mask(128, rng(2), res=(8, 8), angle=45.0)
    assert not np.array_equal(a, b)
    assert b[:8, :8].sum() == 0 and b[-8:, -8:].sum() == 0  # rotated outside the image -> 0


# ---------------------------------------------------------------------------------------------- blend

def test_blend_formula_on_constant_images():
    img = np.full((8, 8, 3), 0.2, np.float32)
    src = np.full((8, 8, 3), 0.9, np.float32)
    mask = np.zeros((8, 8, 1), np.float32)
    mask[:4] = 1.0
    out = S.blend(img, src, mask, 0.3)
    assert out.shape == (8, 8, 3)
    assert np.allclose(out[:4], 0.7 * 0.9 + 0.3 * 0.2)
    assert np.allclose(out[4:], 0.2)
    # a 2-D mask is accepted as well
    assert np.allclose(S.blend(img, src, mask[..., 0], 0.3), out)
    # beta = 0 pastes the source, beta = 1 keeps the image
    assert np.allclose(S.blend(img, src, mask, 0.0)[:4], 0.9)
    assert np.allclose(S.blend(img, src, mask, 1.0), img)


# ---------------------------------------------------------------------------------------------- grid shuffle

def _parse_strips(seq, n_strips=8):
    """Parse a 1-D sequence of original indices into the order of the original strips it is made of."""
    bounds = np.array_split(np.arange(len(seq)), n_strips)
    starts = {int(b[0]): k for k, b in enumerate(bounds)}
    order, p = [], 0
    while p < len(seq):
        k = starts[int(seq[p])]  # KeyError -> output position is not the start of an input strip
        assert np.array_equal(seq[p : p + len(bounds[k])], bounds[k])
        order.append(k)
        p += len(bounds[k])
    return order


@pytest.mark.parametrize("h,w", [(64, 64), (70, 53)])
def test_grid_shuffle_permutes_strips_evens_then_odds(h, w):
    ids = np.zeros((h, w, 3), np.int32)
    ids[..., 0] = np.arange(h)[:, None]
    ids[..., 1] = np.arange(w)[None, :]
    orders = set()
    for seed in range(6):
        out = S.grid_shuffle(ids, rng(seed))
        assert out.shape == ids.shape
        # each output row comes from a single input row, each output column from a single input column
        assert (out[..., 0] == out[:, :1, 0]).all() and (out[..., 1] == out[:1, :, 1]).all()
        for seq in (out[0, :, 1], out[:, 0, 0]):
            order = _parse_strips(seq)
            assert sorted(order) == list(range(8))
            assert set(order[:4]) == {0, 2, 4, 6} and set(order[4:]) == {1, 3, 5, 7}
            orders.add(tuple(order))
    assert len(orders) > 2  # actually random
    img = random_image(70, 53)
    out = S.grid_shuffle(img, rng(1))
    assert np.array_equal(np.sort(out.reshape(-1, 3), axis=0), np.sort(img.reshape(-1, 3), axis=0))
    assert np.array_equal(np.sort(out, axis=None), np.sort(img, axis=None))
    assert not np.array_equal(out, img)


# ---------------------------------------------------------------------------------------------- augmenters

def test_every_augmenter_keeps_shape_and_dtype():
    img = colourful(48, 40)
    assert len(S.AUGMENTERS) == 10
    for name, fn in S.AUGMENTERS.items():
        for seed in range(3):
            out = fn(img, rng(seed))
            assert out.shape == img.shape and out.dtype == np.uint8, name


def test_invert():
    img = random_image()
    assert np.array_equal(S.invert(img, rng()), 255 - img)


def test_solarize():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = S.solarize(img, rng(), threshold=100, p=1.0)
    v = img.astype(int)
    assert np.array_equal(out, np.where(v >= 100, 255 - v, v))
    assert np.array_equal(S.solarize(img, rng(), threshold=100, p=0.0), img)
    applied = [not np.array_equal(S.solarize(img, rng(s)), img) for s in range(200)]
    assert 0.35 < np.mean(applied) < 0.65  # p = 0.5
    # default threshold lies in [32, 128]: values below 32 are never changed, values >= 128 are when applied
    for s in range(30):
        out = S.solarize(img, rng(s)).astype(int)
        assert np.array_equal(out[v < 32], v[v < 32])
        assert np.array_equal(out[v >= 128], v[v >= 128]) or np.array_equal(out[v >= 128], 255 - v[v >= 128])


def test_posterize():
    img = random_image()
    out = S.posterize(img, rng(), bits=2)
    assert len(np.unique(out)) <= 4 and np.array_equal(out, img & 0xC0)
    assert np.array_equal(S.posterize(img, rng(), bits=8), img)
    assert len(np.unique(S.posterize(img, rng(), bits=1))) == 2


def test_gamma_contrast():
    img = random_image()
    assert np.array_equal(S.gamma_contrast(img, rng(), gamma=1.0), img)
    grey = np.full((4, 4, 3), 128, np.uint8)
    assert (S.gamma_contrast(grey, rng(), gamma=2.0) == round(255 * (128 / 255) ** 2)).all()
    out = S.gamma_contrast(grey, rng(0))  # per-channel gammas in [0.5, 2]
    lo, hi = round(255 * (128 / 255) ** 2), round(255 * (128 / 255) ** 0.5)
    assert (out >= lo).all() and (out <= hi).all()
    assert len(set(out[0, 0].tolist())) > 1


def test_brightness_multiply_and_add():
    grey = np.full((8, 8, 3), 100, np.uint8)
    assert np.abs(S.brightness(grey, rng(), mul=1.1, add=10).astype(int) - 120).max() <= 1
    assert np.abs(S.brightness(grey, rng(), mul=0.8, add=-30).astype(int) - 50).max() <= 1
    assert (S.brightness(np.full((4, 4, 3), 250, np.uint8), rng(), mul=1.2, add=30) == 255).all()
    outs = [int(S.brightness(grey, rng(s))[0, 0, 0]) for s in range(50)]
    assert min(outs) >= 100 * 0.8 - 30 - 1 and max(outs) <= 100 * 1.2 + 30 + 1 and len(set(outs)) > 10


def test_sharpness():
    img = np.zeros((32, 32, 3), np.uint8)
    img[::2, ::2] = 255  # high-frequency pattern
    assert np.array_equal(S.sharpness(img, rng(), factor=1.0), img)
    blurred = S.sharpness(img, rng(), factor=0.0)
    assert blurred[4:-4, 4:-4].astype(float).std() < img[4:-4, 4:-4].astype(float).std()


def test_hue_saturation():
    img = colourful()
    hsv_in = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL).astype(int)
    out = S.hue_saturation(img, rng(), hue=40, sat=0)
    hsv_out = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL).astype(int)
    sat = hsv_in[..., 1] > 100
    dh = (hsv_out[..., 0] - hsv_in[..., 0]) % 256
    assert np.median(dh[sat]) in range(38, 43)
    assert np.abs(out.max(axis=2).astype(int) - img.max(axis=2)).max() <= 1  # V unchanged
    grey = S.hue_saturation(img, rng(), hue=0, sat=-255)
    assert (grey.max(axis=2).astype(int) - grey.min(axis=2) <= 1).all()


def test_autocontrast_and_equalize_stretch_low_contrast():
    low = (100 + rng(0).integers(0, 21, (32, 32, 3))).astype(np.uint8)
    a = S.autocontrast(low, rng(), cutoff=0)
    assert a.min() == 0 and a.max() == 255
    for s in range(5):
        a = S.autocontrast(low, rng(s))
        assert a.min() == 0 and a.max() == 255
    e = S.equalize(low, rng())
    assert e.max() == 255 and e.min() <= 16 and len(np.unique(e)) >= len(np.unique(low)) - 3


def test_rotate():
    img = random_image(40, 52)
    assert np.array_equal(S.rotate(img, rng(), angle=0.0), img)
    assert np.array_equal(S.rotate(img, rng(), angle=180.0), img[::-1, ::-1])
    r = S.rotate(np.full((40, 40, 3), 200, np.uint8), rng(), angle=45.0)
    assert (r[0, 0] == 0).all() and (r[20, 20] == 200).all()


def test_random_augment_uses_distinct_augmenters(monkeypatch):
    img = colourful()
    seen = set()
    for s in range(30):
        out, names = S.random_augment(img, rng(s), return_names=True)
        assert len(names) == 3 and len(set(names)) == 3 and set(names) <= set(S.AUGMENTERS)
        assert out.shape == img.shape and out.dtype == np.uint8
        seen |= set(names)
    assert seen == set(S.AUGMENTERS)

    calls = []

    def make(name):
        def fn(x, r):
            calls.append(name)
            return (x + 1).astype(np.uint8)
        return fn

    monkeypatch.setattr(S, "AUGMENTERS", {f"a{k}": make(f"a{k}") for k in range(10)})
    zero = np.zeros((4, 4, 3), np.uint8)
    for s in range(10):
        calls.clear()
        out = S.random_augment(zero, rng(s))
        assert len(calls) == 3 and len(set(calls)) == 3
        assert (out == 3).all()


# ---------------------------------------------------------------------------------------------- synthesizer

@pytest.fixture
def texture_dir(tmp_path):
    d = tmp_path / "dtd" / "images" / "banded"
    d.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(random_image(40, 40, seed=10 + k)).save(d / f"banded_{k}.jpg")
    (tmp_path / "dtd" / "labels").mkdir()
    (tmp_path / "dtd" / "labels" / "notes.txt").write_text("x")
    return str(tmp_path / "dtd")


def test_list_textures_layouts(tmp_path, texture_dir):
    paths = S.list_textures(texture_dir)
    assert len(paths) == 3 and all(p.endswith(".jpg") and "images" in p for p in paths)
    flat = tmp_path / "flat"
    (flat / "sub").mkdir(parents=True)
    Image.fromarray(random_image(8, 8)).save(flat / "a.png")
    Image.fromarray(random_image(8, 8)).save(flat / "sub" / "b.jpg")
    assert [os.path.basename(p) for p in S.list_textures(str(flat))] == ["a.png", "b.jpg"]
    with pytest.raises(UserError):
        S.list_textures(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        S.list_textures(str(tmp_path / "empty"))


def test_synthesizer_changes_only_masked_pixels():
    synth = S.AnomalySynthesizer(None, size=64)
    img = colourful()
    changed = []
    for s in range(10):
        aug, mask = synth(img, rng(s))
        assert aug.shape == img.shape and aug.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0.0, 1.0}
        assert np.array_equal(aug[mask == 0], img[mask == 0])
        changed.append(np.abs(aug.astype(int) - img)[mask == 1].mean())
    assert np.mean(changed) > 5
    fg = np.zeros((64, 64), np.float32)
    fg[:, :32] = 1
    for s in range(5):
        aug, mask = synth(img, rng(s), foreground=fg)
        assert mask[:, 32:].sum() == 0 and mask.sum() > 0
        assert np.array_equal(aug[:, 32:], img[:, 32:])


def test_synthesizer_sources(monkeypatch, texture_dir):
    textures = S.list_textures(texture_dir)
    loaded, shuffled = [], []
    real_load, real_shuffle = S.load_image, S.grid_shuffle

    def load(p):
        loaded.append(p)
        return real_load(p)

    def shuffle(x, r, strips=8):
        shuffled.append(1)
        return real_shuffle(x, r, strips)

    monkeypatch.setattr(S, "load_image", load)
    monkeypatch.setattr(S, "grid_shuffle", shuffle)
    img = colourful()
    synth = S.AnomalySynthesizer(textures, size=64)
    n = 40
    for s in range(n):
        synth(img, rng(s))
    assert 8 < len(loaded) < 32  # p = 0.5
    assert set(loaded) <= set(textures)
    assert len(loaded) + len(shuffled) == n  # the self source is grid-shuffled, textures are not
    loaded.clear(), shuffled.clear()
    for s in range(10):
        S.AnomalySynthesizer([], size=64)(img, rng(s))
    assert loaded == [] and len(shuffled) == 10


def test_synthesizer_reproducible():
    synth = S.AnomalySynthesizer(None, size=64)
    a1, m1 = synth(colourful(), rng(4))
    a2, m2 = synth(colourful(), rng(4))
    a3, m3 = synth(colourful(), rng(5))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert not np.array_equal(m1, m3)


# ---------------------------------------------------------------------------------------------- dataset

def _samples(tmp_path, n=3, size=80, fg=False):
    out = []
    for k in range(n):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(colourful(size, size)[:, ::(1 if k % 2 else -1)].copy()).save(p)
        fpath = None
        if fg:
            f = np.zeros((size, size), np.uint8)
            f[:, : size // 2] = 255
            fpath = str(tmp_path / f"fg{k}.png")
            Image.fromarray(f).save(fpath)
        out.append(Sample(str(p), 0, None, "toy", fpath))
    return out


def test_dataset_shapes_and_mask(tmp_path):
    ds = S.SyntheticAnomalyDataset(_samples(tmp_path), image_size=64, crop_size=56)
    assert len(ds) == 3
    for i in range(len(ds)):
        img, aug, mask = ds[i]
        assert img.shape == (3, 56, 56) and aug.shape == (3, 56, 56) and mask.shape == (1, 56, 56)
        assert img.dtype == aug.dtype == mask.dtype == torch.float32
        assert mask.min() >= 0 and mask.max() <= 1
        outside = (mask[0] == 0)
        assert torch.allclose(img[:, outside], aug[:, outside], atol=1e-6)
        if mask.sum() > 0:
            assert (img - aug).abs()[:, mask[0] > 0].mean() > 0.01


def test_dataset_default_size(tmp_path):
    img, aug, mask = S.SyntheticAnomalyDataset(_samples(tmp_path, n=1, size=500))[0]
    assert img.shape == (3, 392, 392) and aug.shape == (3, 392, 392) and mask.shape == (1, 392, 392)


def test_dataset_reproducible_per_seed_epoch_index(tmp_path):
    samples = _samples(tmp_path)
    ds = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=1)
    first = ds[1]
    again = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=1)
    _ = again[0], again[2]  # order of access must not matter
    for a, b in zip(first, again[1]):
        assert torch.equal(a, b)
    ds.set_epoch(1)
    e1 = ds[1]
    assert not torch.equal(first[2], e1[2])
    assert torch.equal(first[0], e1[0])  # the clean image does not change
    ds.set_epoch(0)
    assert torch.equal(ds[1][2], first[2])
    other_seed = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=2)[1]
    assert not torch.equal(first[2], other_seed[2])


def test_dataset_same_in_worker_processes(tmp_path):
    ds = S.SyntheticAnomalyDataset(_samples(tmp_path, n=4), image_size=64, crop_size=56, seed=3)
    ds.set_epoch(2)
    direct = [ds[i][1] for i in range(4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    for i, (_, aug, _) in enumerate(loader):
        assert torch.equal(aug[0], direct[i])


def test_dataset_foreground(tmp_path):
    ds = S.SyntheticAnomalyDataset(_samples(tmp_path, fg=True), image_size=64, crop_size=56)
    for i in range(3):
        _, _, mask = ds[i]
        # foreground = left half of 64 -> columns < 32, i.e. < 28 after the 4-pixel crop
        assert mask[0, :, 28:].sum() == 0 and mask.sum() > 0


def test_dataset_uses_textures(tmp_path, texture_dir, monkeypatch):
    loaded = []
    real_load = S.load_image
    monkeypatch.setattr(S, "load_image", lambda p: (loaded.append(p), real_load(p))[1])
    textures = S.list_textures(texture_dir)
    ds = S.SyntheticAnomalyDataset(_samples(tmp_path, n=1), image_size=64, crop_size=56, texture_paths=textures)
    for e in range(12):
        ds.set_epoch(e)
        ds[0]
    assert any(p in textures for p in loaded)


# ---------------------------------------------------------------------------------------------- show_synthesis

def test_show_synthesis_writes_grid(tmp_path, texture_dir):
    data = tmp_path / "mvtec" / "bottle" / "train" / "good"
    data.mkdir(parents=True)
    for k in range(2):
        Image.fromarray(colourful(50, 60)).save(data / f"{k:03d}.png")
    gt = tmp_path / "mvtec" / "bottle" / "ground_truth" / "broken"
    gt.mkdir(parents=True)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(gt / "000_mask.png")
    out = tmp_path / "grid.png"
    script = os.path.join(ROOT, "prepare_data", "show_synthesis.py")
    spec = importlib.util.spec_from_file_location("show_synthesis", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--data_path", str(tmp_path / "mvtec"), "--anomaly_source_path", texture_dir,
                   "--n", "3", "--size", "32", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as g:
        assert g.size == (3 * 32, 3 * 32) and g.mode == "RGB"
        grid = np.asarray(g)
    masks = grid[:, 64:]
    assert set(np.unique(masks).tolist()) <= {0, 255} and masks.max() == 255
    # only train/good images are used from an MVTec layout (the ground-truth mask is not)
    assert len(mod.find_images(str(tmp_path / "mvtec"))) == 2

    # run as a script from the repository root; errors are one line on stderr and exit status 2
    r = subprocess.run([sys.executable, script, "--data_path", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
