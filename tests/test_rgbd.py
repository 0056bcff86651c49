"""Dinomaly2's RGB + depth (MVTec 3D-AD): the depth preparation and colouring against a direct NumPy reading of the
preview's formulas (its preprocess_mvtec3d_1.py, _2.py and MVTec3DDataset) on generated point clouds, DBSCAN's
largest cluster against brute force, the fused taps against float64, a preview-layout DinomalyRGBD checkpoint, the
reader and the script end to end."""
import copy
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dinomaly import checkpoints, cli, depth, models, modalities
from dinomaly import dataset as ds
from dinomaly.errors import UserError

import dinomaly2_mvtec3d
from conftest import TINY, TINY_CFG, assert_resumes_bit_exactly, assert_trains_in_bf16_compiled
from prepare_data import prepare_mvtec3d
from prepare_data.make_demo_pairs import TABLE, make_demo_pairs

D = TINY_CFG.embed_dim


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_demo_pairs(str(tmp_path_factory.mktemp("pairs")), size=64, seed=0, n_train=4, n_test_good=2,
                           n_test_bad=2)


def xyz_of(pairs, kind="dent", n=0, cls="dome"):
    return depth.read_tiff(os.path.join(pairs["mvtec3d"], cls, "test", kind, "xyz", f"{n:03d}.tiff"))


# --- the preview's code, read directly (NumPy) -----------------------------------------------------------------

def preview_fill_gaps(img):
    """preprocess_mvtec3d_2.py: fill_gaps with get_neighbor_mean, pixel by pixel."""
    def neighbor_mean(p):
        n = np.sum(img[p[0] - 1: p[0] + 2, p[1] - 1: p[1] + 2] > 0)
        if n == 0:
            return None
        return np.sum(img[p[0] - 1: p[0] + 2, p[1] - 1: p[1] + 2], axis=(0, 1)) / n
    new = np.copy(img)
    for x, y in zip(*np.where(img == 0)):
        if img[x, y] == 0:
            m = neighbor_mean([x, y])
            if m is not None:
                new[x, y] = m
    return new


def preview_pad(a):
    """preprocess_mvtec3d_1.py: pad_cropped_pc."""
    h, w = a.shape[:2]
    side = max(int(np.ceil(h / 100.0)) * 100, int(np.ceil(w / 100.0)) * 100)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - h - top), (left, side - w - left))
    return np.pad(a, pad if a.ndim == 2 else pad + ((0, 0),), mode="constant")


def preview_colour(depth_map, img):
    """dataset.py: MVTec3DDataset.__getitem__, from tiff.imread(z) to the two uint8 images."""
    depth_map = depth_map.copy()
    depth_mask = depth_map > 0.
    min_value = depth_map[depth_mask].min()
    max_value = depth_map.max()
    depth_map = (depth_map - min_value) / (max_value - min_value)
    depth_map = 1 - depth_map * 0.8
    depth_map[depth_mask == 0] = 0
    depth_map = cv2.applyColorMap((depth_map * 255).astype(np.uint8), cv2.COLORMAP_HOT)[:, :, ::-1]
    img = np.array(img)
    img[depth_mask == 0] = 0
    return img, depth_map


def brute_force_outliers(pc, eps=0.006, min_points=30):
    """DBSCAN by its definition on all pairwise distances: core points have >= min_points points within eps (self
    included); clusters are the connected core points with the points within eps of them; the largest label (noise
    included) is kept."""
    flat = pc.reshape(-1, 3).astype(np.float64)
    idx = np.flatnonzero(np.all(flat != 0, axis=1))
    p = flat[idx]
    near = np.linalg.norm(p[:, None] - p[None], axis=-1) <= eps
    core = near.sum(1) >= min_points
    labels = np.full(len(p), -1)
    cluster = 0
    for seed in np.flatnonzero(core):
        if labels[seed] != -1:
            continue
        stack, labels[seed] = [seed], cluster
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(near[i]):
                if labels[j] == -1:
                    labels[j] = cluster
                    if core[j]:
                        stack.append(j)
        cluster += 1
    ids, sizes = np.unique(labels, return_counts=True)
    out = np.zeros(len(flat), bool)
    out[idx[labels != ids[np.argmax(sizes)]]] = True
    return out.reshape(pc.shape[:2])


# --- preparation and colouring --------------------------------------------------------------------------------

def test_gap_filling_is_the_preview_loop(pairs):
    z = xyz_of(pairs)[..., 2].copy()
    z[::7, ::5] = 0  # more gaps, also in row 0 and column 0
    z[:12, :12] = 0  # and a block wider than 3 rounds can fill
    ours, theirs = z, z
    for _ in range(depth.FILL_ROUNDS):
        ours, theirs = depth.fill_gaps(ours), preview_fill_gaps(theirs)
        np.testing.assert_array_equal(ours == 0, theirs == 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert (ours[0][z[0] == 0] == 0).all() and (ours[:12, :12] == 0).any()  # row 0 never filled, the block not all


@pytest.mark.parametrize("shape", [(130, 170, 3), (200, 200), (99, 101), (64, 64, 3)])
def test_padding_is_the_preview_pad(shape):
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_array_equal(depth.pad_square(a), preview_pad(a))


def test_plane_fit_finds_the_table_despite_stray_points(pairs):
    xyz = xyz_of(pairs)
    plane = depth.fit_plane(depth.border_points(xyz))
    truth = np.array([0.05, 0.03, -1.0, TABLE])  # z = 0.6 + 0.05 x + 0.03 y
    truth /= np.linalg.norm(truth[:3])
    plane *= np.sign(plane[2]) * np.sign(truth[2])
    np.testing.assert_allclose(plane, truth, atol=1e-5)


def test_largest_cluster_against_brute_force(pairs):
    crop = xyz_of(pairs)[17:49, 17:49]  # 32 x 32 points of the object and the table (1 mm apart)
    above = (TABLE + 0.05 * crop[..., 0] + 0.03 * crop[..., 1]) - crop[..., 2] > 0.005
    pc = np.where(above[..., None], crop, 0)  # the table removed: the object remains
    pc[:3, :3] = crop[:3, :3] * [1, 1, 0] + [0, 0, TABLE - 0.03]  # 9 stray points (noise)
    pc[28:32, :10] = crop[28:32, :10] * [1, 1, 0] + [0, 0, TABLE - 0.05]  # a smaller cluster of 40 points
    expected = brute_force_outliers(pc)
    assert expected.sum() >= 45 and (~expected & np.all(pc != 0, axis=-1)).sum() > 100
    np.testing.assert_array_equal(depth.outside_largest_cluster(pc), expected)


def test_prepared_scan_is_the_preview_pipeline(pairs):
    """Plane removal (with the fitted plane), padding, largest cluster, z channel, three fills, composed as the
    preview's two scripts."""
    xyz = xyz_of(pairs, "stain", 1, "block")
    rgb = np.asarray(Image.open(os.path.join(pairs["mvtec3d"], "block", "test", "stain", "rgb", "001.png")))
    mask = np.asarray(Image.open(os.path.join(pairs["mvtec3d"], "block", "test", "stain", "gt", "001.png")))
    plane = depth.fit_plane(depth.border_points(xyz))
    flat, flat_rgb = xyz.reshape(-1, 3).copy(), rgb.reshape(-1, 3).copy()
    distances = np.abs(np.dot(plane, np.hstack((flat, np.ones((flat.shape[0], 1)))).T))
    flat[distances < 0.005], flat_rgb[distances < 0.005] = 0, 0
    pc, prgb = preview_pad(flat.reshape(xyz.shape)), preview_pad(flat_rgb.reshape(rgb.shape))
    out = brute_force_outliers(pc)
    pc[out], prgb[out] = 0, 0
    z = pc[:, :, -1]
    for _ in range(3):
        z = preview_fill_gaps(z)
    ours_z, ours_rgb, ours_mask = depth.prepare_scan(xyz, rgb, mask)
    np.testing.assert_allclose(ours_z, z, rtol=1e-6)
    np.testing.assert_array_equal(ours_rgb, prgb)
    np.testing.assert_array_equal(ours_mask, preview_pad(mask))
    assert ours_z.shape == (100, 100) and (ours_z > 0).sum() > 500


def test_colouring_and_background_are_the_preview_formulas(pairs):
    z, rgb, _ = depth.prepare_scan(xyz_of(pairs), np.asarray(Image.open(
        os.path.join(pairs["mvtec3d"], "dome", "test", "dent", "rgb", "000.png"))))
    img, colour = preview_colour(z, rgb)
    np.testing.assert_array_equal(depth.colour_depth(z), colour)
    np.testing.assert_array_equal(depth.zero_background(rgb, z), img)
    assert colour[z > 0].max() == 255 and (colour[z == 0] == 0).all()
    with pytest.raises(UserError, match="no foreground"):
        depth.colour_depth(np.zeros((4, 4), np.float32), "empty.tiff")


def test_prepared_folder_equals_the_preparation_on_the_fly(pairs, tmp_path):
    out = tmp_path / "prepared"
    assert prepare_mvtec3d.main(["--data_path", pairs["mvtec3d"], "--out", str(out), "--workers", "1"]) == 0
    raw = ds.mvtec3d_samples(pairs["mvtec3d"], "dome", "test")
    prepared = ds.mvtec3d_samples(str(out), "dome", "test")
    assert [os.path.basename(os.path.dirname(s.pair_path)) for s in raw + prepared] == \
        ["xyz"] * len(raw) + ["z"] * len(prepared)
    for a, b in zip(raw, prepared):
        for x, y in zip(modalities.pair_arrays(a), modalities.pair_arrays(b)):
            np.testing.assert_array_equal(x, y)
        if a.label:
            np.testing.assert_array_equal(np.asarray(modalities.pair_mask(a)), np.asarray(modalities.pair_mask(b)))
    assert prepare_mvtec3d.main(["--data_path", pairs["mvtec3d"], "--out", pairs["mvtec3d"]]) == 2


def test_depth_is_found_in_the_sample_folder(pairs, tmp_path):
    """The preview's path.replace('rgb', 'z') on the whole path breaks under a folder whose name holds 'rgb'."""
    root = tmp_path / "rgb_scans"
    shutil.copytree(os.path.join(pairs["mvtec3d"], "dome"), root / "dome")
    s = ds.mvtec3d_samples(str(root), "dome", "train")[0]
    assert s.pair_path == str(root / "dome" / "train" / "good" / "xyz" / "000.tiff")
    assert not os.path.exists(s.image_path.replace("rgb", "z").replace("png", "tiff"))
    os.remove(s.pair_path)
    with pytest.raises(UserError, match="no depth for .*000"):
        ds.mvtec3d_samples(str(root), "dome", "train")


def test_reader_labels_and_masks(pairs):
    test = ds.mvtec3d_samples(pairs["mvtec3d"], "dome", "test")
    assert [(s.rel_path.split("/")[1], s.label, s.mask_path is not None) for s in test] == \
        [("dent", 1, True)] * 2 + [("good", 0, False)] * 2 + [("stain", 1, True)] * 2
    x = ds.TestDataset(test, 64, 56)[0]
    assert x[0].shape == (6, 56, 56) and x[1].shape == (1, 56, 56) and x[1].max() == 1


# --- the model ------------------------------------------------------------------------------------------------

def rgbd_model():
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, dropout=0.0, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                          modality="rgbd")
    for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]:
        nn.init.normal_(p, std=0.05)
    return model.eval()


def test_fused_taps_against_float64():
    model = rgbd_model()
    x = torch.randn(2, 6, 56, 56)
    with torch.no_grad():
        en, de = model(x)
        m64 = copy.deepcopy(model).double()
        taps = [0.5 * a + 0.5 * b for a, b in zip(m64.encoder(x[:, :3].double()), m64.encoder(x[:, 3:].double()))]
        h = m64.bottleneck(torch.stack(taps).mean(0))
        outs = []
        for blk in m64.decoder:
            h = blk(h)
            outs.append(h)
    p = model.encoder.num_prefix_tokens
    for g, e, d in zip([[0, 1, 2, 3], [4, 5, 6, 7]], en, de):
        group = torch.stack([taps[i] for i in g]).mean(0)
        t = group[:, p:] - group[:, :1]
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-8)
        torch.testing.assert_close(e.double(), t.transpose(1, 2).reshape(2, D, 4, 4), rtol=1e-4, atol=1e-4)
        dec = torch.stack([outs[::-1][i] for i in g]).mean(0)[:, p:]
        torch.testing.assert_close(d.double(), dec.transpose(1, 2).reshape(2, D, 4, 4), rtol=1e-4, atol=1e-4)
    assert torch.equal(model.encoded(x)[0], en[0])
    with pytest.raises(ValueError, match="6 channels"):
        model(torch.randn(1, 3, 56, 56))


def test_preview_rgbd_checkpoint_loads_strictly(tmp_path):
    """The preview's DinomalyRGBD saves the keys of its Dinomaly (encoder.*, bottleneck ModuleList, decoder.*) and
    no config: the RGB + depth script loads it strictly as an rgbd model; a run recorded as another modality is
    refused."""
    sd = rgbd_model().state_dict()
    preview = nn.ModuleList([nn.Sequential(nn.Linear(D, 256), nn.Dropout(0.4)),
                             nn.Sequential(nn.Linear(256, 4 * D), nn.GELU(), nn.Dropout(0.4), nn.Linear(4 * D, D),
                                           nn.Dropout(0.4))])
    assert {f"bottleneck.{k}" for k in preview.state_dict()} == {k for k in sd if k.startswith("bottleneck.")}
    torch.save(sd, tmp_path / "model.pth")
    model, recipe = checkpoints.load_trained(str(tmp_path / "model.pth"), {}, "dinomaly2", "rgbd")
    assert recipe.modality == "rgbd" and model.modality == "rgbd" and model.recenter
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    (tmp_path / "config.json").write_text(json.dumps({"model": {"method": "dinomaly2", "modality": "rgb"}}))
    with pytest.raises(UserError, match="model of rgb inputs"):
        checkpoints.load_trained(str(tmp_path / "model.pth"), {}, "dinomaly2", "rgbd")


# --- the script ------------------------------------------------------------------------------------------------

SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "64", "--crop_size", "56", "--num_workers",
         "0", "--device", "cpu", "--batch_size", "4", "--log_every", "1", "--classes", "dome", "block"]


def run_argv(pairs, save_dir):
    return ["--data_path", pairs["mvtec3d"], "--total_iters", "3", "--save_dir", str(save_dir), "--save_heatmaps",
            "1", "--cache_images", "memory", *SMALL]


@pytest.fixture(scope="module")
def rgbd_run(pairs, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs_rgbd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        cli.run_script(dinomaly2_mvtec3d, [*run_argv(pairs, save_dir), "--save_name", "rgbd"])
    return save_dir / "rgbd"


def test_script_trains_records_the_modality_and_reloads(rgbd_run, pairs, tmp_path):
    config = json.loads((rgbd_run / "config.json").read_text())
    assert config["model"]["modality"] == "rgbd" and config["dataset"] == "mvtec3d"
    assert config["training"]["bottleneck_in_lr"] == 2e-3 and config["training"]["total_iters"] == 3
    scores = (rgbd_run / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 2 * 6 and "dome" in (rgbd_run / "metrics.csv").read_text()
    picture = np.asarray(Image.open(next((rgbd_run / "heatmaps" / "dome").iterdir())))
    assert picture.shape[0] > 2 * 256 and picture.shape[1] > 3 * 256  # RGB and depth rows: image, truth, map
    cli.run_script(dinomaly2_mvtec3d, ["--data_path", pairs["mvtec3d"], "--eval_only", "--checkpoint", str(rgbd_run),
                                       "--save_dir", str(tmp_path), "--save_name", "again", *SMALL[2:]])
    again = (tmp_path / "again" / "scores.csv").read_text().splitlines()
    np.testing.assert_allclose([float(r.split(",")[-1]) for r in again[1:]],
                               [float(r.split(",")[-1]) for r in scores[1:]], rtol=1e-6)


def test_detector_and_predict_take_pairs(rgbd_run, pairs, tmp_path, monkeypatch):
    """A pair is given as the image's path in MVTec 3D-AD's layout, as (image, depth file) or as (image, z map):
    the score is the evaluation's."""
    from dinomaly import Detector, predict
    from dinomaly.errors import InputError
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    scores = {r.split(",")[1]: float(r.split(",")[3]) for r in (rgbd_run / "scores.csv").read_text().splitlines()[1:]}
    d = Detector(str(rgbd_run), device="cpu")
    s = ds.mvtec3d_samples(pairs["mvtec3d"], "dome", "test")[0]
    z, rgb, _ = depth.prepare_scan(depth.read_tiff(s.pair_path), np.asarray(Image.open(s.image_path)))
    for given in (s.image_path, (s.image_path, s.pair_path), (Image.fromarray(rgb), z)):
        r = d(given)
        np.testing.assert_allclose(r.score, scores[s.image_path], rtol=1e-5)
        assert r.anomaly_map.shape == (100, 100)  # the prepared (padded) sample's geometry
    with pytest.raises(InputError, match="takes pairs"):
        d(np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "pred"
    predict.main(predict.PredictOptions(checkpoint=str(rgbd_run), input=[os.path.join(pairs["mvtec3d"], "dome",
                                                                                      "test")], out=str(out)))
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all("/rgb/" in r.split(",")[0] for r in rows)
    overlays = [np.asarray(Image.open(f)) for f in sorted((out / "overlays").iterdir())]
    assert len(overlays) == 6 and all(o.shape[1] > 2 * 300 for o in overlays)  # image and depth, 100 px x 3 each
    for r in rows:
        np.testing.assert_allclose(float(r.split(",")[1]), scores[r.split(",")[0]], rtol=1e-5)


def test_trains_in_bf16_compiled(rgbd_run, pairs, tmp_path, monkeypatch):
    """Compiled by dynamo with the eager backend: the encoder's blocks see 2B images and the decoder's (timm's same
    Block.forward) B fused ones, so the blocks are compiled again for a dynamic batch, which AOTAutograd makes ~15 s
    on a CPU (the aot_eager backend of a block's training step: test_speed.py; of an RGB + infrared run:
    test_rgbir.py)."""
    assert_trains_in_bf16_compiled(dinomaly2_mvtec3d, [*run_argv(pairs, tmp_path), "--save_name", "bf16"], rgbd_run,
                                   monkeypatch, backend="eager")


def test_interrupted_run_resumes_bit_exactly(rgbd_run, pairs, tmp_path, monkeypatch):
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    assert_resumes_bit_exactly(dinomaly2_mvtec3d, [*run_argv(pairs, tmp_path), "--save_name", "cut"], rgbd_run,
                               monkeypatch)


def test_a_dataset_of_another_modality_is_one_line(pairs, tmp_path, capsys):
    import dinomaly2_2d
    for module, dataset, hint in ((dinomaly2_2d, "mvtec3d", "use dinomaly2_mvtec3d.py"),
                                  (dinomaly2_mvtec3d, "mvtec", "pass --dataset mvtec3d")):
        with pytest.raises(SystemExit) as e:
            cli.run_script(module, ["--dataset", dataset, "--data_path", pairs["mvtec3d"], "--save_dir", str(tmp_path),
                                    "--save_name", "x", "--encoder_weights", "random", "--device", "cpu"])
        assert e.value.code == 2 and hint in capsys.readouterr().err


def test_two_input_exports_equal_pytorch_and_predict_alike(rgbd_run, pairs, tmp_path, capsys):
    """ONNX and OpenVINO with inputs rgb and depth (the coloured depth), and predict.py on the OpenVINO file."""
    pytest.importorskip("openvino")
    from conftest import check_pair_exports
    check_pair_exports(rgbd_run, "rgbd", os.path.join(pairs["mvtec3d"], "dome", "test"), tmp_path, capsys, ".xml")


def test_the_service_takes_a_pair_as_two_parts(rgbd_run, pairs):
    """POST /predict with the parts rgb (PNG) and depth (the point cloud's TIFF): the Detector's result on the same
    pair; /info names the parts; a missing, extra or mistyped part is a one-line 4xx naming it."""
    import base64
    import io
    import pathlib

    import httpx

    from dinomaly import Detector, serve
    detector = Detector(str(rgbd_run), device="cpu")
    service = serve.Background(serve.create_app(detector, serve.ServeOptions(str(rgbd_run))))
    try:
        info = httpx.get(service.url + "/info").json()
        assert (info["modality"], info["parts"]) == ("rgbd", ["rgb", "depth"])
        s = ds.mvtec3d_samples(pairs["mvtec3d"], "block", "test")[-1]
        rgb, xyz = (pathlib.Path(f).read_bytes() for f in (s.image_path, s.pair_path))

        def post(**parts):
            return httpx.post(service.url + "/predict", params={"mask": "true"}, timeout=60,
                              files=[(k, (f"{k}.bin", v)) for k, v in parts.items()])
        r = post(rgb=rgb, depth=xyz)
        assert r.status_code == 200, r.text
        (got,) = r.json()["images"]
        want = detector((s.image_path, s.pair_path))
        assert got["score"] == pytest.approx(want.score, rel=1e-6) and got["class"] == want.class_name
        assert got["decision"] == ("anomalous" if want.is_anomalous else "normal")
        assert (got["width"], got["height"]) == (100, 100) == want.anomaly_map.shape[::-1]  # the prepared scan
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask_png"]))))
        assert np.array_equal(mask > 0, want.mask)
        for parts, status, named in (({"rgb": rgb}, 400, "'depth' is missing"),
                                     ({"rgb": rgb, "depth": xyz, "mask": rgb}, 400, "unexpected part 'mask'"),
                                     ({"image": rgb, "depth": xyz}, 400, "unexpected part 'image'"),
                                     ({"rgb": rgb, "depth": rgb}, 415, "is not a TIFF file"),
                                     ({"rgb": rgb, "depth": xyz[:300]}, 400, "depth.bin")):
            r = post(**parts)
            assert r.status_code == status and named in r.json()["error"] and "\n" not in r.json()["error"]
        r = httpx.post(service.url + "/predict", content=rgb)
        assert r.status_code == 400 and "this run takes pairs (rgb + depth)" in r.json()["error"]
        assert httpx.get(service.url + "/health").json()["status"] == "ok"
    finally:
        service.close()


# --- the review page on a run of pairs: POST /pairs pairs a folder's files by name, each pair a /predict ---------

def mvtec3d_paths(seed=0):
    """The relative paths of a generated MVTec 3D-AD folder, shuffled: each sample's rgb image with its prepared z
    map, its point cloud, both or neither; masks in gt/; a class whose name holds 'rgb'; stray files."""
    rng = np.random.default_rng(seed)
    paths = []
    for cls in ("bagel", "rgb_plug"):
        for split, kinds in (("train", ("good",)), ("test", ("good", "hole"))):
            for kind in kinds:
                for n in range(5):
                    base, has = f"{cls}/{split}/{kind}", rng.integers(4)  # has: 0 neither, 1 xyz, 2 z, 3 both
                    paths += [f"{base}/rgb/{n:03d}.png"] + [f"{base}/xyz/{n:03d}.tiff"] * (has & 1) + \
                        [f"{base}/z/{n:03d}.tiff"] * (has >> 1) + [f"{base}/gt/{n:03d}.png"] * (kind != "good")
    paths += ["bagel/test/hole/xyz/099.tiff", "bagel/test/hole/rgb/notes.txt", "bagel/test/good/rgb/.hidden.png",
              "bagel/test/rgb/loose.png", "rgb/000.png", "xyz/000.tiff", "rgb/001.jpg", "z/001.tiff"]
    return [paths[i] for i in rng.permutation(len(paths))]


def depth_rank(rgb, other):
    """The depth of an MVTec 3D-AD image: the file of its stem in z/ (preferred) or xyz/ beside its rgb/ folder."""
    if len(other) != len(rgb) or other[:-2] != rgb[:-2] or other[-1] != os.path.splitext(rgb[-1])[0] + ".tiff":
        return None
    return {"z": 0, "xyz": 1}.get(other[-2])


@pytest.fixture(scope="module")
def pair_folder(pairs, tmp_path_factory):
    """dome's test folder in MVTec 3D-AD's layout (rgb/, xyz/, gt/), one point cloud removed."""
    folder = tmp_path_factory.mktemp("review") / "dome_test"
    shutil.copytree(os.path.join(pairs["mvtec3d"], "dome", "test"), folder)
    os.remove(folder / "good" / "xyz" / "001.tiff")
    return folder


@pytest.fixture(scope="module")
def rgbd_service(rgbd_run, pair_folder):
    """The service on the RGB + depth run, its --review folder pair_folder; requests wait 200 ms for each other."""
    from dinomaly import Detector, serve
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        detector = Detector(str(rgbd_run), device="cpu")
    service = serve.Background(serve.create_app(detector, serve.ServeOptions(
        str(rgbd_run), review=str(pair_folder), max_wait_ms=200.0, max_mb=1.0)))
    yield service
    service.close()


def test_pairs_endpoint_against_brute_force_and_the_file_system(rgbd_service, tmp_path):
    """POST /pairs on a folder's paths: the pairs and unpaired images of a brute-force comparison of every two paths,
    the missing file named in one line; the same pairs as modalities.partner (predict.py) finds on the disk."""
    import httpx
    from conftest import brute_force_pairs, post_pairs
    paths = mvtec3d_paths()
    got, unpaired = post_pairs(rgbd_service.url, paths)
    want, want_unpaired = brute_force_pairs(paths, lambda p: len(p) > 1 and p[-2] == "rgb", depth_rank)
    assert got == want and [a for a, _ in unpaired] == want_unpaired
    assert len(want) > 10 and len(want_unpaired) > 5 and ("rgb/001.jpg", "z/001.tiff") in got
    for a, message in unpaired:
        xyz = "/".join(a.split("/")[:-2] + ["xyz", os.path.splitext(a.split("/")[-1])[0] + ".tiff"])
        assert message.startswith(f"no depth for {a}: ") and xyz in message and "\n" not in message
    for p in paths:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).touch()
    for a, b in want:
        assert modalities.partner(str(tmp_path / a), modalities.DEPTH) == str(tmp_path / b)
    for a in want_unpaired:
        with pytest.raises(UserError, match="no depth for"):
            modalities.partner(str(tmp_path / a), modalities.DEPTH)
    url = rgbd_service.url + "/pairs"
    for body, status, words in ((b"not json", 400, "send JSON"), (b'{"paths": []}', 400, "send JSON"),
                                (b'["a/rgb/0.png"]', 400, "send JSON"), (b'{"files": "a"}', 400, "not a list"),
                                (b'{"files": ["a", 3]}', 400, "files[1] is 3"), (b'{"files": [""]}', 400, "files[0]"),
                                (json.dumps({"files": ["a" * 1001]}).encode(), 400, "longer than 1000 characters"),
                                (json.dumps({"files": ["rgb/0.png"] * 50_001}).encode(), 400, "at most 50,000"),
                                (b'{"files": ["' + b"a" * 2 ** 20 + b'"]}', 413, "--max_mb")):
        r = httpx.post(url, content=body, timeout=60)
        assert r.status_code == status and words in r.json()["error"] and "\n" not in r.json()["error"], body[:40]
    assert httpx.post(url, json={"files": []}).json() == {"pairs": [], "unpaired": []}


def test_the_review_page_scores_pairs(rgbd_service, pair_folder, browser, tmp_path):
    """The page on a run of pairs: the pairs of its --review folder scored when it opens, then a folder chosen, then
    one pair chosen by its two files: a card per pair named by its RGB image, its score the service's /predict of
    the same pair, the masks and depth files no cards, the image without its depth a card naming the missing file;
    the pairs batched."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor
    url = rgbd_service.url

    def predict(rgb):
        files = [("rgb", ("rgb.png", rgb.read_bytes())),
                 ("depth", ("xyz.tiff", (rgb.parent.parent / "xyz" / f"{rgb.stem}.tiff").read_bytes()))]
        return httpx.post(url + "/predict", files=files, timeout=60).json()["images"][0]["score"]
    paired = [p for p in sorted(pair_folder.glob("*/rgb/*.png")) if p.as_posix()[-16:] != "good/rgb/001.png"]
    with ThreadPoolExecutor(len(paired)) as pool:
        want = {p.relative_to(pair_folder).as_posix(): s for p, s in zip(paired, pool.map(predict, paired))}
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    def cards(prefix="", done="pairs scored"):  # once the status says so: {name less prefix: score or error}
        page.wait_for_function(f"document.querySelector('#status').textContent.includes({done!r})")
        out = {}
        for c in page.query_selector_all("#cards .card"):
            name = c.query_selector(".name").inner_text()
            assert name.startswith(prefix)
            error = c.query_selector(".error")
            out[name[len(prefix):]] = error.inner_text() if error else float(c.get_attribute("data-score"))
        return out

    def check(found):
        assert found.keys() - want.keys() == {"good/rgb/001.png"} and len(found) == len(want) + 1
        assert "good/xyz/001.tiff" in found.pop("good/rgb/001.png")
        assert found == pytest.approx(want, rel=1e-5, abs=1e-6)

    before = httpx.get(url + "/health").json()["batches"]
    page.goto(url + "/")
    check(cards())  # the --review folder
    assert "RGB + depth" in page.inner_text("#drop-hint") and not page.is_visible("#pick-files-button")
    img = page.query_selector("#cards .card img")
    assert img.evaluate("i => i.naturalWidth > 1.3 * i.naturalHeight")  # the RGB image and the depth side by side
    batches = httpx.get(url + "/health").json()["batches"]
    assert any(int(k) > 1 and n > before.get(k, 0) for k, n in batches.items()), batches  # pairs in flight, batched
    page.screenshot(path=str(tmp_path / "pairs.png"), full_page=True)
    page.click("#clear")
    page.evaluate("document.querySelector('#status').textContent = ''")
    page.set_input_files("#pick-folder", str(pair_folder))
    check(cards("dome_test/"))
    page.click("#clear")
    page.evaluate("document.querySelector('#status').textContent = ''")
    rgb = pair_folder / "dent" / "rgb" / "000.png"
    page.set_input_files("#pick-rgb", str(rgb))
    page.set_input_files("#pick-second", str(pair_folder / "dent" / "xyz" / "000.tiff"))
    page.click("#score-pair")
    assert cards(done="pair 000.png scored") == pytest.approx({"000.png": want["dent/rgb/000.png"]}, rel=1e-5, abs=1e-6)
    assert not errors, errors
