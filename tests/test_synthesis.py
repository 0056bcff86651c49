"""Tests for the CRR anomaly synthesis (synthesis.py) and prepare_data/show_synthesis.py.

Expected values come from the released CRR code's recipe and from imgaug 0.4.0's documented uint8
behaviour, computed here independently (by hand, with OpenCV / Pillow / scikit-image / torchvision).
"""
import importlib.util
import logging
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dinomaly import dataset as ds  # noqa: E402
from dinomaly import synthesis as S  # noqa: E402
from dinomaly.dataset import Sample  # noqa: E402
from dinomaly.errors import UserError  # noqa: E402

CHI2_7DOF_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def rng(seed=0):
    return np.random.default_rng(seed)


def colourful(h=64, w=64):
    """Smooth, saturated test image (uint8 RGB)."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), 255 - xx * 255 // max(w - 1, 1)], -1)
    return img.astype(np.uint8)


def random_image(h=64, w=64, seed=0):
    return rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ramp_image():
    """Every uint8 value once per channel (16 x 16 x 3)."""
    return np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)


def normalise(arr_uint8_hwc):
    return (torch.from_numpy(arr_uint8_hwc.astype(np.float32) / 255.0).permute(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD


def identity_augmenters(monkeypatch):
    monkeypatch.setattr(S, "AUGMENTERS", {f"id{k}": (lambda x, r: x) for k in range(10)})


# ---------------------------------------------------------------------------------------------- Perlin

def reference_perlin(shape, res, angles):
    """The released code's rand_perlin_2d_np (lattice tiling with np.repeat), given the gradient angles."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0)[: shape[0], : shape[1]] % 1
    grads = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(a, b):
        return np.repeat(np.repeat(grads[a[0]:a[1], b[0]:b[1]], d[0], axis=0), d[1], axis=1)

    def dot(g, shift):
        return ((grid + np.array(shift)) * g).sum(axis=-1)

    n00 = dot(tile([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile([0, -1], [1, None]), [0, -1])
    n11 = dot(tile([1, None], [1, None]), [-1, -1])
    t = 6 * grid ** 5 - 15 * grid ** 4 + 10 * grid ** 3
    lerp = lambda x, y, w: x + w * (y - x)  # noqa: E731
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4), (16, 16)])
def test_perlin_noise_matches_released_formula(res):
    angles = rng(7).uniform(0.0, 2.0 * math.pi, size=(res[0] + 1, res[1] + 1))
    ours = S.perlin_noise_2d((64, 64), res, rng(7))
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, reference_perlin((64, 64), res, angles), atol=1e-9)


def test_perlin_resolution_is_drawn_once_per_image(monkeypatch):
    """A foreground of one pixel forces retries: they redraw noise and angle, never the lattice resolution."""
    seen = []
    real = S.perlin_noise_2d

    def recording(shape, res, r):
        seen.append(tuple(res))
        return real(shape, res, r)

    monkeypatch.setattr(S, "perlin_noise_2d", recording)
    fg = np.zeros((64, 64), np.float32)
    fg[40, 21] = 1.0
    tries = []
    for seed in range(8):
        seen.clear()
        syn = S.AnomalySynthesizer(None, size=64)(colourful(), rng(seed), fg)
        assert set(seen) == {syn.perlin_res}
        tries.append(len(seen))
    assert sum(t > 1 for t in tries) >= 4 and max(tries) == S.PERLIN_TRIES


def test_perlin_resolution_distribution():
    draws = np.array([S.perlin_resolution(rng(s)) for s in range(1200)])
    for axis in (0, 1):
        values, counts = np.unique(draws[:, axis], return_counts=True)
        assert values.tolist() == [1, 2, 4, 8, 16, 32]
        assert ((counts - 200) ** 2 / 200).sum() < 20.5  # chi-square, 5 dof, p = 0.001
    assert (draws[:, 0] != draws[:, 1]).mean() > 0.7  # the two axes are drawn independently


def test_perlin_mask_keeps_soft_foreground_and_threshold():
    fg = np.zeros((128, 128), np.float32)
    fg[:, :64] = 0.3
    m = S.perlin_mask(128, (8, 8), rng(3), fg)
    assert m.dtype == np.float32 and m.any()
    assert set(np.unique(m).tolist()) == {0.0, np.float32(0.3)} and not m[:, 64:].any()
    # sqrt(2)-scaled Perlin noise > 0.5 covers about 5.5% of the image (0.4 would give ~10%, 0.6 ~2%)
    cover = np.mean([S.perlin_mask(128, (8, 8), rng(s)).mean() for s in range(30)])
    assert 0.035 < cover < 0.08
    assert not S.perlin_mask(64, (4, 4), rng(0), np.zeros((64, 64), np.float32)).any()


def test_rotate_matches_imgaug_matrix_and_direction():
    skt = pytest.importorskip("skimage.transform")
    h, w = 40, 52
    dot = np.zeros((h, w, 3), np.uint8)
    dot[19, 40] = 255  # right of the centre (x 25.5, y 19.5): dx = 14.5, dy = -0.5
    y, x = np.unravel_index(np.argmax(S.rotate(dot, rng(), angle=90.0)[..., 0]), (h, w))
    assert (y, x) == (34, 26)  # +90 degrees turns clockwise on screen (y down): to dx = 0.5, dy = 14.5

    # imgaug's Affine matrix (skimage transforms: to top-left, rotate, back), applied with skimage's warp
    img = cv2.GaussianBlur(random_image(h, w, 3), (0, 0), 3)
    cx, cy = w / 2.0 - 0.5, h / 2.0 - 0.5
    for angle in (-37.0, 21.5):
        matrix = (skt.SimilarityTransform(translation=[-cx, -cy])
                  + skt.AffineTransform(rotation=np.deg2rad(angle))
                  + skt.SimilarityTransform(translation=[cx, cy]))
        want = skt.warp(img.astype(np.float64), matrix.inverse, order=1, mode="constant", cval=0,
                        preserve_range=True)
        got = S.rotate(img, rng(), angle=angle).astype(np.float64)
        inner = np.s_[8:-8, 8:-8]
        assert np.abs(got[inner] - want[inner]).max() < 2.0


# ---------------------------------------------------------------------------------------------- augmenters

def test_every_augmenter_keeps_shape_and_dtype():
    img = colourful(48, 40)
    assert list(S.AUGMENTERS) == ["gamma_contrast", "brightness", "sharpness", "hue_saturation", "solarize",
                                  "posterize", "invert", "autocontrast", "equalize", "rotate"]
    for name, fn in S.AUGMENTERS.items():
        for seed in range(3):
            out = fn(img, rng(seed))
            assert out.shape == img.shape and out.dtype == np.uint8, name


def test_gamma_contrast_float32_table_truncated():
    img = ramp_image()
    out = S.gamma_contrast(img, rng(), gamma=(0.6, 1.0, 2.0))
    for c, g in enumerate((0.6, 1.0, 2.0)):
        levels = np.linspace(0, 1, 256, dtype=np.float32)
        want = np.floor(np.clip(levels ** np.float32(g) * np.float32(255), 0, 255))
        assert np.array_equal(out[..., c].ravel(), want)
    assert out[..., 2].ravel()[140] == 76  # 255 (140/255)^2 = 76.86: truncated, not rounded
    for s in range(20):
        drawn = S.gamma_contrast(img, rng(s))
        assert len({drawn[..., c].tobytes() for c in range(3)}) == 3  # a gamma per channel
        assert 64 <= drawn[8, 0].min() and drawn[8, 0].max() <= 180  # value 128, gamma in [0.5, 2]


@pytest.mark.parametrize("space,code,back,channel", [
    ("YCrCb", cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0), ("HSV", cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2),
    ("HLS", cv2.COLOR_RGB2HLS, cv2.COLOR_HLS2RGB, 1), ("Lab", cv2.COLOR_RGB2Lab, cv2.COLOR_Lab2RGB, 0),
    ("Luv", cv2.COLOR_RGB2Luv, cv2.COLOR_Luv2RGB, 0), ("YUV", cv2.COLOR_RGB2YUV, cv2.COLOR_YUV2RGB, 0)])
def test_brightness_in_a_fixed_colour_space(space, code, back, channel):
    img = colourful(32, 48)
    conv = cv2.cvtColor(img, code).astype(np.float32)
    v = conv[..., channel]
    mul, add = 1.13, 6.5  # add is rounded half to even, as np.round: 6
    # the product in float32, as imgaug's table: 100 * 1.13 gives 113 (float64: 112.9999995, floored to 112)
    multiplied = np.floor(np.minimum(v * np.float32(mul), 255))
    for multiply_first, new in [(True, np.clip(multiplied + 6, 0, 255)),
                                (False, np.floor(np.minimum(np.clip(v + 6, 0, 255) * np.float32(mul), 255)))]:
        conv_new = conv.copy()
        conv_new[..., channel] = new
        want = cv2.cvtColor(conv_new.astype(np.uint8), back)
        got = S.brightness(img, rng(), space=space, multiply_first=multiply_first, mul=mul, add=add)
        assert np.array_equal(got, want), (space, multiply_first)


def test_brightness_draws_colour_space_and_order(monkeypatch):
    codes = []
    real = cv2.cvtColor
    monkeypatch.setattr(S.cv2, "cvtColor", lambda a, c: (codes.append(c), real(a, c))[1])
    grey = np.full((4, 4, 3), 100, np.uint8)
    n = 300
    for s in range(n):
        S.brightness(grey, rng(s))
    counts = np.array([codes[::2].count(spec[0]) for spec in S.BRIGHTNESS_SPACES.values()])
    assert counts.sum() == n and ((counts - n / 6) ** 2 / (n / 6)).sum() < 20.5  # uniform over 6, p = 0.001
    monkeypatch.undo()
    # YCrCb luma of grey 100: 100 * 1.2 + 30 = 150 (multiply first) or (100 + 30) * 1.2 = 156 (add first)
    outs = [int(S.brightness(grey, rng(s), space="YCrCb", mul=1.2, add=30)[0, 0, 0]) for s in range(100)]
    assert set(outs) == {150, 156} and 30 < outs.count(150) < 70


@pytest.mark.parametrize("hue,sat", [(50, -20), (-50, 35), (3, 0)])
def test_hue_saturation_in_opencv_hsv(hue, sat):
    img = colourful()
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int64)
    shift = math.trunc(hue / 255 * 180)  # 50 -> 35, -50 -> -35, 3 -> 2 (hue is 0..179 in OpenCV)
    hsv[..., 0] = (hsv[..., 0] + shift) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + sat, 0, 255)
    want = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    assert np.array_equal(S.hue_saturation(img, rng(), hue=hue, sat=sat), want)


def test_solarize_continuous_threshold():
    img = ramp_image()
    v = img.astype(int)
    out = S.solarize(img, rng(), threshold=100.7, apply=True)
    assert np.array_equal(out, np.where(v >= 100, 255 - v, v))  # imgaug's uint8 table cuts at int(threshold)
    assert np.array_equal(S.solarize(img, rng(), threshold=100.7, apply=False), img)
    applied, cuts = 0, set()
    for s in range(3000):
        out = S.solarize(img, rng(s))[..., 0].ravel().astype(int)
        changed = np.nonzero(out != np.arange(256))[0]
        if changed.size == 0:
            continue
        applied += 1
        cuts.add(int(changed[0]))
        assert np.array_equal(changed, np.arange(changed[0], 256))  # every value from the cut up is inverted
    assert 1350 < applied < 1650  # p = 0.5
    assert cuts == set(range(32, 128))  # threshold ~ U(32, 128): a cut at 128 has probability 0


def test_equalize_imgaug_formula_not_pil():
    img = (40 + (random_image(64, 64, 5) // 4)).astype(np.uint8)  # values 40..103: bin 255 empty
    out = S.equalize(img, rng())
    for c in range(3):
        ch = img[..., c].ravel()
        counts = [int((ch == level).sum()) for level in range(256)]
        step = (len(ch) - counts[255]) // 255
        table, below = [], 0
        for level in range(256):
            table.append(min(255, (step // 2 + below) // step))
            below += counts[level]
        assert np.array_equal(out[..., c], np.array(table, np.uint8)[img[..., c]])
    assert not np.array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(img))))  # PIL's step differs


def test_posterize_invert_sharpness_autocontrast():
    img = random_image()
    assert np.array_equal(S.posterize(img, rng(), bits=2), img & 0xC0)
    assert np.array_equal(S.posterize(img, rng(), bits=8), img)
    assert {len(np.unique(S.posterize(img, rng(s)))) for s in range(40)} >= {2, 256}  # bits 1..8
    assert np.array_equal(S.invert(img, rng()), 255 - img)
    checker = np.zeros((32, 32, 3), np.uint8)
    checker[::2, ::2] = 255
    assert np.array_equal(S.sharpness(checker, rng(), factor=1.0), checker)
    assert S.sharpness(checker, rng(), factor=0.0)[4:-4, 4:-4].std() < checker[4:-4, 4:-4].std()
    low = (100 + rng(0).integers(0, 21, (32, 32, 3))).astype(np.uint8)
    for cutoff in (0, 7):
        assert np.array_equal(S.autocontrast(low, rng(), cutoff=cutoff),
                              np.asarray(ImageOps.autocontrast(Image.fromarray(low), cutoff=cutoff)))


def test_random_augment_three_distinct_in_drawn_order(monkeypatch):
    seen = set()
    for s in range(30):
        out, names = S.random_augment(colourful(), rng(s))
        assert len(set(names)) == 3 and set(names) <= set(S.AUGMENTERS)
        seen |= set(names)
    assert seen == set(S.AUGMENTERS)
    calls = []
    monkeypatch.setattr(S, "AUGMENTERS", {f"a{k}": (lambda k: lambda x, r: (calls.append(f"a{k}"), x + 1)[1])(k)
                                          for k in range(10)})
    out, names = S.random_augment(np.zeros((4, 4, 3), np.uint8), rng(3))
    assert list(names) == calls and (out == 3).all()


# ---------------------------------------------------------------------------------------------- grid shuffle

def reference_bounds(n):
    """Strip start indices of the released code: np.split at range(int(n / 8), n, int(n / 8))."""
    step = int(n / 8)
    starts = [0] + list(range(step, n, step))
    return [np.arange(a, b) for a, b in zip(starts, starts[1:] + [n])]


def parse_strips(seq, bounds):
    """The order of the original strips that the 1-D index sequence `seq` is made of."""
    starts = {int(b[0]): k for k, b in enumerate(bounds)}
    order, p = [], 0
    while p < len(seq):
        k = starts[int(seq[p])]  # KeyError: a position that is not the start of an input strip
        assert np.array_equal(seq[p: p + len(bounds[k])], bounds[k])
        order.append(k)
        p += len(bounds[k])
    return order


def index_image(h, w):
    ids = np.zeros((h, w, 3), np.int32)
    ids[..., 0] = np.arange(h)[:, None]
    ids[..., 1] = np.arange(w)[None, :]
    return ids


@pytest.mark.parametrize("h,w", [(64, 64), (70, 53)])
def test_grid_shuffle_strips_as_released(h, w):
    ids = index_image(h, w)
    rows_b, cols_b = reference_bounds(h), reference_bounds(w)
    if (h, w) == (70, 53):
        assert len(rows_b) == len(cols_b) == 9  # 8 strips of int(n / 8) pixels, then the rest
    for seed in range(6):
        out = S.grid_shuffle(ids, rng(seed))
        assert (out[..., 0] == out[:, :1, 0]).all() and (out[..., 1] == out[:1, :, 1]).all()
        cols = parse_strips(out[0, :, 1], cols_b)
        n_even = (len(cols_b) + 1) // 2
        assert set(cols[:n_even]) == set(range(0, len(cols_b), 2))  # columns: evens first, then odds
        assert set(cols[n_even:]) == set(range(1, len(cols_b), 2))
        assert sorted(parse_strips(out[:, 0, 0], rows_b)) == list(range(len(rows_b)))


def test_grid_shuffle_row_placement_uniform_columns_even_odd():
    ids = index_image(64, 64)
    bounds = reference_bounds(64)
    n = 800
    row_pos, col_pos = np.zeros(8), np.zeros(8)
    for s in range(n):
        out = S.grid_shuffle(ids, rng(s))
        row_pos[parse_strips(out[:, 0, 0], bounds).index(0)] += 1
        col_pos[parse_strips(out[0, :, 1], bounds).index(0)] += 1
    assert ((row_pos - n / 8) ** 2 / (n / 8)).sum() < CHI2_7DOF_P001  # row strip 0 lands anywhere
    assert col_pos[4:].sum() == 0 and min(col_pos[:4]) > n / 4 - 60  # column strip 0: among the evens only


# ---------------------------------------------------------------------------------------------- blend

def test_blend_truncates_to_uint8():
    img = np.full((2, 3, 3), 100, np.uint8)
    src = np.full((2, 3, 3), 201, np.uint8)
    mask = np.array([[1.0, 0.5, 0.0], [1.0, 0.25, 0.0]], np.float32)
    out = S.blend(img, src, mask, 0.3)
    assert out.dtype == np.uint8
    # 0.7 * 201 + 0.3 * 100 = 170.7; soft 0.5: 100 + 0.5 * 0.7 * 101 = 135.35; 0.25: 117.675
    assert out[..., 0].tolist() == [[170, 135, 100], [170, 117, 100]]


# ---------------------------------------------------------------------------------------------- synthesizer

@pytest.fixture
def texture_dir(tmp_path):
    base = tmp_path / "dtd" / "images"
    for cat in ("banded", "dotted"):
        (base / cat).mkdir(parents=True)
        for k in range(2):
            cv2.imwrite(str(base / cat / f"{cat}_{k:04d}.jpg"), random_image(40, 50, seed=10 + k))
    (base / "banded" / "readme.png").write_bytes(b"")  # not *.jpg: not a DTD image
    (tmp_path / "dtd" / "labels").mkdir()
    return str(tmp_path / "dtd")


@pytest.fixture
def anomaly_log():
    """The warnings logged on the project's "anomaly" logger during a test."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("anomaly")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_list_textures(tmp_path, texture_dir, anomaly_log):
    paths = S.list_textures(texture_dir)
    assert [os.path.relpath(p, texture_dir) for p in paths] == [
        "images/banded/banded_0000.jpg", "images/banded/banded_0001.jpg",
        "images/dotted/dotted_0000.jpg", "images/dotted/dotted_0001.jpg"]
    assert S.list_textures("none") is None
    assert len(anomaly_log) == 1 and "itself" in anomaly_log[0].getMessage() and "DTD" in anomaly_log[0].getMessage()
    for missing in (str(tmp_path / "dtd_missing"), str(tmp_path / "dtd" / "labels")):
        with pytest.raises(UserError) as e:
            S.list_textures(missing)
        msg = str(e.value)
        assert "\n" not in msg and missing in msg and S.DTD_URL in msg and "--anomaly_source_path none" in msg
        assert "images/<category>/*.jpg" in msg


def fine_image(h=150, w=130, seed=1):
    """High-frequency content, so that PIL's antialiased resize and OpenCV's bilinear one differ."""
    return random_image(h, w, seed)


def test_synthesizer_pastes_into_the_cv2_resize():
    img = fine_image()
    base = cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR)
    pil = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))
    for s in range(5):
        syn = S.AnomalySynthesizer(None, size=64)(img, rng(s))
        outside = syn.mask == 0
        assert syn.mask.any() and outside.any()
        assert np.array_equal(syn.image[outside], base[outside])
        assert not np.array_equal(syn.image[outside], pil[outside])


def test_synthesizer_texture_blend(monkeypatch, texture_dir):
    identity_augmenters(monkeypatch)
    img = fine_image()
    base = cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    textures = S.list_textures(texture_dir)
    used = 0
    for s in range(12):
        syn = S.AnomalySynthesizer(textures, size=64)(img, rng(s))
        if syn.source == "self":
            continue
        used += 1
        tex = cv2.resize(cv2.cvtColor(cv2.imread(syn.source), cv2.COLOR_BGR2RGB), (64, 64),
                         interpolation=cv2.INTER_LINEAR).astype(np.float64)
        inside = syn.mask == 1
        want = (1 - syn.beta) * tex + syn.beta * base
        clear = np.abs(want - np.round(want)) > 1e-3  # away from integers, where float32 could tip over
        assert inside.any() and 0.2 <= syn.beta <= 0.8
        assert np.array_equal(syn.image[inside][clear[inside]], np.floor(want[inside][clear[inside]]))
    assert used >= 3


def test_zero_foreground_gives_no_anomaly_soft_foreground_stays_soft():
    img = fine_image()
    synth = S.AnomalySynthesizer(None, size=64)
    syn = synth(img, rng(0), np.zeros((64, 64), np.float32))
    assert not syn.mask.any()
    assert np.array_equal(syn.image, cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR))
    fg = np.full((64, 64), 0.5, np.float32)
    fg[:, 32:] = 0
    for s in range(5):
        m = synth(img, rng(s), fg).mask
        assert m.any() and set(np.unique(m).tolist()) == {0.0, 0.5} and not m[:, 32:].any()


def test_every_image_gets_an_anomaly():
    synth = S.AnomalySynthesizer(None, size=48)
    assert all(synth(colourful(48, 48), rng(s)).mask.any() for s in range(30))


def test_synthesizer_sources(monkeypatch, texture_dir):
    textures = S.list_textures(texture_dir)
    shuffled = []
    real_shuffle = S.grid_shuffle
    monkeypatch.setattr(S, "grid_shuffle", lambda x, r: (shuffled.append(1), real_shuffle(x, r))[1])
    sources = [S.AnomalySynthesizer(textures, size=64)(colourful(), rng(s)).source for s in range(60)]
    n_texture = sum(src != "self" for src in sources)
    assert 15 < n_texture < 45 and set(sources) - {"self"} <= set(textures)  # p = 0.5
    assert len(shuffled) == 60 - n_texture  # only the self source is grid-shuffled
    assert {S.AnomalySynthesizer(None, size=64)(colourful(), rng(s)).source for s in range(10)} == {"self"}


def test_synthesizer_takes_a_texture_when_its_draw_is_below_one_half(monkeypatch, texture_dir):
    # the source draw itself: the released code takes a DTD texture when rng.random() < 0.5, else the image
    class Draws:  # the source draw as given; the texture index and beta at their lowest
        def __init__(self, u):
            self.u = u

        def random(self):
            return self.u

        def integers(self, n):
            return 0

        def uniform(self, lo, hi):
            return lo

    monkeypatch.setattr(S, "perlin_resolution", lambda r: (1, 1))
    monkeypatch.setattr(S, "perlin_mask", lambda size, res, r, fg: np.zeros((size, size), np.float32))
    monkeypatch.setattr(S, "random_augment", lambda img, r: (img, ()))
    monkeypatch.setattr(S, "grid_shuffle", lambda img, r: img)
    synth = S.AnomalySynthesizer(S.list_textures(texture_dir), size=64)
    assert [synth(colourful(), Draws(u)).source != "self" for u in (0.0, 0.4999, 0.5, 0.9)] == [True, True, False,
                                                                                                 False]


def test_synthesizer_reproducible():
    synth = S.AnomalySynthesizer(None, size=64)
    a, b, c = synth(colourful(), rng(4)), synth(colourful(), rng(4)), synth(colourful(), rng(5))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


# ---------------------------------------------------------------------------------------------- dataset

def _samples(tmp_path, n=3, fg_values=None):
    out = []
    for k in range(n):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(fine_image(seed=k)).save(p)
        fpath = None
        if fg_values is not None:
            f = np.zeros((150, 130), np.uint8)
            f[:, :65] = fg_values
            fpath = str(tmp_path / f"fg{k}.png")
            Image.fromarray(f).save(fpath)
        out.append(Sample(str(p), 0, None, "toy", fpath))
    return out


def test_dataset_clean_target_pil_synthetic_from_cv2(tmp_path):
    T = pytest.importorskip("torchvision.transforms")
    samples = _samples(tmp_path)
    data = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56)
    reference = T.Compose([T.Resize((64, 64)), T.ToTensor(), T.CenterCrop(56),
                           T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    for i, s in enumerate(samples):
        img, aug, mask = data[i]
        assert img.shape == aug.shape == (3, 56, 56) and mask.shape == (1, 56, 56)
        assert torch.allclose(img, reference(Image.open(s.image_path).convert("RGB")), atol=1e-6)
        cv2_target = normalise(cv2.resize(np.asarray(Image.open(s.image_path)), (64, 64),
                                          interpolation=cv2.INTER_LINEAR)[4:60, 4:60])
        outside = mask[0] == 0
        assert torch.allclose(aug[:, outside], cv2_target[:, outside], atol=1e-6)
        assert not torch.allclose(img[:, outside], aug[:, outside], atol=1e-3)  # differs everywhere a bit
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_dataset_soft_foreground_reaches_the_mask(tmp_path):
    data = S.SyntheticAnomalyDataset(_samples(tmp_path, fg_values=128), image_size=64, crop_size=56)
    soft = set()
    for i in range(3):
        _, _, mask = data[i]
        assert mask[0, :, 28:].sum() == 0 and mask.sum() > 0  # foreground: left half (columns < 32 of 64)
        soft |= set(mask.unique().tolist()) - {0.0}
    assert max(soft) < 0.55 and any(0.45 < v for v in soft)  # 128 / 255 (less at the edge), never binarised


def test_dataset_zero_foreground(tmp_path):
    samples = _samples(tmp_path, fg_values=0)
    data = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56)
    for i, s in enumerate(samples):
        _, aug, mask = data[i]
        cv2_target = normalise(cv2.resize(np.asarray(Image.open(s.image_path)), (64, 64),
                                          interpolation=cv2.INTER_LINEAR)[4:60, 4:60])
        assert mask.sum() == 0 and torch.allclose(aug, cv2_target, atol=1e-6)  # no anomaly at all


def test_dataset_default_size(tmp_path):
    img, aug, mask = S.SyntheticAnomalyDataset(_samples(tmp_path, n=1))[0]
    assert img.shape == (3, 392, 392) and aug.shape == (3, 392, 392) and mask.shape == (1, 392, 392)


def test_dataset_reproducible_per_seed_epoch_index(tmp_path):
    samples = _samples(tmp_path)
    data = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=1)
    first = data[1]
    again = S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=1)
    _ = again[0], again[2]  # order of access must not matter
    for a, b in zip(first, again[1]):
        assert torch.equal(a, b)
    e1 = data[(1, 1)]  # item 1 of epoch 1 (the training sampler's key)
    assert not torch.equal(first[2], e1[2])
    assert torch.equal(first[0], e1[0])  # the clean image does not change
    assert torch.equal(data[(0, 1)][2], first[2])  # a bare index is epoch 0
    assert not torch.equal(first[2], S.SyntheticAnomalyDataset(samples, image_size=64, crop_size=56, seed=2)[1][2])


def test_dataset_same_in_worker_processes(tmp_path):
    data = S.SyntheticAnomalyDataset(_samples(tmp_path, n=4), image_size=64, crop_size=56, seed=3)
    direct = [data[(2, i)][1] for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=2, sampler=[(2, i) for i in range(4)])
    for i, (_, aug, _) in enumerate(loader):
        assert torch.equal(aug[0], direct[i])


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_synthetic_samples_are_bit_identical(tmp_path, texture_dir, mode, monkeypatch):
    samples = _samples(tmp_path, n=4, fg_values=128)
    samples[3] = Sample(samples[3].image_path, 0, None, "toy", None)  # one image without an object mask
    textures = S.list_textures(texture_dir)
    caches = S.synthesis_caches(mode, samples, textures, 64, str(tmp_path / "cache"))
    assert set(caches) == {"clean", "base", "foreground", "texture"} and len(caches["foreground"]) == 3
    plain = S.SyntheticAnomalyDataset(samples, 64, 56, textures, seed=2)
    cached = S.SyntheticAnomalyDataset(samples, 64, 56, textures, seed=2, caches=caches)
    decoded = []
    monkeypatch.setattr(S, "load_image", lambda p: decoded.append(p) or ds.load_image(p))
    for epoch in range(6):  # the first pass fills the caches, the next ones read them
        for i in range(len(samples)):
            for a, b in zip(plain[(epoch, i)], cached[(epoch, i)]):
                assert torch.equal(a, b)
    assert all(c.filled_count() > 0 for c in caches.values())  # textures were pasted from the cache too
    assert len(decoded) == 6 * 4 + 4  # the uncached dataset every time, the cached one once per image
    np.testing.assert_array_equal(caches["foreground"].get(samples[0].foreground_path),
                                  cv2.resize(cv2.imread(samples[0].foreground_path, cv2.IMREAD_GRAYSCALE), (64, 64)))
    loader = torch.utils.data.DataLoader(cached, batch_size=2, num_workers=2, multiprocessing_context="fork")
    for k, batch in enumerate(loader):  # workers read (and would fill) the same shared caches
        for j in range(2):
            for a, b in zip(batch, plain[2 * k + j]):
                assert torch.equal(a[j], b)
    if mode == "disk":
        names = sorted(f.split("_")[0] + ("_cv2" if "_cv2_" in f else "") for f in os.listdir(tmp_path / "cache"))
        assert names == ["foreground", "images", "images_cv2", "textures"]
    assert S.synthesis_caches("none", samples, textures, 64, None) == {}


# ---------------------------------------------------------------------------------------------- show_synthesis

def _show_synthesis():
    script = os.path.join(ROOT, "prepare_data", "show_synthesis.py")
    spec = importlib.util.spec_from_file_location("show_synthesis", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, script


def test_show_synthesis_writes_labelled_grid(tmp_path, texture_dir):
    data = tmp_path / "mvtec" / "bottle" / "train" / "good"
    data.mkdir(parents=True)
    for k in range(2):
        Image.fromarray(colourful(50, 60)).save(data / f"{k:03d}.png")
    gt = tmp_path / "mvtec" / "bottle" / "ground_truth" / "broken"
    gt.mkdir(parents=True)
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(gt / "000_mask.png")
    out = tmp_path / "grid.png"
    mod, script = _show_synthesis()
    rc = mod.main(["--data_path", str(tmp_path / "mvtec"), "--anomaly_source_path", texture_dir,
                   "--n", "3", "--size", "32", "--out", str(out)])
    assert rc == 0
    t = mod.TEXT_H
    with Image.open(out) as g:
        assert g.size == (3 * 32, t + 3 * (t + 32)) and g.mode == "RGB"
        grid = np.asarray(g)
    assert grid[:t].any()  # the column header
    for row in range(3):
        top = t + row * (t + 32)
        assert grid[top: top + t].any()  # the caption
        masks = grid[top + t: top + t + 32, 64:]
        assert masks.max() == 255 and (masks[..., 0] == masks[..., 1]).all()
    # only train/good images are used from an MVTec layout (the ground-truth mask is not)
    assert len(mod.find_samples(str(tmp_path / "mvtec"))) == 2

    # run as a script from the repository root; errors are one line on stderr and exit status 2
    r = subprocess.run([sys.executable, script, "--data_path", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_show_synthesis_realiad_class_uses_foreground(tmp_path):
    cls_dir = tmp_path / "realiad_1024" / "nut"
    fg_dir = tmp_path / "realiad_1024_DISthresh" / "nut" / "DISthresh" / "S0001"
    (cls_dir / "OK" / "S0001").mkdir(parents=True)
    (cls_dir / "NG" / "QS" / "S0002").mkdir(parents=True)
    fg_dir.mkdir(parents=True)
    Image.fromarray(colourful()).save(cls_dir / "OK" / "S0001" / "nut_C1.jpg")
    Image.fromarray(colourful()).save(cls_dir / "NG" / "QS" / "S0002" / "nut_C1.jpg")
    f = np.zeros((64, 64), np.uint8)
    f[:, :20] = 128
    Image.fromarray(f).save(fg_dir / "nut_C1.jpg")
    mod, _ = _show_synthesis()
    samples = mod.find_samples(str(cls_dir))
    assert [s.foreground_path for s in samples] == [str(fg_dir / "nut_C1.jpg")]
    grid = np.asarray(mod.make_grid(samples, None, 2, 64, 0))
    t = mod.TEXT_H
    for row in range(2):
        mask = grid[2 * t + row * (t + 64): 2 * t + row * (t + 64) + 64, 128:, 0]
        assert mask[:, 24:].max() == 0 and 0 < mask.max() < 160  # inside the soft foreground only
