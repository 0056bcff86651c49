"""Conformance of our Dinomaly2 with the authors' preview code (guojiajeremy/Dinomaly2 at 1745c61), on the CPU.

    python conformance/dinomaly2_preview.py --preview /path/to/Dinomaly2

Imports the preview's own modules from --preview (models/uad.py, models/vision_transformer.py, its vendored
dinov2, utils.py, dataset.py, optimizers/StableAdamW.py; packages it imports but these checks do not need, such as
pandas or natsort when missing, are replaced by stubs), builds its 2D model with a random DINOv2-reg ViT-S encoder
(the preview's load() would download Meta's weights; the vendored ViT is built directly with load()'s arguments),
copies the same weights into ours (strict loads both ways), then compares in float32:

- encoder taps, recentred targets and decoder outputs (eval mode, and train mode with the same dropout draws);
- anomaly maps and image scores: our AnomalyMapper against the preview's evaluation_batch (its maps and scores
  captured where it hands them to the metrics);
- N training steps on the same batches: the preview's loop body (forward, global_cosine_hm_percent with the p
  ramp, zero_grad, backward, clip_grad_norm 0.1, its StableAdamW with three groups, WarmupCosineScheduler)
  against train.train_step with our optimiser and schedule; the dropout generator is seeded identically before
  each forward. In float32 and, side by side, in float64: float64 shows whether the formulas agree; float32
  gaps are set against the preview's own float32 rounding (its float32 run against its float64 run), which
  Adam's normalised early steps amplify (a gradient that is zero but for rounding, such as the key bias's
  under softmax attention, gets a full-size update of random sign); and the float32 steps again with our
  encoder's attention computed in the preview's order (preview_attention_order), which separates the encoder's
  attention kernel from the training step itself;
- the few-shot selection (random.seed(1), ImageFolder, random.sample) against fewshot.select_shots, and the
  strong augmentation (get_strong_transforms under our per-item seeding) against fewshot.AugmentedDataset,
  pixel for pixel, on a generated folder; the plain test transform too;
- the variants --la 0, --lc 0/1/3/4/11/12/14, --cr 0 (forward, maps; for --la 0 and --cr 0 a few float64
  training steps); the class lists and their order against dinomaly_fewshot.py's;
- RGB + depth: the preview's DinomalyRGBD (dinomaly_mvtec3d.py's build) against ViTill(modality="rgbd"): strict
  loads, forward, maps and scores, training steps of its loop (two groups at 2e-3) in float32 and float64; its gap
  filling and padding (run from its preprocess_mvtec3d_2.py / _1.py source) against dinomaly/depth.py on
  generated point clouds, and its MVTec3DDataset against our reader on a folder prepared by
  prepare_data/prepare_mvtec3d.py, input for input;
- RGB + infrared: the preview's Dinomaly forward on cat([rgb, infrared]) and its evaluation_batch_rgbinfra (maps of
  both modalities, object scores and labels) against our model with modality "rgbir" and its pair score (the
  mean of the two: twice it is the preview's sum); training steps of dinomaly_mulsen.py's loop against ours on
  the pairs, as for 2D; its MulSen-AD reader (dataset_mulsen.py's TrainDataset and
  TestDataset) against ours on a folder of prepare_data/make_demo_pairs.py, pair for pair (labels, RGB and
  infrared tensors, masks), and on altered copies that show its defects. dataset_mulsen.py imports open3d and
  calls it only for depth maps, which dinomaly_mulsen.py does not ask for: without open3d a stub stands in that
  fails on any use; with it (e.g. pip install --target DIR open3d; PYTHONPATH=DIR) the generated point clouds are
  also read through it.

Prints a table of the gaps and exits with status 1 when a check misses its target. Nothing of the preview is
copied here: its modules are imported, and only the order of the calls of its training loop is restated.
"""
import argparse
import contextlib
import copy
import importlib
import math
import os
import random
import sys
import tempfile
import time
import types
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dinomaly import dataset as our_ds  # noqa: E402
from dinomaly import fewshot, recipes, train  # noqa: E402
from dinomaly.anomaly_map import AnomalyMapper  # noqa: E402
from dinomaly.loss import global_cosine_hm, hard_mining_factor  # noqa: E402
from dinomaly.models import ENCODERS, ViTill  # noqa: E402
from dinomaly.optimizers import WarmupRatioSchedule  # noqa: E402

ENCODER = "dinov2reg_vit_small_14"
EMBED, HEADS, TAPS = 384, 6, [2, 3, 4, 5, 6, 7, 8, 9]  # the 2D script's ViT-S settings
LC_GROUPS = {0: [[0], [1], [2], [3], [4], [5], [6], [7]], 1: [list(range(8))], 2: [[0, 1, 2, 3], [4, 5, 6, 7]],
             3: [[0, 1, 2], [3, 4, 5], [6, 7]], 4: [[0, 1], [2, 3], [4, 5], [6, 7]], 11: [[7]], 12: [[3], [7]],
             14: [[1], [3], [5], [7]]}  # dinomaly_2D.py's --lc table, restated to build the preview's model


# ----------------------------------------------------------------------------------------------- the preview

def load_preview(path: str) -> types.SimpleNamespace:
    """The preview's modules, imported from `path` under their own top-level names (models, utils, dataset,
    optimizers, ...; ours live in the package `dinomaly`), with stubs for the packages it imports and does not
    need here."""
    if not os.path.isfile(os.path.join(path, "models", "uad.py")):
        raise SystemExit(f"--preview {path}: no models/uad.py there; pass the preview code's folder "
                         f"(git archive 1745c61 of guojiajeremy/Dinomaly2)")
    stubs = []
    for name, attrs in (("pandas", {"DataFrame": object}), ("natsort", {"natsorted": sorted}),
                        ("tifffile", {}), ("xformers", None)):
        if name in sys.modules or attrs is None:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.SimpleNamespace(**attrs)
            stubs.append(name)
    os.environ.setdefault("XFORMERS_DISABLED", "1")  # the vendored DINOv2's plain attention
    sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                importlib.import_module("adeval")
            except Exception:  # its CUDA evaluator is not needed here
                sys.modules["adeval"] = types.SimpleNamespace(EvalAccumulatorCuda=None)
                stubs.append("adeval")
            p = types.SimpleNamespace(
                uad=importlib.import_module("models.uad"),
                vt=importlib.import_module("models.vision_transformer"),
                utils=importlib.import_module("utils"),
                dataset=importlib.import_module("dataset"),
                sadam=importlib.import_module("optimizers.StableAdamW"),
                dinov2=importlib.import_module("dinov2.models.vision_transformer"),
                stubs=stubs)
    finally:
        sys.path.remove(path)
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import default_loader
    p.ImageFolder, p.default_loader = ImageFolder, default_loader  # what the preview's ImageFolder reads with
    return p


@contextlib.contextmanager
def fast_init(P):
    """Truncated-normal initialisation replaced by a clamped normal, and Linear layers' default initialisation
    skipped, while models are built whose weights are all set afterwards (random encoder weights, the
    trainable parts' init_weights, or strict loads); on a busy CPU the 37M draws of two ViT-S models take tens
    of seconds."""
    from dinomaly.models import vit as our_vit

    def clamped_normal(t, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        with torch.no_grad():
            return t.normal_(mean, std, generator=generator).clamp_(a, b)
    places = [(torch.nn.init, "trunc_normal_"), (P.uad, "trunc_normal_"), (P.dinov2, "trunc_normal_"),
              (our_vit, "trunc_normal_"), (nn.Linear, "reset_parameters")]
    saved = [getattr(m, n) for m, n in places]
    for m, n in places[:-1]:
        setattr(m, n, clamped_normal)
    nn.Linear.reset_parameters = lambda self: None  # left uninitialised: every Linear is set afterwards
    try:
        yield
    finally:
        for (m, n), f in zip(places, saved):
            setattr(m, n, f)


@contextlib.contextmanager
def preview_attention_order(ours):
    """Our encoder's softmax attention computed in the preview's order, softmax(q * scale @ k^T) @ v (timm's
    unfused path, as the preview's vendored DINOv2 without xFormers), instead of scaled_dot_product_attention,
    whose fused kernel rounds otherwise (float32 taps ~5e-7 relative apart): this separates the encoder's kernel
    from everything after it. Only here; our runs keep the fused kernel (faster, less memory on a GPU)."""
    blocks = ours.encoder.blocks
    saved = [b.attn.fused_attn for b in blocks]
    for b in blocks:
        b.attn.fused_attn = False
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            b.attn.fused_attn = f


def preview_encoder(P):
    """The vendored DINOv2 ViT-S/14 with 4 registers, built with the preview's load() arguments."""
    return P.dinov2.vit_small(patch_size=14, img_size=518, block_chunks=0, init_values=1e-8,
                              num_register_tokens=4, interpolate_antialias=False, interpolate_offset=0.1)


def preview_model(P, la=1, lc=2, cr=1, dropout=0.4, encoder=None):
    """The preview's 2D model as dinomaly_2D.py:train builds it (ViT-S), initialised by its init_weights."""
    encoder = preview_encoder(P) if encoder is None else encoder
    bottleneck = nn.ModuleList([
        nn.Sequential(nn.Linear(EMBED, 256), nn.Dropout(p=dropout)),
        nn.Sequential(nn.Linear(256, EMBED * 4), nn.GELU(), nn.Dropout(p=dropout), nn.Linear(EMBED * 4, EMBED),
                      nn.Dropout(p=dropout))])
    attn = partial(P.vt.LinearAttention2, eps=1e-8) if la else P.vt.Attention
    decoder = nn.ModuleList([P.vt.Block(dim=EMBED, num_heads=HEADS, mlp_ratio=4., qkv_bias=True,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-8), attn=attn) for _ in range(8)])
    model = P.uad.Dinomaly(encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=TAPS,
                           remove_class_token=False, fuse_layer_encoder=LC_GROUPS[lc],
                           fuse_layer_decoder=LC_GROUPS[lc], context_aware_recenter=cr)
    model.init_weights()
    return model


def our_model(la=1, lc=2, cr=1, dropout=0.4):
    return ViTill(ENCODERS[ENCODER], dropout=dropout, attn_eps=1e-8, bottleneck_kind="two_stage",
                  recenter=bool(cr), lc=lc, linear_attention=bool(la))


@torch.no_grad()
def randomise(module: nn.Module, seed: int, gamma=(0.05, 0.3)):
    """Weights with structure (random encoders at init are near-identity: LayerScale 1e-8): matrices
    N(0, 1.5^2 / fan_in), biases N(0, 0.02^2), norms 1 + N(0, 0.1^2), LayerScale U(gamma), tokens N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.named_parameters():
        if name.endswith(".gamma"):
            t.copy_(torch.empty_like(t).uniform_(*gamma, generator=g))
        elif "norm" in name and name.endswith(".weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
        elif t.ndim >= 2 and "token" not in name and "pos_embed" not in name:
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=g) * 1.5 / math.sqrt(fan_in))
        elif t.ndim == 1:
            t.copy_(0.02 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(0.5 * torch.randn(t.shape, generator=g))


def strict_both_ways(prev: nn.Module, ours: nn.Module) -> str:
    """Same keys and shapes; each loads the other's state dict with strict=True. Returns a note."""
    a, b = prev.state_dict(), ours.state_dict()
    if list(a) != list(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if missing or extra:
            raise AssertionError(f"key sets differ: preview only {missing[:5]}, ours only {extra[:5]}")
    bad = [k for k in a if a[k].shape != b[k].shape]
    if bad:
        raise AssertionError(f"shapes differ: {bad[:5]}")
    ours.load_state_dict(a, strict=True)  # ours now holds the preview's weights
    prev.load_state_dict(ours.state_dict(), strict=True)
    return f"{len(a)} keys, same order" if list(a) == list(b) else f"{len(a)} keys (order differs)"


# ----------------------------------------------------------------------------------------------- inputs

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def generated_images(n: int, size: int, seed: int) -> torch.Tensor:
    """n normalised RGB images [n, 3, size, size]: smooth gradients and stripes, some with a bright blob."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        f = 2 + 6 * torch.rand(3, generator=g)
        ph = 6.28 * torch.rand(3, generator=g)
        img = torch.stack([0.5 + 0.3 * torch.sin(f[c] * 6.28 * (xx + 0.3 * c * yy) + ph[c]) for c in range(3)])
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        if i % 2:  # a defect
            cy, cx = (0.2 + 0.6 * torch.rand(2, generator=g)).tolist()
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.005)
            img = img * (1 - blob) + blob * torch.tensor([1.0, 0.2, 0.1])[:, None, None]
        imgs.append(img.clamp(0, 1))
    x = torch.stack(imgs)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def write_folder(root: str, counts: dict, size=(48, 40)):
    """An MVTec-layout training folder <root>/<class>/train/good/NNN.png of generated images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        d = os.path.join(root, cls, "train", "good")
        os.makedirs(d)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            arr[: size[1] // 2, : size[0] // 3] = (40 * i) % 256  # something not symmetric
            Image.fromarray(arr).save(os.path.join(d, f"{i:03d}.png"))


# ----------------------------------------------------------------------------------------------- comparisons

def max_abs(a, b) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b, strict=True))


def max_rel(a, b) -> float:
    return max(((x.detach() - y.detach()).norm() / y.detach().norm().clamp_min(1e-30)).item()
               for x, y in zip(a, b, strict=True))


def tap_hooks(blocks, taps, store):
    return [blocks[i].register_forward_hook(lambda m, inp, out, i=i: store.__setitem__(i, out.detach()))
            for i in taps]


def compare_forward(prev, ours, x, train=False, seed=0):
    """Encoder taps, en (targets) and de of one forward; in train mode both after torch.manual_seed(seed).
    Returns a dict of max abs / relative gaps and whether the generator state after the forward agrees."""
    st_p, st_o = {}, {}
    hooks = tap_hooks(prev.encoder.blocks, TAPS, st_p) + tap_hooks(ours.encoder.blocks, TAPS, st_o)
    prev.train(train), ours.train(train)
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            en_p, de_p = prev(x)
            rng_p = torch.get_rng_state()
            torch.manual_seed(seed)
            en_o, de_o = ours(x)
            rng_o = torch.get_rng_state()
    finally:
        for h in hooks:
            h.remove()
    taps_p, taps_o = [st_p[i] for i in TAPS], [st_o[i] for i in TAPS]
    return dict(taps=max_abs(taps_o, taps_p), taps_rel=max_rel(taps_o, taps_p), en=max_abs(en_o, en_p),
                en_rel=max_rel(en_o, en_p), de=max_abs(de_o, de_p), de_rel=max_rel(de_o, de_p),
                de_scale=max(d.abs().max().item() for d in de_p), rng_same=torch.equal(rng_p, rng_o),
                shapes=[tuple(e.shape) for e in en_p])


def preview_maps_scores(P, prev, x):
    """The preview's evaluation_batch on images x (batches of 2), its smoothed 256x256 maps and top-1 % scores
    captured where it hands them to compute_pro and roc_auc_score."""
    captured = {}
    u = P.utils
    saved = {k: getattr(u, k) for k in ("compute_pro", "roc_auc_score", "average_precision_score", "f1_score_max")}

    def compute_pro(masks, amaps, *a, **k):
        captured["maps"] = np.array(amaps)
        return 0.0

    def roc_auc_score(y, s):
        captured.setdefault("roc", []).append(np.array(s))
        return 0.0
    u.compute_pro, u.roc_auc_score = compute_pro, roc_auc_score
    u.average_precision_score = lambda y, s: 0.0
    u.f1_score_max = lambda y, s: 0.0
    try:
        labels = torch.arange(len(x)) % 2
        gts = torch.zeros(len(x), 1, x.shape[-2], x.shape[-1])
        batches = [(x[i:i + 2], gts[i:i + 2], labels[i:i + 2], [f"img{j}" for j in range(i, i + 2)])
                   for i in range(0, len(x), 2)]
        u.evaluation_batch(prev, batches, "cpu", max_ratio=0.01, resize_mask=256)
    finally:
        for k, v in saved.items():
            setattr(u, k, v)
    scores = next(s for s in captured["roc"] if s.shape == (len(x),))
    return torch.from_numpy(captured["maps"]), torch.from_numpy(scores)


def our_maps_scores(ours, x):
    ours.eval()
    mapper = AnomalyMapper(ours, max_ratio=0.01, precision="fp32")
    with torch.no_grad():
        amap, score = mapper(x)
    return amap[:, 0], score


def preview_steps(P, prev, batches, seeds, total_iters, warmup=100, final_ratio=1.0, p_offset=0):
    """The preview's loop body (dinomaly_2D.py:train) on `batches`, the dropout generator seeded with seeds[it]
    before each forward. Yields the optimiser, then after each step (loss, lrs of the step, trainable parameters,
    generator state after the forward)."""
    trainable = nn.ModuleList([prev.bottleneck, prev.decoder])
    optimizer = P.sadam.StableAdamW([{"params": prev.bottleneck[0].parameters(), "lr": 2e-4},
                                     {"params": prev.bottleneck[1].parameters()},
                                     {"params": prev.decoder.parameters()}],
                                    lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=False, eps=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = P.utils.WarmupCosineScheduler(optimizer, final_ratio=final_ratio, total_epochs=total_iters,
                                              warmup_epochs=warmup)
    yield optimizer
    prev.train()
    for it, img in enumerate(batches):
        lrs = [g["lr"] for g in optimizer.param_groups]
        torch.manual_seed(seeds[it])
        en, de = prev(img)
        rng = torch.get_rng_state()
        p = min(0.9 * (it + p_offset) / 1000, 0.9)
        loss = P.utils.global_cosine_hm_percent(en, de, p=p, factor=0.1)
        optimizer.zero_grad()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nn.utils.clip_grad_norm(trainable.parameters(), max_norm=0.1)
        optimizer.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched.step()
        yield loss.item(), lrs, list(trainable.parameters()), rng


def our_steps(ours, batches, seeds, total_iters, warmup=None, final_ratio=1.0, p_offset=0, recipe=recipes.DINOMALY2):
    """Our training steps (train.train_step with the recipe's optimiser and schedule); yields as preview_steps."""
    params = ours.trainable_parameters()
    recipe = recipe.replace(total_iters=total_iters, lr_decay_ratio=final_ratio)
    optimizer = train.reconstruction_optimizer(ours, recipe)
    schedule = train.reconstruction_schedule(recipe) if warmup is None \
        else WarmupRatioSchedule(total_iters, warmup, final_ratio)
    rngs = []

    def loss_fn(batch, it):
        torch.manual_seed(seeds[it])
        en, de = ours(batch)
        rngs.append(torch.get_rng_state())
        return global_cosine_hm(en, de, p=hard_mining_factor(it + p_offset, recipe.hm_max_p, recipe.hm_ramp_iters),
                                factor=recipe.hm_factor)
    yield optimizer
    ours.train()
    for it, img in enumerate(batches):
        loss, updated, _, _ = train.train_step(img, it, loss_fn, params, optimizer, schedule, recipe.clip_norm, False)
        assert updated
        yield loss.item(), [g["lr"] for g in optimizer.param_groups], params, rngs[-1]


def weight_gaps(w, ref, w0):
    """Max over tensors of ||w - ref|| / ||ref|| and of ||w - ref|| / ||ref - w0|| (relative to the change
    training has made so far; tensors not moved yet are skipped)."""
    with torch.no_grad():
        rel_w = max_rel(w, ref)
        moved = [(r - z).norm().item() for r, z in zip(ref, w0)]
        rel_upd = max(((x - r).norm().item() / m for x, r, m in zip(w, ref, moved) if m > 0), default=0.0)
    return rel_w, rel_upd


def compare_training(prev, ours, P, steps, batch, crop, seed, dtypes=(torch.float32,), pairs=False,
                     recipe=recipes.DINOMALY2, **kw):
    """Both models trained `steps` steps on the same batches and dropout draws, step by step side by side, once
    per dtype (the first on `prev` and `ours` moved to it, the others on copies). `pairs`: each batch is `batch`
    RGB + infrared pairs, the preview's input cat([rgb, infrared]) (dinomaly_mulsen.py's training forward), ours
    the pairs [B, 6] (modality "rgbir"). Returns, per dtype, rows of per-step losses, learning rates, weight gaps
    (weight_gaps), whether the generator states after the forward agree, and with two dtypes the gaps of the
    preview's first-dtype run to its last (its own rounding); and whether the optimiser groups hold the same
    parameters in the same order."""
    models = [(prev, ours)] + [(copy.deepcopy(prev), copy.deepcopy(ours)) for _ in dtypes[1:]]
    runs = []
    for (mp, mo), dtype in zip(models, dtypes):
        mp.to(dtype), mo.to(dtype)
        halves = [[generated_images(batch, crop, seed + s + i).to(dtype) for s in ((100, 200) if pairs else (100,))]
                  for i in range(steps)]
        seeds = [seed + 1000 + i for i in range(steps)]
        w0 = [t.detach().clone() for t in nn.ModuleList([mp.bottleneck, mp.decoder]).parameters()]
        gp = preview_steps(P, mp, [torch.cat(h) for h in halves], seeds, **kw)
        go = our_steps(mo, [torch.cat(h, dim=1) for h in halves], seeds, recipe=recipe, **kw)
        same = group_names(mp, next(gp)) == group_names(mo, next(go))
        runs.append((gp, go, w0, same))
    rows = {d: [] for d in dtypes}
    for it in range(steps):
        done = []
        for (gp, go, w0, _), dtype in zip(runs, dtypes):
            (lp, lrp, wp, rp), (lo, lro, wo, ro) = next(gp), next(go)
            rel_w, rel_upd = weight_gaps(wo, wp, w0)
            rows[dtype].append(dict(it=it, loss_p=lp, loss_o=lo, lrs=lrp, rel_w=rel_w, rel_upd=rel_upd,
                                    lr_gap=max(abs(a - b) for a, b in zip(lrp, lro)), rng_same=torch.equal(rp, ro)))
            done.append((wp, w0))
        if len(dtypes) > 1:
            own = weight_gaps([t.to(dtypes[-1]) for t in done[0][0]], done[-1][0], done[-1][1])
            rows[dtypes[0]][-1].update(own_w=own[0], own_upd=own[1])
    return rows, all(r[3] for r in runs)


def group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


# ----------------------------------------------------------------------------------------------- few-shot

def compare_fewshot(P, shots=(1, 2, 3), image_size=64, crop_size=56, epochs=2):
    rows = []
    with tempfile.TemporaryDirectory() as root:
        counts = {"brick": 5, "coffee": 7, "apple": 4}  # list order, not alphabetical: the class order matters
        write_folder(root, counts)
        ours_all = [s for c in counts for s in our_ds.class_samples("mvtec", root, c, "train")[0]]
        for shot in shots:
            random.seed(1)  # setup_seed(1) in dinomaly_fewshot.py:train
            chosen_p = []
            for c in counts:
                data = P.ImageFolder(root=os.path.join(root, c, "train"))
                chosen_p += [s[0] for s in random.sample(data.samples, shot)]
            chosen_o = [s.image_path for s in fewshot.select_shots(ours_all, shot, seed=1)]
            rows.append((f"few-shot selection, shot {shot} ({len(chosen_p)} images)",
                         "same files, same order" if chosen_p == chosen_o else f"DIFFER {chosen_p} vs {chosen_o}",
                         chosen_p == chosen_o))
        # the strong augmentation, under our per-item seeding
        samples = fewshot.select_shots(ours_all, 3, seed=1)
        data = fewshot.AugmentedDataset(samples, image_size, crop_size, seed=1)
        tf = P.dataset.get_strong_transforms(image_size, crop_size)
        worst, n = 0.0, 0
        for e in range(epochs):
            for i, s in enumerate(samples):
                item_seed = int(np.random.SeedSequence([1, e, i]).generate_state(1)[0])
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(item_seed)
                    state = random.getstate()
                    random.seed(item_seed)
                    ref = tf(P.default_loader(s.image_path))
                    random.setstate(state)
                got = data[(e, i)]
                worst, n = max(worst, (got - ref).abs().max().item()), n + 1
        rows.append((f"strong augmentation, {n} items ({image_size}->{crop_size})", f"max abs {worst:.3g}",
                     worst == 0.0))
        # the plain test transform
        tfp, _ = P.dataset.get_data_transforms(image_size, crop_size)
        worst = max((our_ds.load_tensor(s.image_path, image_size, crop_size) - tfp(P.default_loader(s.image_path)))
                    .abs().max().item() for s in ours_all)
        rows.append((f"test transform, {len(ours_all)} images", f"max abs {worst:.3g}", worst == 0.0))
    return rows


def compare_class_lists(path: str) -> list:
    """The class lists of dinomaly_fewshot.py's __main__ (read from its source: `if '<key>' in
    args.data_path.lower(): item_list = [...]`) against dataset.DATASETS: few-shot draws its shots class after
    class from one random stream, so the order matters."""
    import ast
    names = {"mvtec": "mvtec", "visa": "visa", "btech": "btad", "mpdd": "mpdd", "miad": "miad",
             "medical": "unimedical"}
    tree = ast.parse(open(os.path.join(path, "dinomaly_fewshot.py")).read())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Constant) and node.test.left.value in names:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "item_list":
                    found[names[node.test.left.value]] = ast.literal_eval(stmt.value)
    same = [k for k, v in found.items() if our_ds.DATASETS[k] == v]
    differ = sorted(set(found) - set(same))
    return [(f"class lists and order ({len(found)} datasets)", f"same: {', '.join(same)}" +
             (f"; DIFFER: {', '.join(differ)}" if differ else ""), not differ and len(found) == len(names))]


def preview_argparse_defaults(path: str, script: str) -> dict:
    """{option: default} of a preview script's parser.add_argument calls, its `batch_size = N` and its
    `setup_seed(N)` (as "seed"), read from its source."""
    import ast
    found = {}
    for node in ast.walk(ast.parse(open(os.path.join(path, script)).read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            default = [k.value for k in node.keywords if k.arg == "default"]
            if default:
                found[ast.literal_eval(node.args[0]).lstrip("-")] = ast.literal_eval(default[0])
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup_seed" and node.args:
            found["seed"] = ast.literal_eval(node.args[0])
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "batch_size":
            found["batch_size"] = ast.literal_eval(node.value)
    return found


def compare_script_defaults(path: str) -> list:
    """The defaults of dinomaly2_2d.py and dinomaly2_fewshot.py (their recipes, --dataset mvtec) against the
    preview's dinomaly_2D.py and dinomaly_fewshot.py, and the model our scripts build from them against the
    one compared above (our_model)."""
    from dinomaly import checkpoints, cli

    import dinomaly2_2d
    import dinomaly2_fewshot
    rows = []
    for ours_mod, script in ((dinomaly2_2d, "dinomaly_2D.py"), (dinomaly2_fewshot, "dinomaly_fewshot.py")):
        s = cli.parse(ours_mod.__doc__, ours_mod.RECIPE, ours_mod.DEFAULTS, ours_mod.DATASETS, [])
        a = s.recipe
        d = preview_argparse_defaults(path, script)
        pairs = {"backbone": a.encoder, "dropout": a.dropout, "la": a.la, "lc": a.lc, "cr": a.cr,
                 "ll": 1, "ll_ratio": a.hm_max_p, "ll_factor": a.hm_factor, "image_size": a.image_size,
                 "crop_size": a.crop_size, "total_iters": a.total_iters, "lr_decay_ratio": a.lr_decay_ratio,
                 "batch_size": a.batch_size, "seed": s.run.seed}
        if "shot" in d:
            pairs["shot"] = a.shot
        differ = {k: (d.get(k), v) for k, v in pairs.items() if d.get(k) != v}
        rows.append((f"{script} defaults vs {ours_mod.__name__}.py ({len(pairs)} settings)",
                     "same" if not differ else f"DIFFER (preview, ours): {differ}", not differ))
        built = dict(checkpoints.model_options(a), encoder=a.encoder)
        compared = dict(mask_ratio=0.0, mask_in_eval=False, attn_eps=1e-8, lc=2, recenter=True,
                        linear_attention=True, dropout=0.4, decoder_depth=8, bottleneck_kind="two_stage",
                        encoder=ENCODER, taps=None, modality="rgb")
        rows.append((f"{ours_mod.__name__}.py builds the model compared here", "same" if built == compared else
                     f"DIFFER: {built} vs {compared}", built == compared))
    return rows


# ----------------------------------------------------------------------------------------------- main

def forward_checks(P, prev, ours, x, seed, table, tag):
    """Forward (eval and train), maps and scores of `prev` and `ours` (same weights)."""
    f = compare_forward(prev, ours, x)
    table.append((f"{tag}: encoder taps (eval)", f"max abs {f['taps']:.2e}, rel {f['taps_rel']:.1e}",
                  f["taps_rel"] < 1e-5))
    table.append((f"{tag}: targets en {len(f['shapes'])}x{f['shapes'][0][1:]}", f"max abs {f['en']:.2e}, "
                  f"rel {f['en_rel']:.1e}", f["en_rel"] < 1e-5))
    table.append((f"{tag}: decoder de (eval)", f"max abs {f['de']:.2e}, rel {f['de_rel']:.1e} (|de| <= "
                  f"{f['de_scale']:.3g})", f["de_rel"] < 1e-5))
    ft = compare_forward(prev, ours, x[:2], train=True, seed=seed)
    table.append((f"{tag}: decoder de (train, dropout 0.4, same seed)",
                  f"max abs {ft['de']:.2e}, rel {ft['de_rel']:.1e}; generator state after the forward "
                  f"{'same' if ft['rng_same'] else 'differs'}", ft["de_rel"] < 1e-5))
    mp, sp = preview_maps_scores(P, prev, x)
    mo, so = our_maps_scores(ours, x)
    gap_m, gap_s = (mo - mp).abs().max().item(), (so - sp).abs().max().item()
    table.append((f"{tag}: anomaly maps 256x256, {len(x)} images",
                  f"max abs {gap_m:.2e} (maps {mp.min().item():.3f}..{mp.max().item():.3f})", gap_m < 5e-5))
    table.append((f"{tag}: image scores (top 1 %)", f"max abs {gap_s:.2e} (scores {sp.min().item():.3f}.."
                  f"{sp.max().item():.3f})", gap_s < 5e-5))
    return ft


def run_variant(P, encoder, la, lc, cr, args, steps, table, tag):
    """One configuration: both models on the shared random `encoder` (ours gets a copy by a strict load of the
    whole state dict), forward/map checks with random trainable weights, then `steps` float64 training steps
    from the preview's initialisation (float64: the formulas; float32 rounding is measured on the defaults)."""
    torch.manual_seed(args.seed)
    with fast_init(P):
        prev = preview_model(P, la=la, lc=lc, cr=cr, encoder=encoder)
        ours = our_model(la=la, lc=lc, cr=cr)
    trainable = nn.ModuleList([prev.bottleneck, prev.decoder])
    init = copy.deepcopy(trainable.state_dict()) if steps else None
    randomise(trainable, args.seed + 7)
    table.append((f"{tag}: state dict, strict both ways", strict_both_ways(prev, ours), True))
    x = generated_images(2, args.crop, args.seed + 1)
    forward_checks(P, prev, ours, x, args.seed + 3, table, tag)
    if steps:
        trainable.load_state_dict(init, strict=True)
        ours.load_state_dict(prev.state_dict(), strict=True)
        rows, same_groups = compare_training(prev, ours, P, steps, args.batch, args.crop, args.seed,
                                             dtypes=(torch.float64,), total_iters=40000)
        rows = rows[torch.float64]
        worst = max(r["rel_w"] for r in rows)
        table.append((f"{tag}: {steps} training steps float64, weights", f"max rel {worst:.1e}; loss gap "
                      f"{max(abs(r['loss_p'] - r['loss_o']) for r in rows):.1e}", worst < 1e-10 and same_groups))
        prev.float()  # the shared encoder back to float32


def training_rows(tag, rows, same_groups, steps, batch, crop, schedule, table):
    """Prints compare_training's float32 and float64 runs step by step; adds their rows to the table."""
    r32, r64 = rows[torch.float32], rows[torch.float64]
    print(f"\nper step, {tag}, batch {batch} x {crop} px. rel w: max over tensors of "
          f"||ours - preview|| / ||preview||; rel upd: the same over ||preview - init|| (tensors moved so far); "
          f"own f32: the preview's float32 run against its float64 run (its own rounding)")
    print(f"{'it':>3} {'loss preview':>13} {'loss ours':>13} {'lr groups 0/1/2':>28} {'rel w f32':>10} "
          f"{'rel upd f32':>12} {'own f32':>9} {'own upd':>9} {'rel w f64':>10} {'rel upd f64':>12}")
    for a, b in zip(r32, r64):
        print(f"{a['it']:>3} {a['loss_p']:>13.8f} {a['loss_o']:>13.8f} {'/'.join(f'{v:.2e}' for v in a['lrs']):>28} "
              f"{a['rel_w']:>10.1e} {a['rel_upd']:>12.1e} {a['own_w']:>9.1e} {a['own_upd']:>9.1e} "
              f"{b['rel_w']:>10.1e} {b['rel_upd']:>12.1e}")
    w32, u32 = max(r["rel_w"] for r in r32), max(r["rel_upd"] for r in r32)
    w64, u64 = max(r["rel_w"] for r in r64), max(r["rel_upd"] for r in r64)
    own_w, own_u = max(r["own_w"] for r in r32), max(r["own_upd"] for r in r32)
    dropout_same = all(r["rng_same"] for r in r32 + r64)
    table.append((f"{tag}: optimiser groups (names, order)", "same" if same_groups else "DIFFER", same_groups))
    table.append((f"{tag}: {steps} steps float32 ({schedule})",
                  f"weights max rel {w32:.1e} (to the update {u32:.1e}); the preview's own float32 rounding "
                  f"{own_w:.1e} ({own_u:.1e}); loss gap {max(abs(r['loss_p'] - r['loss_o']) for r in r32):.1e}; "
                  f"lr gap {max(r['lr_gap'] for r in r32):.1e}; dropout draws {'same' if dropout_same else 'DIFFER'}",
                  all(r["rel_w"] < max(1e-5, 3 * r["own_w"]) for r in r32)))
    table.append((f"{tag}: {steps} steps float64", f"weights max rel {w64:.1e} (to the update {u64:.1e}); "
                  f"loss gap {max(abs(r['loss_p'] - r['loss_o']) for r in r64):.1e}", w64 < 1e-10))


def attention_row(tag, steps, gaps, table):
    """The row of float32 training steps with our encoder's attention in the preview's order."""
    table.append((f"{tag}: the {steps} float32 steps, our encoder's attention in the preview's order",
                  f"weights max rel {max(gaps):.1e} (per step {', '.join(f'{g:.1e}' for g in gaps)})",
                  max(gaps) < 1e-5))


def default_configuration(P, encoder, args, table):
    """The 2D defaults (la 1, lc 2, cr 1): forward, maps and scores; then args.steps training steps from the
    preview's own initialisation in float32 and again in float64 (float64 separates formula differences from
    float32 rounding, which Adam's normalised early steps amplify); then a stress run in float64 with a short
    warm-up, the cosine decay to 0.1 and hard mining at p 0.9."""
    tag = "default (la 1, lc 2, cr 1)"
    torch.manual_seed(args.seed)
    prev = preview_model(P, encoder=encoder)  # the preview's init_weights, not the fast one
    with fast_init(P):
        ours = our_model()
    table.append((f"{tag}: state dict, strict both ways", strict_both_ways(prev, ours), True))
    init = copy.deepcopy(prev.state_dict())
    randomise(nn.ModuleList([prev.bottleneck, prev.decoder]), args.seed + 7)
    ours.load_state_dict(prev.state_dict(), strict=True)
    x = generated_images(args.images, args.crop, args.seed + 1)
    forward_checks(P, prev, ours, x, args.seed + 3, table, tag)

    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    rows, same_groups = compare_training(prev, ours, P, args.steps, args.batch, args.crop, args.seed,
                                         dtypes=(torch.float32, torch.float64), total_iters=40000)
    training_rows(tag, rows, same_groups, args.steps, args.batch, args.crop, "warm-up 100, T 40k", table)
    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    with preview_attention_order(ours):
        rows, _ = compare_training(prev, ours, P, args.steps, args.batch, args.crop, args.seed, total_iters=40000)
    attention_row(tag, args.steps, [r["rel_w"] for r in rows[torch.float32]], table)

    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    rows, _ = compare_training(prev, ours, P, args.stress_steps, args.batch, args.crop, args.seed + 50,
                               dtypes=(torch.float64,), total_iters=args.stress_steps, warmup=1, final_ratio=0.1,
                               p_offset=1000)
    rows = rows[torch.float64]
    table.append((f"stress: {args.stress_steps} steps float64, warm-up 1, cosine to 0.1 over "
                  f"{args.stress_steps}, p 0.9", f"weights max rel {max(r['rel_w'] for r in rows):.1e}; loss gap "
                  f"{max(abs(r['loss_p'] - r['loss_o']) for r in rows):.1e}; lrs "
                  f"{', '.join('%.2e' % r['lrs'][2] for r in rows)} (gap {max(r['lr_gap'] for r in rows):.1e})",
                  max(r["rel_w"] for r in rows) < 1e-10))
    prev.float()  # the shared encoder back to float32


# ----------------------------------------------------------------------------------------------- RGB + depth

def preview_rgbd_model(P, encoder, dropout=0.4):
    """The preview's DinomalyRGBD as dinomaly_mvtec3d.py builds it (on the shared ViT-S encoder)."""
    bottleneck = nn.ModuleList([
        nn.Sequential(nn.Linear(EMBED, 256), nn.Dropout(p=dropout)),
        nn.Sequential(nn.Linear(256, EMBED * 4), nn.GELU(), nn.Dropout(p=dropout), nn.Linear(EMBED * 4, EMBED),
                      nn.Dropout(p=dropout))])
    decoder = nn.ModuleList([P.vt.Block(dim=EMBED, num_heads=HEADS, mlp_ratio=4., qkv_bias=True,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-8),
                                        attn=partial(P.vt.LinearAttention2, eps=1e-8)) for _ in range(8)])
    model = P.uad.DinomalyRGBD(encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=TAPS,
                               fuse_layer_encoder=LC_GROUPS[2], fuse_layer_decoder=LC_GROUPS[2],
                               add_class_token_weight=-1., norm_encoder_token=True, rgb_ratio=0.5)
    model.init_weights()
    return model


def rgbd_steps(P, prev, ours, steps, batch, crop, seed, dtype):
    """`steps` training steps of dinomaly_mvtec3d.py's loop body (two groups at 2e-3, hard mining 0.9/0.1) on the
    preview's model and of train.train_step with dinomaly2_mvtec3d.py's recipe on ours, same batches and dropout
    draws. Returns per step (preview loss, our loss, preview's trainable weights, ours), weights copied."""
    import dinomaly2_mvtec3d
    prev.to(dtype), ours.to(dtype)
    trainable = nn.ModuleList([prev.bottleneck, prev.decoder])
    opt_p = P.sadam.StableAdamW([{"params": prev.bottleneck.parameters()}, {"params": prev.decoder.parameters()}],
                                lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4, amsgrad=False, eps=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched_p = P.utils.WarmupCosineScheduler(opt_p, final_ratio=1, total_epochs=40000, warmup_epochs=100)
    recipe = dinomaly2_mvtec3d.RECIPE
    params = ours.trainable_parameters()
    opt_o, sched_o = train.reconstruction_optimizer(ours, recipe), train.reconstruction_schedule(recipe)
    prev.train(), ours.train()
    rows = []
    for it in range(steps):
        img = torch.cat([generated_images(batch, crop, seed + 100 + it),
                         generated_images(batch, crop, seed + 200 + it)], dim=1).to(dtype)
        torch.manual_seed(seed + 1000 + it)
        en, de = prev(img)
        loss_p = P.utils.global_cosine_hm_percent(en, de, p=min(0.9 * it / 1000, 0.9), factor=0.1)
        opt_p.zero_grad()
        loss_p.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nn.utils.clip_grad_norm(trainable.parameters(), max_norm=0.1)
            opt_p.step()
            sched_p.step()

        def loss_fn(b, i):
            torch.manual_seed(seed + 1000 + it)
            e, d = ours(b)
            return global_cosine_hm(e, d, p=hard_mining_factor(i, recipe.hm_max_p, recipe.hm_ramp_iters),
                                    factor=recipe.hm_factor)
        loss_o, updated, _, _ = train.train_step(img, it, loss_fn, params, opt_o, sched_o, recipe.clip_norm, False)
        assert updated
        rows.append((loss_p.item(), loss_o.item(), [t.detach().double().clone() for t in trainable.parameters()],
                     [t.detach().double().clone() for t in params]))
    prev.float(), ours.float()
    return rows


def preview_functions(path: str, script: str, names: tuple[str, ...]) -> dict:
    """Functions of a preview script, by name, without running the script (preprocess_mvtec3d_2.py processes
    ../mvtec_3d on import; _1.py imports open3d): their definitions are taken from its source and executed
    alone."""
    import ast
    tree = ast.parse(open(os.path.join(path, script)).read())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    scope = {"np": np, "math": math}
    exec(compile(ast.Module(body=defs, type_ignores=[]), script, "exec"), scope)
    return {n: scope[n] for n in names}


def rgbd_data_checks(P, path: str, table: list):
    """Our depth preparation against the preview's own gap filling and padding (run on generated point clouds),
    and our MVTec 3D-AD reader and pair tensors against the preview's MVTec3DDataset on the prepared folder."""
    from dinomaly import depth
    from prepare_data import prepare_mvtec3d
    from prepare_data.make_demo_pairs import make_demo_pairs
    fill = preview_functions(path, "prepare_data/preprocess_mvtec3d_2.py", ("get_neighbor_mean", "fill_gaps"))
    pad = preview_functions(path, "prepare_data/preprocess_mvtec3d_1.py", ("roundup_next_100", "pad_cropped_pc"))
    with tempfile.TemporaryDirectory() as root:
        paths = make_demo_pairs(os.path.join(root, "demo"), size=90, n_train=2, n_test_good=2, n_test_bad=2)
        worst, n = 0.0, 0
        for kind in ("good", "dent", "stain"):
            for i in range(2):
                xyz = depth.read_tiff(os.path.join(paths["mvtec3d"], "dome", "test", kind, "xyz", f"{i:03d}.tiff"))
                padded = pad["pad_cropped_pc"](xyz)
                same_pad = np.array_equal(padded, depth.pad_square(xyz))
                z_p = z_o = padded[:, :, -1]
                for _ in range(3):
                    z_p, z_o = fill["fill_gaps"](z_p), depth.fill_gaps(z_o)
                worst = max(worst, float(np.abs(z_p - z_o).max() / np.abs(z_p).max()))
                n += same_pad
        table.append(("rgbd: padding (pad_cropped_pc) and 3 gap fillings (fill_gaps), 6 point clouds",
                      f"padding same for {n} of 6; z max rel {worst:.1e}", n == 6 and worst < 1e-6))
        prepared = os.path.join(root, "prepared")
        import subprocess  # a fresh interpreter: scikit-learn's DBSCAN does not run beside the stubs
        subprocess.run([sys.executable, prepare_mvtec3d.__file__, "--data_path", paths["mvtec3d"], "--out", prepared,
                        "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
        tf, gtf = P.dataset.get_data_transforms(90, 84)
        theirs = P.dataset.MVTec3DDataset(root=os.path.join(prepared, "dome"), transform=tf, gt_transform=gtf,
                                          phase="test", cat_3D=True)
        ours = our_ds.TestDataset(our_ds.mvtec3d_samples(prepared, "dome", "test"), 90, 84)
        index = {s.image_path: i for i, s in enumerate(ours.samples)}
        worst_img = worst_gt = 0.0
        for img, gt, label, img_path in theirs:
            o = ours[index[img_path]]
            worst_img = max(worst_img, (o[0] - img).abs().max().item())
            worst_gt = max(worst_gt, (o[1] - gt).abs().max().item()) if o[2] == label else float("inf")
        table.append((f"rgbd: MVTec3DDataset vs our reader, {len(theirs)} samples (6-channel inputs, masks, labels)",
                      f"inputs max abs {worst_img:.2e}, masks {worst_gt:.2e}", worst_img == 0 and worst_gt == 0))


def rgbd_checks(P, encoder, args, table):
    """DinomalyRGBD against ViTill(modality="rgbd"): strict loads, forward (eval, train), maps and scores through
    the preview's evaluation_batch, training steps in float32 and float64 (and float32 with our encoder's attention
    in the preview's order); then the data pipeline."""
    tag = "rgbd (DinomalyRGBD)"
    torch.manual_seed(args.seed)
    with fast_init(P):
        prev = preview_rgbd_model(P, encoder)
        ours = ViTill(ENCODERS[ENCODER], dropout=0.4, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                      modality="rgbd")
    init = copy.deepcopy(prev.state_dict())
    table.append((f"{tag}: state dict, strict both ways", strict_both_ways(prev, ours), True))
    randomise(nn.ModuleList([prev.bottleneck, prev.decoder]), args.seed + 7)
    ours.load_state_dict(prev.state_dict(), strict=True)
    x = torch.cat([generated_images(args.images, args.crop, args.seed + 1),
                   generated_images(args.images, args.crop, args.seed + 2)], dim=1)
    forward_checks(P, prev, ours, x, args.seed + 3, table, tag)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        prev.load_state_dict(init, strict=True)
        ours.load_state_dict(init, strict=True)
        runs[dtype] = rgbd_steps(P, prev, ours, args.steps, args.batch, args.crop, args.seed, dtype)
    gaps = {d: [max_rel(o, p) for _, _, p, o in rows] for d, rows in runs.items()}
    own = [max_rel(a[2], b[2]) for a, b in zip(runs[torch.float32], runs[torch.float64])]  # the preview's rounding
    loss = max(abs(lp - lo) for rows in runs.values() for lp, lo, _, _ in rows)
    table.append((f"{tag}: {args.steps} training steps float32 (preview 2 groups at 2e-3, ours 3 at 2e-3)",
                  f"weights max rel {max(gaps[torch.float32]):.1e} per step "
                  f"{', '.join(f'{g:.1e}' for g in gaps[torch.float32])}; the preview's own float32 rounding "
                  f"{', '.join(f'{g:.1e}' for g in own)}; loss gap {loss:.1e}",
                  all(g < max(1e-5, 3 * r) for g, r in zip(gaps[torch.float32], own))))
    table.append((f"{tag}: {args.steps} training steps float64", f"weights max rel {max(gaps[torch.float64]):.1e}",
                  max(gaps[torch.float64]) < 1e-10))
    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    with preview_attention_order(ours):
        rows = rgbd_steps(P, prev, ours, args.steps, args.batch, args.crop, args.seed, torch.float32)
    attention_row(tag, args.steps, [max_rel(o, p) for _, _, p, o in rows], table)
    rgbd_data_checks(P, os.path.abspath(args.preview), table)


# ----------------------------------------------------------------------------------------------- RGB + infrared

def preview_mulsen_reader(path: str) -> tuple[types.ModuleType, bool]:
    """The preview's dataset_mulsen module and whether open3d is a stub. The module imports open3d at its top but
    calls it only to turn the .stl point clouds into depth maps (depth=True), which dinomaly_mulsen.py never asks
    for; without open3d a stub stands in whose every attribute raises, so a call would fail the check loudly."""
    stubbed = False
    try:
        importlib.import_module("open3d")
    except ImportError:
        stub = types.ModuleType("open3d")

        def refuse(name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(f"the preview's MulSen-AD reader called open3d.{name}, which the stub replaces")
        stub.__getattr__ = refuse
        sys.modules["open3d"] = stub
        stubbed = True
    sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("dataset_mulsen"), stubbed
    finally:
        sys.path.remove(path)


def by_kind(paths) -> dict:
    """{kind folder: [file names in order]} of image paths, the order within each kind kept."""
    out = {}
    for p in paths:
        out.setdefault(os.path.dirname(p), []).append(os.path.basename(p))
    return out


def stl_vertices(path: str) -> np.ndarray:
    """The distinct vertices of a binary STL file, read with NumPy (80-byte header, count, 50-byte triangles)."""
    rows = np.fromfile(path, dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")], offset=84)
    return np.unique(rows["v"].reshape(-1, 3).astype(np.float64), axis=0)


def rgbir_reader_defects(M, tf, gtf, root: str, work: str, table: list):
    """The preview's reader on altered copies of a MulSen-layout folder, beside ours: a missing infrared image,
    data.csv rows in another order than the files, no Pointcloud/ folder, a parent folder named with 'test'."""
    import csv
    import shutil
    from dinomaly.errors import UserError

    def copy(name):
        dst = os.path.join(work, name, "mulsen")
        shutil.copytree(root, dst)
        return dst

    def ours(r, phase, cls="dome"):
        try:
            return our_ds.mulsen_samples(r, cls, phase)
        except UserError as e:
            return e

    # 1. one infrared training image missing: the preview zips the sorted lists, ours pairs by name
    r = copy("missing")
    os.remove(os.path.join(r, "dome", "Infrared", "train", "0.png"))
    theirs = M.TrainDataset(class_name="dome", transform=tf, gt_transform=gtf, depth=False, dataset_path=r)
    shifted = sum(os.path.basename(a) != os.path.basename(b) for a, b, _ in theirs.img_paths)
    err = ours(r, "train")
    named = isinstance(err, UserError) and os.path.join("RGB", "train", "0.png") in str(err)
    table.append(("rgbir reader: an infrared training image missing",
                  f"preview: {shifted} of {len(theirs)} pairs silently of two different samples; ours: "
                  f"{'an error naming RGB/train/0.png' if named else err}", named))
    # 2. data.csv rows not in the files' order: the preview labels by position, ours by the object's name
    r = copy("rows")
    csv_path = os.path.join(r, "dome", "RGB", "GT", "stain", "data.csv")
    with open(csv_path, newline="") as f:
        header, *rows = list(csv.reader(f))
    rows[0][1:] = ["0", "0", "1"]  # sample 0: a point-cloud defect only (no RGB mask needed)
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows[::-1]])
    truth = {row[0]: tuple(int(v) for v in row[1:]) for row in rows}
    theirs = M.TestDataset(class_name="dome", transform=tf, gt_transform=gtf, depth=False, dataset_path=r)
    wrong_p = sum(tuple(lab) != truth[os.path.splitext(os.path.basename(p[0]))[0]]
                  for p, lab in zip(theirs.img_paths, theirs.labels) if os.sep + "stain" + os.sep in p[0])
    got = ours(r, "test")
    wrong_o = sum(s.modal_labels != truth[os.path.splitext(os.path.basename(s.image_path))[0]]
                  for s in got if os.sep + "stain" + os.sep in s.image_path) if isinstance(got, list) else -1
    table.append(("rgbir reader: data.csv rows in another order than the files",
                  f"preview: {wrong_p} of {len(rows)} samples get another sample's labels; ours: {wrong_o}",
                  wrong_o == 0))
    # 3. no point clouds: the preview's zip with the empty list empties every split
    r = copy("no_pc")
    shutil.rmtree(os.path.join(r, "dome", "Pointcloud"))
    theirs = M.TrainDataset(class_name="dome", transform=tf, gt_transform=gtf, depth=False, dataset_path=r)
    try:
        M.TestDataset(class_name="dome", transform=tf, gt_transform=gtf, depth=False, dataset_path=r)
        test_p = "read"
    except AssertionError:
        test_p = "fails its assertion"
    got = ours(r, "train")
    table.append(("rgbir reader: no Pointcloud/ folder",
                  f"preview: {len(theirs)} training pairs, test set {test_p}; ours: "
                  f"{len(got) if isinstance(got, list) else got} training pairs", isinstance(got, list) and len(got) > 0))
    # 4. a parent folder named with 'test': the preview finds masks by path.replace('test', 'GT') on the whole path
    r = os.path.join(work, "latest", "mulsen")
    shutil.copytree(root, r)
    theirs = M.TestDataset(class_name="dome", transform=tf, gt_transform=gtf, depth=False, dataset_path=r)
    try:
        for i in range(len(theirs)):
            theirs[i]
        masks_p = "read"
    except FileNotFoundError as e:
        masks_p = f"FileNotFoundError for {os.path.relpath(e.filename, work)}"
    got = ours(r, "test")
    ok = isinstance(got, list) and all(s.mask_path is None or os.path.isfile(s.mask_path) for s in got)
    table.append(("rgbir reader: the data under a folder named 'latest'",
                  f"preview: {masks_p}; ours: {'every mask found' if ok else got}", ok))


def rgbir_data_checks(P, path: str, table: list, size: int = 70, crop: int = 56):
    """Our MulSen-AD reader (dataset.mulsen_samples, TrainDataset, TestDataset) against the preview's
    dataset_mulsen.TrainDataset and TestDataset (as dinomaly_mulsen.py builds them: depth=False) on a folder of
    prepare_data/make_demo_pairs.py (RGB, Infrared and Pointcloud .stl files, data.csv): the same samples and
    pairs in the same order within each kind, the same labels (RGB, infrared, point cloud) and object label,
    the same RGB and infrared tensors and the same masks (ours binarised at 0.5, as --gt_binarize mulsen does at
    evaluation; the preview's reader binarises them); then the preview's defects on altered copies. With open3d
    installed, it also reads the generated point clouds (the preview's depth path), vertex for vertex."""
    from prepare_data.make_demo_pairs import CLASSES, make_demo_pairs
    M, stubbed = preview_mulsen_reader(path)
    tf, gtf = M.get_data_transforms(size, crop)
    with tempfile.TemporaryDirectory(prefix="mulsen_") as work:
        root = make_demo_pairs(os.path.join(work, "demo"), size=64, seed=2, n_train=3, n_test_good=2,
                               n_test_bad=2)["mulsen"]
        n_train = n_test = n_masks = 0
        worst_in = worst_mask = 0.0
        problems = []
        for cls in CLASSES:
            theirs = M.TrainDataset(class_name=cls, transform=tf, gt_transform=gtf, depth=False, dataset_path=root)
            samples = our_ds.mulsen_samples(root, cls, "train")
            ours = our_ds.TrainDataset(samples, size, crop)
            if [tuple(p[:2]) for p in theirs.img_paths] != [(s.image_path, s.pair_path) for s in samples]:
                problems.append(f"{cls} train: pairs or order differ")
            for i in range(len(theirs)):
                (img, infra), label = theirs[i]
                x = ours[i]
                worst_in = max(worst_in, (x[:3] - img).abs().max().item(), (x[3:] - infra).abs().max().item())
                problems += [f"{cls} train {i}: label {label}"] if label != 0 else []
            n_train += len(theirs)

            theirs = M.TestDataset(class_name=cls, transform=tf, gt_transform=gtf, depth=False, dataset_path=root)
            samples = our_ds.mulsen_samples(root, cls, "test")
            ours = our_ds.TestDataset(samples, size, crop)
            if by_kind(p[0] for p in theirs.img_paths) != by_kind(s.image_path for s in samples):
                problems.append(f"{cls} test: samples or their order within a kind differ")
            index = {s.image_path: i for i, s in enumerate(samples)}
            for i in range(len(theirs)):
                (img, infra), label, (m_rgb, m_ir), (rgb_path, ir_path) = theirs[i]
                j = index[rgb_path]
                s, (x, mask, obj, _, _) = samples[j], ours[j]
                if s.pair_path != ir_path or s.modal_labels != tuple(label) or obj != max(label):
                    problems.append(f"{rgb_path}: ours {s.pair_path} {s.modal_labels} {obj}, preview {ir_path} "
                                    f"{tuple(label)} {max(label)}")
                worst_in = max(worst_in, (x[:3] - img).abs().max().item(), (x[3:] - infra).abs().max().item())
                worst_mask = max(worst_mask, ((mask > 0.5).float() - torch.cat([m_rgb, m_ir])).abs().max().item())
                n_masks += int(m_rgb.any()) + int(m_ir.any())
            n_test += len(theirs)
        table.append((f"rgbir: dataset_mulsen's TrainDataset/TestDataset vs our reader, {n_train} training and "
                      f"{n_test} test pairs of {len(CLASSES)} classes (open3d {'stubbed' if stubbed else 'real'})",
                      f"{'; '.join(problems[:3]) or 'same pairs, order within each kind, labels (RGB, IR, PC), object labels'}; "
                      f"RGB and IR inputs max abs {worst_in:.2e}, masks ({n_masks} not empty) {worst_mask:.2e}",
                      not problems and worst_in == 0 and worst_mask == 0 and n_masks > 0))
        rgbir_reader_defects(M, tf, gtf, root, os.path.join(work, "altered"), table)
        if stubbed:
            print("open3d is not installed: the generated point clouds are not read with it (the comparison of the "
                  "readers does not need it: dinomaly_mulsen.py's reader never calls open3d)")
            return
        import open3d
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".stl"))
        same = sum(np.array_equal(np.unique(np.asarray(open3d.io.read_triangle_mesh(f).vertices), axis=0),
                                  stl_vertices(f)) for f in files)
        table.append((f"rgbir: the generated point clouds through open3d {open3d.__version__} "
                      f"(read_triangle_mesh, the preview's depth path)",
                      f"{same} of {len(files)} files with the written vertices", same == len(files) > 0))


def rgbir_checks(P, encoder, args, table):
    """The preview's Dinomaly on cat([rgb, infrared]) (dinomaly_mulsen.py's training forward) and its
    evaluation_batch_rgbinfra (object scores and both modalities' maps, captured where it hands them to the metrics)
    against our model with modality "rgbir" on the pairs and evaluate_shard's rule (a pair's score the mean of its
    images'); training steps of dinomaly_mulsen.py's loop against ours (dinomaly2_mulsen.py's recipe); then the
    reader."""
    tag = "rgbir (dinomaly_mulsen.py)"
    torch.manual_seed(args.seed)
    with fast_init(P):
        prev = preview_model(P, encoder=encoder, dropout=0.2)
        ours = ViTill(ENCODERS[ENCODER], dropout=0.2, attn_eps=1e-8, bottleneck_kind="two_stage", recenter=True,
                      modality="rgbir")
    init = copy.deepcopy(prev.state_dict())
    randomise(nn.ModuleList([prev.bottleneck, prev.decoder]), args.seed + 7)
    ours.load_state_dict(prev.state_dict(), strict=True)
    n = args.images
    rgb, ir = generated_images(n, args.crop, args.seed + 1), generated_images(n, args.crop, args.seed + 2)
    prev.eval(), ours.eval()
    with torch.no_grad():
        en_p, de_p = prev(torch.cat([rgb, ir]))
        en_o, de_o = ours(torch.cat([rgb, ir], dim=1))
    gap = max(max_rel(en_o, en_p), max_rel(de_o, de_p))
    table.append((f"{tag}: forward of {n} pairs (en, de)", f"max rel {gap:.1e}", gap < 1e-5))
    captured = {"pro": []}
    u = P.utils
    saved = {k: getattr(u, k) for k in ("compute_pro", "roc_auc_score", "average_precision_score", "f1_score_max")}
    u.compute_pro = lambda masks, amaps, *a, **k: captured["pro"].append(np.array(amaps)) or 0.0
    u.roc_auc_score = lambda y, s: captured.setdefault("roc", []).append((np.array(y), np.array(s))) or 0.0
    u.average_precision_score = lambda y, s: 0.0
    u.f1_score_max = lambda y, s: 0.0
    labels = [torch.tensor([i % 2 for i in range(j, j + 2)]) for j in range(0, n, 2)]
    try:
        batches = [((rgb[j:j + 2], ir[j:j + 2]), (labels[j // 2], torch.zeros(2, dtype=torch.long),
                                                  1 - labels[j // 2]),
                    (torch.zeros(2, 1, args.crop, args.crop), torch.zeros(2, 1, args.crop, args.crop)),
                    ([f"r{j}", f"r{j + 1}"], [f"i{j}", f"i{j + 1}"])) for j in range(0, n, 2)]
        u.evaluation_batch_rgbinfra(prev, batches, "cpu", max_ratio=0.01, resize_mask=256)
    finally:
        for k, v in saved.items():
            setattr(u, k, v)
    obj_labels, obj_scores = captured["roc"][-1]
    mapper = AnomalyMapper(ours, max_ratio=0.01, precision="fp32")
    with torch.no_grad():
        amap, score = mapper(torch.cat([rgb, ir], dim=1))
    gap_rgb = np.abs(amap[:n, 0].numpy() - captured["pro"][0]).max()
    gap_ir = np.abs(amap[n:, 0].numpy() - captured["pro"][1]).max()
    gap_s = np.abs((2 * ((score[:n] + score[n:]) / 2)).numpy() - obj_scores).max()  # ours: the mean
    table.append((f"{tag}: maps of {n} pairs (RGB, infrared)", f"max abs {gap_rgb:.2e}, {gap_ir:.2e}",
                  max(gap_rgb, gap_ir) < 5e-5))
    same_labels = obj_labels.tolist() == [1] * n  # the largest of RGB (0/1), infrared (0) and point cloud (1/0)
    table.append((f"{tag}: object scores (the sum of the two; ours, the mean, doubled) and labels (largest of three)",
                  f"max abs {gap_s:.2e}; labels {'all 1 as expected' if same_labels else obj_labels.tolist()}",
                  gap_s < 5e-5 and same_labels))
    import dinomaly2_mulsen
    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    rows, same_groups = compare_training(prev, ours, P, args.steps, args.batch, args.crop, args.seed,
                                         dtypes=(torch.float32, torch.float64), pairs=True,
                                         recipe=dinomaly2_mulsen.RECIPE, total_iters=20000)
    training_rows(tag, rows, same_groups, args.steps, args.batch, args.crop, "pairs, warm-up 100, T 20k", table)
    prev.load_state_dict(init, strict=True)
    ours.load_state_dict(init, strict=True)
    with preview_attention_order(ours):
        rows, _ = compare_training(prev, ours, P, args.steps, args.batch, args.crop, args.seed, pairs=True,
                                   recipe=dinomaly2_mulsen.RECIPE, total_iters=20000)
    attention_row(tag, args.steps, [r["rel_w"] for r in rows[torch.float32]], table)
    rgbir_data_checks(P, os.path.abspath(args.preview), table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preview", required=True, help="folder of the preview code (models/uad.py, utils.py, ...)")
    ap.add_argument("--crop", type=int, default=56, help="image side, a multiple of 14 (56: 4 x 4 patches)")
    ap.add_argument("--images", type=int, default=4, help="images for the map and score comparison")
    ap.add_argument("--steps", type=int, default=4, help="training steps of the default configuration")
    ap.add_argument("--stress_steps", type=int, default=3, help="training steps of the stress run")
    ap.add_argument("--variant_steps", type=int, default=2,
                    help="training steps of the variants --la 0 and --cr 0 (the others change only the grouping)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the default configuration and few-shot only")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    begin = time.time()
    P = load_preview(os.path.abspath(args.preview))
    print(f"preview: {args.preview} (stubs for {', '.join(P.stubs) or 'nothing'}); torch {torch.__version__}, "
          f"CPU, crop {args.crop}, seed {args.seed}")
    with fast_init(P):
        encoder = preview_encoder(P)
    randomise(encoder, args.seed)
    table = []
    default_configuration(P, encoder, args, table)
    table += compare_class_lists(os.path.abspath(args.preview))
    table += compare_script_defaults(os.path.abspath(args.preview))
    table += compare_fewshot(P)
    rgbd_checks(P, encoder, args, table)
    rgbir_checks(P, encoder, args, table)
    if not args.quick:
        for la, lc, cr in ((0, 2, 1), (1, 0, 1), (1, 1, 1), (1, 3, 1), (1, 4, 1), (1, 11, 1), (1, 12, 1),
                           (1, 14, 1), (1, 2, 0)):
            steps = args.variant_steps if (la, lc, cr) in ((0, 2, 1), (1, 2, 0)) else 0
            run_variant(P, encoder, la, lc, cr, args, steps, table, f"la {la}, lc {lc}, cr {cr}")

    width = max(len(r[0]) for r in table)
    print(f"\n{'check':<{width}}  ok  gap")
    for name, gap, ok in table:
        print(f"{name:<{width}}  {'yes' if ok else 'NO ':<3} {gap}")
    failed = [r for r in table if not r[2]]
    print(f"\n{len(table) - len(failed)} of {len(table)} checks within target; {time.time() - begin:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
