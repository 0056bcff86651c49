"""Dinomaly2: the model's parts against float64 references written from the preview code's definitions, the
recipe's optimiser groups and schedule, few-shot selection and augmentation against a direct reading of the
preview's procedure, and the scripts end to end with reloading, predict and export."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from dinomaly import checkpoints, cli, fewshot, models, recipes, train
from dinomaly.dataset import IMAGENET_MEAN, IMAGENET_STD, Sample
from dinomaly.models.vitill import GROUPINGS
from dinomaly.optimizers import WarmupRatioSchedule

import dinomaly2_2d
import dinomaly2_fewshot
from conftest import TINY, TINY_CFG

D = TINY_CFG.embed_dim


def dinomaly2(lc=2, la=1, dropout=0.0):
    torch.manual_seed(0)
    model = models.ViTill(TINY_CFG, dropout=dropout, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True, lc=lc,
                          linear_attention=bool(la))
    for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]:
        nn.init.normal_(p, std=0.05)  # non-trivial weights (the official initialisation is nearly zero)
    return model.eval()


def test_two_stage_bottleneck_has_the_preview_layout_and_maths():
    model = dinomaly2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("bottleneck.")}
    assert shapes == {"bottleneck.0.0.weight": (256, D), "bottleneck.0.0.bias": (256,),
                      "bottleneck.1.0.weight": (4 * D, 256), "bottleneck.1.0.bias": (4 * D,),
                      "bottleneck.1.3.weight": (D, 4 * D), "bottleneck.1.3.bias": (D,)}
    x = torch.randn(2, 5, D)
    w = {k: v.double() for k, v in model.state_dict().items() if k.startswith("bottleneck.")}
    h = x.double() @ w["bottleneck.0.0.weight"].T + w["bottleneck.0.0.bias"]  # D -> 256, no activation
    h = h @ w["bottleneck.1.0.weight"].T + w["bottleneck.1.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    expected = h @ w["bottleneck.1.3.weight"].T + w["bottleneck.1.3.bias"]
    torch.testing.assert_close(model.bottleneck(x).double(), expected, rtol=1e-5, atol=1e-6)
    # dropout: after the first layer, after the GELU and at the end, not on the input
    drops = [type(m).__name__ for m in model.bottleneck.modules() if isinstance(m, (nn.Dropout, nn.Linear, nn.GELU))]
    assert drops == ["Linear", "Dropout", "Linear", "GELU", "Dropout", "Linear", "Dropout"]


@pytest.mark.parametrize("lc", sorted(GROUPINGS))
def test_recentred_targets_and_groups_against_float64(lc):
    model = dinomaly2(lc=lc)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        taps = model.encoder(x)
        en, de = model(x)
    p = model.encoder.num_prefix_tokens
    assert len(en) == len(de) == len(GROUPINGS[lc])
    for g, e in zip(GROUPINGS[lc], en):
        group = torch.stack([taps[i].double() for i in g]).mean(0)
        t = group[:, p:] - group[:, :1]  # patch tokens minus the group's CLS token
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-8)
        expected = t.transpose(1, 2).reshape(2, D, 4, 4)
        torch.testing.assert_close(e.double(), expected, rtol=1e-4, atol=1e-4)


def test_recentering_off_gives_the_raw_patch_tokens():
    model = dinomaly2()
    model.recenter = False
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        taps = model.encoder(x)
        en, _ = model(x)
    raw = torch.stack(taps[:4]).mean(0)[:, model.encoder.num_prefix_tokens:]
    torch.testing.assert_close(en[0], raw.transpose(1, 2).reshape(1, D, 4, 4))


def test_softmax_attention_option_is_standard_attention():
    model = dinomaly2(la=0)
    blk = model.decoder[0]
    x = torch.randn(1, 7, D)
    qkv = (blk.norm1(x) @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(1, 7, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
    q, k, v = (t.double() for t in qkv)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // 2), dim=-1) @ v
    expected = a.transpose(1, 2).reshape(1, 7, D) @ blk.attn.proj.weight.double().T + blk.attn.proj.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(blk.attn(blk.norm1(x)).double(), expected, rtol=1e-5, atol=1e-6)


def test_optimizer_groups_and_amsgrad():
    model = dinomaly2()
    opt = train.reconstruction_optimizer(model, recipes.DINOMALY2)
    ids = [[id(p) for p in g["params"]] for g in opt.param_groups]
    assert ids == [[id(p) for p in model.bottleneck[0].parameters()], [id(p) for p in model.bottleneck[1].parameters()],
                   [id(p) for p in model.decoder.parameters()]]
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-3, 2e-3]
    assert all(g["amsgrad"] is False and g["eps"] == 1e-10 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    assert train.reconstruction_optimizer(dinomaly2(), recipes.DINOMALY).param_groups[0]["amsgrad"] is True


def test_schedule_warmup_then_cosine_to_the_ratio():
    # the numbers of the preview code's WarmupCosineScheduler, run with warm-up 1, T 10, r 0.1
    model = dinomaly2()
    opt = train.reconstruction_optimizer(model, recipes.DINOMALY2)
    schedule = WarmupRatioSchedule(10, warmup_iters=1, final_ratio=0.1)
    seen = []
    for it in range(3):
        schedule.apply(opt, it)
        seen.append([g["lr"] for g in opt.param_groups])
    assert seen[0] == [0, 0, 0] and seen[1] == pytest.approx([2e-4, 2e-3, 2e-3], rel=1e-12)
    assert seen[2] == pytest.approx([1.9457e-4, 1.9457e-3, 1.9457e-3], rel=1e-4)
    # the default: warm-up lr0 * it / 100, then constant
    s = WarmupRatioSchedule(40000)
    assert [s(it) for it in (0, 1, 99, 100, 20000, 39999)] == pytest.approx([0, 0.01, 0.99, 1, 1, 1], abs=1e-15)
    assert train.reconstruction_schedule(recipes.DINOMALY2)(50) == 0.5


def class_folder(root, name, n):
    folder = root / name / "train" / "good"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(folder / f"{i:03d}.png")
    return [Sample(str(folder / f"{i:03d}.png"), 0, None, name) for i in range(n)]


def test_shot_selection_is_the_preview_random_sample(tmp_path):
    samples = class_folder(tmp_path, "brick", 3) + class_folder(tmp_path, "coffee", 3)
    names = [os.path.basename(s.image_path) for s in fewshot.select_shots(samples, 1, 1)]
    assert names == ["000.png", "002.png"]  # what the preview code chose (run on these folders)
    names = [os.path.basename(s.image_path) for s in fewshot.select_shots(samples, 2, 1)]
    assert names == ["000.png", "002.png", "001.png", "000.png"]
    # the direct reading: seed Python's global stream, then random.sample class after class, sorted files
    samples = class_folder(tmp_path, "a", 17) + class_folder(tmp_path, "b", 9) + class_folder(tmp_path, "c", 12)
    random.seed(7)
    expected = [p for c in ("a", "b", "c") for p in random.sample([s.image_path for s in samples
                                                                   if s.class_name == c], 4)]
    assert [s.image_path for s in fewshot.select_shots(samples, 4, 7)] == expected
    with pytest.raises(Exception, match="--shot 10 is more than the 9 training images of class b"):
        fewshot.select_shots(samples, 10, 7)


def preview_strong_transform(size, crop):
    """The preview's get_strong_transforms, written from its definition."""
    scale = (crop / size) ** 2

    class RandomRotate90:
        def __call__(self, img):
            return TF.rotate(img, random.choice([0, 90, 180, 270]))

    return T.Compose([T.Resize((size, size)), T.RandomResizedCrop((crop, crop), scale=(scale, scale),
                                                                  ratio=(0.95, 1.05)),
                      RandomRotate90(), T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_strong_augmentation_is_the_preview_transform(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
    data = fewshot.AugmentedDataset([Sample(str(path), 0, None, "x")] * 40, 64, 56, seed=3)
    reference = preview_strong_transform(64, 56)
    for i in range(40):
        seed = int(np.random.SeedSequence([3, 0, i]).generate_state(1)[0])
        torch.manual_seed(seed)
        random.seed(seed)
        torch.testing.assert_close(data[i], reference(Image.open(path).convert("RGB")), rtol=0, atol=0)
    # the image cache (--cache_images) gives the same tensors
    from dinomaly.image_cache import build_cache
    for mode in ("memory", "disk"):
        cache = build_cache(mode, [str(path)], 64, str(tmp_path / "cache"))
        cached = fewshot.AugmentedDataset([Sample(str(path), 0, None, "x")] * 40, 64, 56, seed=3, cache=cache)
        assert all(torch.equal(cached[i], data[i]) for i in (0, 7, 39))
    # items are a function of (seed, epoch, index): the same twice, another epoch another draw
    torch.testing.assert_close(data[5], data[5], rtol=0, atol=0)
    assert torch.equal(data[5], data[(0, 5)]) and not torch.equal(data[5], data[(1, 5)])


def test_epoch_keyed_items_reach_workers_that_live_across_epochs(tmp_path):
    """The training loader's workers persist across epochs: the sampler hands each item's epoch with its index,
    so every batch of epoch e holds exactly the items data[(e, i)] in the sampler's order for e, as the
    loader of one process computes them, with or without the loss of an epoch's first batches (a resume)."""
    from dinomaly.train_state import EpochSampler
    paths = []
    for k in range(6):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    data = fewshot.AugmentedDataset([Sample(p, 0, None, "x") for p in paths], 40, 28, seed=5)
    sampler = EpochSampler(data, world_size=1, rank=0, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    workers = set()
    for epoch, skip in ((0, 0), (1, 0), (2, 2), (3, 0)):
        sampler.set_epoch(epoch, skip=skip)
        order = list(torch.randperm(6, generator=torch.Generator().manual_seed(5 + epoch)))[skip:]
        batches = list(loader)
        workers.add(id(loader._iterator))
        assert len(batches) == len(order) // 2
        for b, batch in enumerate(batches):
            expected = torch.stack([data[(epoch, int(i))] for i in order[2 * b:2 * b + 2]])
            assert torch.equal(batch, expected)
    assert len(workers) == 1  # one set of worker processes for all the epochs


def test_strong_augmentation_distributions(tmp_path):
    """Rotations, flips and crop geometry over many items: what the preview's parameters give."""
    data = fewshot.AugmentedDataset([], 448, 392, seed=1)
    img = Image.new("RGB", (448, 448))
    sizes, angles, flips = [], [], []
    for i in range(400):
        seed = int(np.random.SeedSequence([1, 0, i]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            top, left, h, w = data.crop.get_params(img, data.crop.scale, data.crop.ratio)
            flips.append(torch.rand(1).item() < 0.5)
        sizes.append((h, w))
        angles.append(random.Random(seed).choice(fewshot.ROTATIONS))
    areas = np.array([h * w for h, w in sizes]) / 392 ** 2
    assert np.all(np.abs(areas - 1) < 0.03)  # the fixed area, up to rounding
    ratios = np.array([w / h for h, w in sizes])
    assert ratios.min() > 0.94 and ratios.max() < 1.06 and ratios.std() > 0.01
    counts = np.bincount([a // 90 for a in angles], minlength=4)
    assert counts.min() > 70  # each of the four angles about 100 times of 400
    assert 160 < sum(flips) < 240


# ----------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def demo(demo64):
    return demo64


SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "64", "--crop_size", "56", "--num_workers",
         "0", "--device", "cpu", "--classes", "weave", "nut", "--batch_size", "4", "--log_every", "1"]


def run_script(module, argv, save_name):
    cli.run_script(module, ["--save_name", save_name, *argv])


@pytest.fixture(scope="module")
def d2_run(demo, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        run_script(dinomaly2_2d, ["--data_path", demo["mvtec"], "--total_iters", "3", "--save_dir", str(save_dir),
                                  *SMALL], "d2")
    return save_dir / "d2"


def test_2d_run_records_the_method_and_reloads(d2_run, demo, tmp_path):
    config = json.loads((d2_run / "config.json").read_text())
    expected = dict(method="dinomaly2", setting="multi-class", lc=2, cr=1, la=1, attn_eps=1e-8, dropout=0.4)
    assert {k: config["model"][k] for k in expected} == expected
    sd = torch.load(d2_run / "model.pth", weights_only=True)
    assert "bottleneck.0.0.weight" in sd and "bottleneck.1.3.weight" in sd
    assert "iter [2/3], loss" in (d2_run / "log.txt").read_text()
    assert "lr: 2e-05" in (d2_run / "log.txt").read_text()  # the decoder's rate at iteration 1: 2e-3 * 1 / 100
    run_script(dinomaly2_2d, ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(d2_run),
                              "--save_dir", str(tmp_path), "--save_name", "again", *SMALL[2:]], "unused")
    first = (d2_run / "scores.csv").read_text().splitlines()
    again = (tmp_path / "again" / "scores.csv").read_text().splitlines()
    np.testing.assert_allclose([float(r.split(",")[-1]) for r in again[1:]],
                               [float(r.split(",")[-1]) for r in first[1:]], rtol=1e-6)


def test_a_preview_checkpoint_without_config_loads_as_dinomaly2(d2_run, tmp_path):
    """The preview saves a bare state dict (ModuleList bottleneck, Meta encoder keys): strict load, Dinomaly2's
    settings from the keys."""
    sd = torch.load(d2_run / "model.pth", weights_only=True)
    preview = nn.ModuleList([nn.Sequential(nn.Linear(D, 256), nn.Dropout(0.4)),
                             nn.Sequential(nn.Linear(256, 4 * D), nn.GELU(), nn.Dropout(0.4), nn.Linear(4 * D, D),
                                           nn.Dropout(0.4))])
    assert set(preview.state_dict()) == {k[len("bottleneck."):] for k in sd if k.startswith("bottleneck.")}
    torch.save(sd, tmp_path / "model.pth")
    model, recipe = checkpoints.load_trained(str(tmp_path / "model.pth"), {}, "dinomaly")
    assert recipe.method == "dinomaly2" and model.recenter and recipe.attn_eps == 1e-8
    assert model.decoder[0].attn.eps == 1e-8


def test_fewshot_run_lists_its_shots(demo, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        run_script(dinomaly2_fewshot, ["--data_path", demo["mvtec"], "--total_iters", "2", "--shot", "2",
                                       "--save_dir", str(tmp_path), *SMALL], "fs")
    assert json.loads((tmp_path / "fs" / "config.json").read_text())["model"]["setting"] == "2-shot"
    lines = (tmp_path / "fs" / "shots.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["weave", "weave", "nut", "nut"]
    log_text = (tmp_path / "fs" / "log.txt").read_text()
    assert "2-shot training set (4 images)" in log_text and "train images: 4" in log_text
    assert all(ln.split("\t")[1] in log_text for ln in lines)


def test_predict_and_export_follow_a_dinomaly2_run(d2_run, demo, tmp_path):
    from dinomaly.predict import Detector
    det = Detector(str(d2_run), device="cpu", class_name="nut")
    image = os.path.join(demo["mvtec"], "nut", "test", "good", os.listdir(os.path.join(demo["mvtec"], "nut", "test",
                                                                                         "good"))[0])
    p = det(image)
    rows = (d2_run / "scores.csv").read_text().splitlines()
    expected = next(float(r.split(",")[-1]) for r in rows if r.split(",")[1] == image)
    assert p.score == pytest.approx(expected, rel=1e-5)
    assert det.mapper.model.recenter and isinstance(det.mapper.model.bottleneck[0], nn.Sequential)
    # export: the ONNX graph computes the same map and score (onnxruntime)
    import onnxruntime
    path = tmp_path / "d2.onnx"
    cli.export_main(["--checkpoint", str(d2_run), "--out", str(path)])
    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        want_map, want_score = det.mapper((x - mean) / std)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_map, got_score = session.run(["anomaly_map", "score"], {"image": x.numpy()})
    np.testing.assert_allclose(got_map, want_map.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_score, want_score.numpy(), atol=1e-4, rtol=0)


def test_interrupted_fewshot_run_resumes_bit_exactly(demo, tmp_path, monkeypatch):
    """Ctrl-C in epoch 1 of a few-shot run (3 batches an epoch; strong augmentation per epoch, dropout, three
    parameter groups, the warm-up schedule), then --resume: the weights of an uninterrupted run."""
    monkeypatch.setitem(models.ENCODERS, TINY, TINY_CFG)
    argv = ["--data_path", demo["mvtec"], "--total_iters", "5", "--shot", "3", "--save_dir", str(tmp_path),
            "--save_every", "2", *SMALL[:-4], "--batch_size", "2", "--log_every", "1"]
    run_script(dinomaly2_fewshot, [*argv, "--save_name", "whole"], "unused")
    step = train.train_step

    def interrupted(batch, it, *args, **kwargs):
        if it == 2:  # the flag is read with the next step: the state after iteration 4 is saved
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return step(batch, it, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as e:
        run_script(dinomaly2_fewshot, [*argv, "--save_name", "cut"], "unused")
    assert e.value.code == 130
    monkeypatch.setattr(train, "train_step", step)
    assert torch.load(tmp_path / "cut" / "train_state.pth", weights_only=True)["iteration"] == 4
    run_script(dinomaly2_fewshot, [*argv, "--save_name", "cut", "--resume"], "unused")
    whole = torch.load(tmp_path / "whole" / "model.pth", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "model.pth", weights_only=True)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
