"""Every encoder family: a random-weight file in its publisher's key layout (written here) loads strictly, and the
tapped features equal an independent float64 forward that reads that layout directly (DINOv3 from the method's
description: storage tokens, RoPE, masked k bias, LayerScale; where the Dinomaly2 preview's mirror is present,
also Meta's own model code).
Then: publisher wrappings, wrong files, checkpoint detection, the patch-size check, a tiny DINOv3 run."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dinomaly import checkpoints, cli, models, predict
from dinomaly.errors import UserError
from dinomaly.models import ENCODERS, ViTill, build_encoder
from dinomaly.encoders import EncoderConfig, check_sizes

import benchmark
import dinomaly_mvtec_uni
from prepare_data.make_demo_data import make_demo_data

TAPS = (0, 1, 2, 3)
V3 = "dinov3_vit_tiny_test"
V3_CFG = EncoderConfig(64, 4, 8, tuple(range(8)), "dinov3_tiny_test.pth", patch_size=16, family="dinov3")
TOL = 1e-5  # float32 rounding, relative to the largest feature (measured: 1e-6 to 3e-6)
PREVIEW = "/work/.mirror/negin-kafee+Dinomaly2/repo"  # the Dinomaly2 preview's git mirror, where present


@pytest.fixture(autouse=True)
def tiny_dinov3(monkeypatch):
    monkeypatch.setitem(models.ENCODERS, V3, V3_CFG)


def tiny(name: str, **changes) -> EncoderConfig:
    """A registered encoder shrunk to 4 blocks (its wrapping, patch size, tokens and family kept)."""
    base = ENCODERS[name]
    grid = dict(pretrain_grid=4) if base.family != "dinov3" else {}
    return dataclasses.replace(base, **{**dict(embed_dim=64, num_heads=4, depth=4, taps=TAPS), **grid, **changes})


# ----------------------------------------------------------------------------------------------- DINOv3

def dinov3_file(cfg: EncoderConfig, seed: int = 0, bf16_periods: bool = True) -> dict:
    """Random weights in Meta's DINOv3 key layout, written out by hand: non-trivial LayerScale, q/k/v biases
    (the k bias non-zero: the mask must remove it), RoPE periods as Meta computes them, rounded to bf16 as the
    released files store them."""
    g = torch.Generator().manual_seed(seed)
    d, p = cfg.embed_dim, cfg.patch_size
    hidden = int(d * 6 * 2 / 3) if cfg.swiglu else 4 * d

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    dh = d // cfg.num_heads
    periods = 100.0 ** (2 * torch.arange(dh // 4, dtype=torch.float32) / (dh // 2))
    sd = {"cls_token": r(1, 1, d, std=1), "storage_tokens": r(1, 4, d, std=1), "mask_token": r(1, d),
          "patch_embed.proj.weight": r(d, 3, p, p, std=0.05), "patch_embed.proj.bias": r(d),
          "rope_embed.periods": periods.bfloat16() if bf16_periods else periods,
          "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d),
                   b + "attn.qkv.bias_mask": torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)]),
                   b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d), b + "ls1.gamma": 0.5 + r(d).abs(),
                   b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "ls2.gamma": 0.5 + r(d).abs()})
        if cfg.swiglu:
            sd.update({b + "mlp.w1.weight": r(hidden, d), b + "mlp.w1.bias": r(hidden),
                       b + "mlp.w2.weight": r(hidden, d), b + "mlp.w2.bias": r(hidden),
                       b + "mlp.w3.weight": r(d, hidden), b + "mlp.w3.bias": r(d)})
        else:
            sd.update({b + "mlp.fc1.weight": r(hidden, d), b + "mlp.fc1.bias": r(hidden),
                       b + "mlp.fc2.weight": r(d, hidden), b + "mlp.fc2.bias": r(d)})
    return sd


def dinov3_reference(sd: dict, x: torch.Tensor, cfg: EncoderConfig, periods: torch.Tensor | None = None):
    """DINOv3's eval forward in float64, from Meta's layout: [CLS, S1..S4, patches], no position embedding; per
    block x + ls1 * attn(LN x) and x + ls2 * ffn(LN x) (eps 1e-5); qkv bias times its mask; RoPE on the patch
    tokens' q and k: coordinates (i + 0.5) / H mapped to [-1, 1], angle 2 pi c / period, 16 row then 16 column
    angles tiled twice, x cos + rotate_half(x) sin."""
    w = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(x.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=cfg.patch_size)
    b, d, h, wd = x.shape
    x = torch.cat([w["cls_token"].expand(b, -1, -1), w["storage_tokens"].expand(b, -1, -1),
                   x.flatten(2).transpose(1, 2)], dim=1)
    heads, dh, n = cfg.num_heads, d // cfg.num_heads, 5
    periods = w["rope_embed.periods"] if periods is None else periods.double()
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    cols = (torch.arange(wd, dtype=torch.float64) + 0.5) / wd * 2 - 1
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    angles = (2 * math.pi * coords[:, :, None] / periods).reshape(h * wd, -1).repeat(1, 2)  # [HW, dh]
    cos, sin = angles.cos(), angles.sin()

    def rope(t):
        t1, t2 = t[..., : dh // 2], t[..., dh // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def ln(t, name):
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-5)

    taps = []
    for i in range(cfg.taps[-1] + 1):
        p = f"blocks.{i}."
        bias = w[p + "attn.qkv.bias"] * w[p + "attn.qkv.bias_mask"]
        qkv = F.linear(ln(x, p + "norm1"), w[p + "attn.qkv.weight"], bias)
        q, k, v = qkv.reshape(b, -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :n], rope(q[:, :, n:])], dim=2)
        k = torch.cat([k[:, :, :n], rope(k[:, :, n:])], dim=2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        x = x + w[p + "ls1.gamma"] * F.linear(att.transpose(1, 2).reshape(b, -1, d), w[p + "attn.proj.weight"],
                                              w[p + "attn.proj.bias"])
        y = ln(x, p + "norm2")
        if cfg.swiglu:
            y = F.silu(F.linear(y, w[p + "mlp.w1.weight"], w[p + "mlp.w1.bias"])) * \
                F.linear(y, w[p + "mlp.w2.weight"], w[p + "mlp.w2.bias"])
            y = F.linear(y, w[p + "mlp.w3.weight"], w[p + "mlp.w3.bias"])
        else:
            y = F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
            y = F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + w[p + "ls2.gamma"] * y
        if i in cfg.taps:
            taps.append(x)
    return taps


def max_error(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    assert len(ours) == len(reference)
    return max(float((a.double() - r).abs().max()) for a, r in zip(ours, reference))


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov3_matches_a_float64_reading_of_metas_layout(tmp_path, swiglu):
    cfg = tiny("dinov3_vit_small_plus_16" if swiglu else "dinov3_vit_small_16", taps=(1, 3))
    sd = dinov3_file(cfg)
    path = tmp_path / cfg.weight_file
    torch.save(sd, path)
    enc = build_encoder(cfg).eval()
    assert sorted(enc.state_dict()) == sorted(sd)  # Meta's layout, key for key
    checkpoints.load_encoder_weights(enc, str(path))
    assert enc.num_prefix_tokens == 5
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # a 4 x 6 grid: not square
    with torch.no_grad():
        ours = enc(x)
    reference = dinov3_reference(sd, x, cfg)
    assert [t.shape for t in ours] == [(2, 5 + 24, 64)] * 2
    scale = max(float(r.abs().max()) for r in reference)
    assert max_error(ours, reference) < TOL * scale
    # the check can fail: timm's own float32 periods (not the file's bf16 ones: 2e-3 to 6e-3) or an unmasked
    # k bias are far outside it
    dh = cfg.embed_dim // cfg.num_heads
    computed = dinov3_reference(sd, x, cfg, periods=100.0 ** (2 * torch.arange(dh // 4) / (dh // 2)))
    assert max_error(ours, computed) > 20 * TOL * scale
    unmasked = dict(sd, **{k: torch.ones_like(v) for k, v in sd.items() if k.endswith("bias_mask")})
    assert max_error(ours, dinov3_reference(unmasked, x, cfg)) > 20 * TOL * scale
    # the state dict gives the file back: the k third of the qkv bias as zeros (it is masked anyway)
    back = enc.state_dict()
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            d = cfg.embed_dim
            assert torch.equal(back[k][:d], v[:d]) and torch.equal(back[k][2 * d:], v[2 * d:])
            assert not back[k][d: 2 * d].any()
        else:
            assert torch.equal(back[k], v.float() if k == "rope_embed.periods" else v), k


def test_dinov3_with_float32_periods_in_the_file(tmp_path):
    cfg = tiny("dinov3_vit_base_16", taps=(3,))
    sd = dinov3_file(cfg, seed=3, bf16_periods=False)
    enc = build_encoder(cfg).eval()
    enc.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = enc(x)
    reference = dinov3_reference(sd, x, cfg)
    assert max_error(ours, reference) < TOL * max(float(r.abs().max()) for r in reference)


def test_dinov3_registered_shapes_are_metas():
    """S+ (SwiGLU, hidden 2/3 of 6 x 384) and the configs of the others, against Meta's published architecture."""
    enc = build_encoder(ENCODERS["dinov3_vit_small_plus_16"])
    sd = enc.state_dict()
    assert sd["blocks.0.mlp.w1.weight"].shape == (1536, 384) and sd["blocks.11.mlp.w3.weight"].shape == (384, 1536)
    assert sd["storage_tokens"].shape == (1, 4, 384) and sd["rope_embed.periods"].shape == (16,)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16) and "pos_embed" not in sd
    arch = {n: (c.embed_dim, c.num_heads, c.depth, c.swiglu) for n, c in ENCODERS.items() if c.family == "dinov3"
            and n != V3}
    assert arch == {"dinov3_vit_small_16": (384, 6, 12, False), "dinov3_vit_small_plus_16": (384, 6, 12, True),
                    "dinov3_vit_base_16": (768, 12, 12, False), "dinov3_vit_large_16": (1024, 16, 24, False),
                    "dinov3_vit_huge_plus_16": (1280, 20, 32, True)}
    assert ENCODERS["dinov3_vit_base_16"].weight_file == "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    assert ENCODERS["dinov3_vit_huge_plus_16"].url.endswith(
        "/dinov3_vith16plus/dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth")


def test_dinov3_file_with_an_unset_k_mask_is_refused(tmp_path):
    cfg = tiny("dinov3_vit_small_16")
    sd = dinov3_file(cfg)
    sd["blocks.2.attn.qkv.bias_mask"] = torch.ones(3 * cfg.embed_dim)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match="blocks.2.attn.qkv.bias_mask is not Meta's k-bias mask"):
        checkpoints.load_encoder_weights(build_encoder(cfg), str(path))


def preview_code(tmp_path):
    """Meta's DINOv3 model code as the Dinomaly2 preview vendors it, extracted from the mirror (skip without it)."""
    if not os.path.isdir(PREVIEW):
        pytest.skip("the Dinomaly2 preview's mirror is not on this machine")
    archive = subprocess.run(["git", "-C", PREVIEW, "archive", "1745c61", "dinov3"], capture_output=True)
    if archive.returncode:
        pytest.skip("the preview's commit 1745c61 is not in the mirror")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    sys.path.insert(0, str(tmp_path))
    try:
        from dinov3.models.vision_transformer import DinoVisionTransformer
    finally:
        sys.path.remove(str(tmp_path))
    return DinoVisionTransformer


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_dinov3_equals_metas_code_and_preview_checkpoints_load_both_ways(tmp_path, monkeypatch, swiglu):
    meta_class = preview_code(tmp_path)
    cfg = dataclasses.replace(V3_CFG, swiglu=swiglu)
    sd = dinov3_file(cfg, seed=5)
    meta = meta_class(patch_size=16, pos_embed_rope_base=100, pos_embed_rope_normalize_coords="separate",
                      pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32", embed_dim=64, depth=8,
                      num_heads=4, ffn_ratio=6 if swiglu else 4, qkv_bias=True, layerscale_init=1e-5,
                      norm_layer="layernormbf16", ffn_layer="swiglu" if swiglu else "mlp", n_storage_tokens=4,
                      mask_k_bias=True)
    meta.load_state_dict(sd, strict=True)
    meta.eval()
    # a preview checkpoint: encoder.* in Meta's layout beside the trainable parts
    model = ViTill(cfg)
    preview = {**{f"encoder.{k}": v for k, v in meta.state_dict().items()},
               **{k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}}
    torch.save(preview, tmp_path / "model.pth")
    monkeypatch.setitem(models.ENCODERS, V3, cfg)
    loaded = checkpoints.load_model(str(tmp_path / "model.pth")).eval()
    x = torch.randn(2, 3, 80, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = meta._get_intermediate_layers_not_chunked(x, list(cfg.taps))
        ours = loaded.encoder(x)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # and ours into Meta's model, strictly
    encoder_sd = {k.removeprefix("encoder."): v for k, v in loaded.state_dict().items() if k.startswith("encoder.")}
    meta.load_state_dict(encoder_sd, strict=True)


# ----------------------------------------------------------------------------------------------- ViTs with a
# learned position embedding: DINOv2, DINO, MAE, DeiT, iBOT, MoCo v3

def vit_file(cfg: EncoderConfig, seed: int = 0) -> dict:
    """Random weights in the publishers' ViT layout (DINO's, MAE's, DeiT's, timm's: the same names), with
    DINOv2's LayerScale, mask token and registers where the family has them."""
    g = torch.Generator().manual_seed(seed)
    d, p = cfg.embed_dim, cfg.patch_size

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, d, std=1), "pos_embed": r(1, 1 + cfg.pretrain_grid ** 2, d, std=1),
          "patch_embed.proj.weight": r(d, 3, p, p, std=0.05), "patch_embed.proj.bias": r(d),
          "norm.weight": 1 + r(d), "norm.bias": r(d)}
    if cfg.family == "dinov2":
        sd["mask_token"] = r(1, d)
    if cfg.num_register_tokens:
        sd["register_tokens"] = r(1, cfg.num_register_tokens, d, std=1)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(d), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                   b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                   b + "norm2.weight": 1 + r(d), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d),
                   b + "mlp.fc1.bias": r(4 * d), b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
        if cfg.family == "dinov2":
            sd.update({b + "ls1.gamma": 0.5 + r(d).abs(), b + "ls2.gamma": 0.5 + r(d).abs()})
    return sd


def vit_reference(sd: dict, x: torch.Tensor, cfg: EncoderConfig) -> list[torch.Tensor]:
    """The DINO / DINOv2 ViT forward in float64, from the publisher's layout: patch tokens plus the position
    embedding resampled as DINO's interpolate_pos_encoding does (bicubic, scale (grid + 0.1) / M), CLS with its
    own; registers after CLS without one; pre-norm blocks (eps 1e-6), LayerScale where present."""
    w = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(x.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=cfg.patch_size)
    b, d, h, wd = x.shape
    m = cfg.pretrain_grid
    pos = w["pos_embed"][:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    if (h, wd) != (m, m):
        pos = F.interpolate(pos, scale_factor=((h + 0.1) / m, (wd + 0.1) / m), mode="bicubic", align_corners=False)
    x = x.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
    cls = w["cls_token"] + w["pos_embed"][:, :1]
    registers = [w["register_tokens"].expand(b, -1, -1)] if "register_tokens" in w else []
    x = torch.cat([cls.expand(b, -1, -1), *registers, x], dim=1)
    heads = cfg.num_heads
    dh = d // heads

    def ln(t, name):
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-6)

    taps = []
    for i in range(cfg.taps[-1] + 1):
        p = f"blocks.{i}."
        ls1, ls2 = (w[p + "ls1.gamma"], w[p + "ls2.gamma"]) if p + "ls1.gamma" in w else (1.0, 1.0)
        q, k, v = F.linear(ln(x, p + "norm1"), w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"]) \
            .reshape(b, -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5, dim=-1) @ v
        x = x + ls1 * F.linear(att.transpose(1, 2).reshape(b, -1, d), w[p + "attn.proj.weight"],
                               w[p + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, p + "norm2"), w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + ls2 * F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        if i in cfg.taps:
            taps.append(x)
    return taps


def moco_file(sd: dict) -> dict:
    """MoCo v3's .pth.tar: both encoders (the momentum one with other values) and the predictor under
    'module.', projection heads inside the encoders, plus the training state."""
    return {"epoch": 300, "arch": "vit_small",
            "state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                           **{f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()},
                           "module.base_encoder.head.0.weight": torch.zeros(8, 8),
                           "module.predictor.0.weight": torch.zeros(8, 8)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


# name, how the publisher wraps its file
WRAPPINGS = {
    "dinov2_vit_small_14": lambda sd: sd,
    "dinov2reg_vit_base_14": lambda sd: sd,
    "dino_vit_small_8": lambda sd: sd,
    "dino_vit_base_16": lambda sd: sd,
    "mae_vit_base_16": lambda sd: {"model": sd},
    "deit_vit_small_16": lambda sd: {"model": {**sd, "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}},
    "ibot_vit_large_16": lambda sd: {"state_dict": {**sd, "head.mlp.0.weight": torch.zeros(8, 64)}},
    "moco_vit_small_16": moco_file,
}


@pytest.mark.parametrize("name", list(WRAPPINGS))
def test_vit_families_match_a_float64_reading_of_the_publishers_layout(tmp_path, name):
    cfg = tiny(name, taps=(0, 2, 3))
    sd = vit_file(cfg)
    path = tmp_path / cfg.weight_file
    torch.save(WRAPPINGS[name](sd), path)
    enc = build_encoder(cfg).eval()
    assert sorted(enc.state_dict()) == sorted(sd)
    checkpoints.load_encoder_weights(enc, str(path))
    p = cfg.patch_size
    x = torch.randn(2, 3, 5 * p, 7 * p, generator=torch.Generator().manual_seed(1))  # 5 x 7: resampled, not square
    with torch.no_grad():
        ours = enc(x)
    reference = vit_reference(sd, x, cfg)
    prefix = 1 + cfg.num_register_tokens
    assert enc.num_prefix_tokens == prefix and [t.shape for t in ours] == [(2, prefix + 35, 64)] * 3
    scale = max(float(r.abs().max()) for r in reference)
    assert max_error(ours, reference) < TOL * scale
    # the check can fail: weights off by 0.01 (as the momentum encoder's would be) are far outside it
    other = vit_reference({k: v + 0.01 for k, v in sd.items()}, x, cfg)
    assert max_error(ours, other) > 20 * TOL * scale


def beit_file(cfg: EncoderConfig, seed: int = 0) -> dict:
    """Random weights in BEiT's layout (Microsoft's release, as the reference's BEiT class names them): q and v
    biases, a relative position bias table per block, LayerScale, the mean-pooling norm, the classification head
    and the index buffers the release carries."""
    g = torch.Generator().manual_seed(seed)
    d, p, m = cfg.embed_dim, cfg.patch_size, cfg.pretrain_grid

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, d, std=1), "patch_embed.proj.weight": r(d, 3, p, p, std=0.05),
          "patch_embed.proj.bias": r(d), "fc_norm.weight": 1 + r(d), "fc_norm.bias": r(d),
          "head.weight": r(10, d), "head.bias": r(10)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        sd.update({b + "gamma_1": 0.5 + r(d).abs(), b + "gamma_2": 0.5 + r(d).abs(), b + "norm1.weight": 1 + r(d),
                   b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d), b + "attn.q_bias": r(d),
                   b + "attn.v_bias": r(d), b + "attn.relative_position_bias_table":
                       r((2 * m - 1) ** 2 + 3, cfg.num_heads, std=1),
                   b + "attn.relative_position_index": torch.zeros(m * m + 1, m * m + 1, dtype=torch.long),
                   b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d), b + "norm2.weight": 1 + r(d),
                   b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d),
                   b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d)})
    return sd


def beit_reference(sd: dict, x: torch.Tensor, cfg: EncoderConfig) -> list[torch.Tensor]:
    """BEiT's forward in float64 from its layout: [CLS, patches], no position embedding; attention logits plus
    table[index], index = (dy + M - 1) (2M - 1) + dx + M - 1 between two patches, and the table's last three rows
    for CLS to patch, patch to CLS and CLS to CLS; the k bias zero; LayerScale gamma_1, gamma_2."""
    w = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(x.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=cfg.patch_size)
    b, d, h, wd = x.shape
    x = torch.cat([w["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    heads, m = cfg.num_heads, cfg.pretrain_grid
    dh, n = d // heads, (2 * m - 1) ** 2 + 3
    index = torch.empty(h * wd + 1, h * wd + 1, dtype=torch.long)
    for i in range(h * wd):
        for j in range(h * wd):
            index[i + 1, j + 1] = (i // wd - j // wd + m - 1) * (2 * m - 1) + (i % wd - j % wd + m - 1)
    index[0, :], index[:, 0], index[0, 0] = n - 3, n - 2, n - 1

    def ln(t, name):
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-6)

    taps = []
    for i in range(cfg.taps[-1] + 1):
        p = f"blocks.{i}."
        bias = torch.cat([w[p + "attn.q_bias"], torch.zeros(d, dtype=torch.float64), w[p + "attn.v_bias"]])
        q, k, v = F.linear(ln(x, p + "norm1"), w[p + "attn.qkv.weight"], bias).reshape(b, -1, 3, heads, dh) \
            .permute(2, 0, 3, 1, 4)
        rel = w[p + "attn.relative_position_bias_table"][index].permute(2, 0, 1)  # [heads, T, T]
        att = torch.softmax(q @ k.transpose(-1, -2) * dh ** -0.5 + rel, dim=-1) @ v
        x = x + w[p + "gamma_1"] * F.linear(att.transpose(1, 2).reshape(b, -1, d), w[p + "attn.proj.weight"],
                                            w[p + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, p + "norm2"), w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + w[p + "gamma_2"] * F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        if i in cfg.taps:
            taps.append(x)
    return taps


@pytest.mark.parametrize("name", ["beit_vit_base_16", "beitv2_vit_base_16"])
def test_beit_matches_a_float64_reading_of_its_layout(tmp_path, name):
    cfg = tiny(name, taps=(0, 2, 3), fixed_grid=4)
    sd = beit_file(cfg)
    path = tmp_path / cfg.weight_file
    torch.save({"model": sd}, path)
    enc = build_encoder(cfg).eval()
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.") and "relative_position_index" not in k}
    assert sorted(enc.state_dict()) == sorted(backbone)
    checkpoints.load_encoder_weights(enc, str(path))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = enc(x)
    reference = beit_reference(sd, x, cfg)
    assert enc.num_prefix_tokens == 1 and [t.shape for t in ours] == [(2, 17, 64)] * 3
    scale = max(float(r.abs().max()) for r in reference)
    assert max_error(ours, reference) < TOL * scale
    flipped = dict(sd, **{k: v.flip(0) for k, v in sd.items() if k.endswith("relative_position_bias_table")})
    assert max_error(ours, beit_reference(flipped, x, cfg)) > 20 * TOL * scale
    with pytest.raises(UserError, match=r"^--crop_size 448: this encoder takes 224-px crops only \(14 x 14 "
                                        r"patches of 16\); use --crop_size 224$"):
        check_sizes(512, 448, 16, ENCODERS[name].fixed_grid)


def test_registered_vit_families():
    """Patch sizes, prefix tokens, heads and taps as the references build them."""
    c = ENCODERS
    assert (c["dino_vit_small_8"].patch_size, c["dino_vit_small_8"].pretrain_grid) == (8, 28)
    assert (c["dino_vit_base_16"].patch_size, c["dino_vit_base_16"].pretrain_grid) == (16, 14)
    assert c["dinov2_vit_large_14"].num_register_tokens == 0 and c["dinov2reg_vit_large_14"].num_register_tokens == 4
    assert c["dinov2_vit_large_14"].taps == (4, 6, 8, 10, 12, 14, 16, 18) == c["ibot_vit_large_16"].taps
    assert c["moco_vit_small_16"].num_heads == 12 and c["dino_vit_small_16"].num_heads == 6
    assert all(len(cfg.taps) == 8 and cfg.taps[-1] < cfg.depth for n, cfg in c.items() if n != V3)
    assert len({cfg.weight_file for cfg in c.values()}) == len(c)  # one default path each
    assert c["dino_vit_small_8"].url == \
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"


def test_wrong_file_for_an_encoder_is_one_line_naming_it(tmp_path):
    small, base = tiny("dino_vit_small_16"), tiny("dino_vit_small_16", embed_dim=96, num_heads=6)
    path = tmp_path / "vit_b.pth"
    torch.save(vit_file(base), path)
    with pytest.raises(UserError, match=r"^encoder weight file .*vit_b.pth does not match the model: .*wrong shape"):
        checkpoints.load_encoder_weights(build_encoder(small), str(path))
    v3 = tiny("dinov3_vit_small_16")
    path = tmp_path / "dinov3_b.pth"
    torch.save(dinov3_file(dataclasses.replace(v3, embed_dim=96, num_heads=6)), path)
    with pytest.raises(UserError, match=r"^encoder weight file .*dinov3_b.pth does not match the model: .*wrong shape"):
        checkpoints.load_encoder_weights(build_encoder(v3), str(path))
    torch.save(vit_file(small), path)  # a plain ViT file for DINOv3
    with pytest.raises(UserError, match=r"dinov3_b.pth does not match the model: .*missing.*unexpected"):
        checkpoints.load_encoder_weights(build_encoder(v3), str(path))


def test_missing_weight_file_names_the_publishers_address(tmp_path):
    cfg = ENCODERS["mae_vit_large_16"]
    with pytest.raises(UserError) as e:
        checkpoints.build_model("mae_vit_large_16", str(tmp_path / "nope.pth"))
    assert str(e.value) == (f"encoder weight file not found: {tmp_path / 'nope.pth'}; download "
                            f"mae_pretrain_vit_large.pth from {cfg.url} and put it there, or pass "
                            f"--encoder_weights PATH (or 'random' for a smoke run)")
    assert checkpoints.default_encoder_weights("dinov3_vit_large_16") == \
        os.path.join("backbones", "weights", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")


# ----------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_encoder_detection(monkeypatch):
    from conftest import TINY, TINY_CFG
    plain = EncoderConfig(32, 2, 8, tuple(range(8)), "a.pth", patch_size=16, num_register_tokens=0,
                          pretrain_grid=4, family="vit")
    tiny_cfgs = {V3: V3_CFG, "dinov3_tiny_swiglu": dataclasses.replace(V3_CFG, swiglu=True), TINY: TINY_CFG,
                 "dinov2_tiny_noreg": dataclasses.replace(TINY_CFG, num_register_tokens=0),
                 "vit_tiny_a": plain, "vit_tiny_b": dataclasses.replace(plain, weight_file="b.pth"),
                 "beit_tiny": dataclasses.replace(plain, family="beit", fixed_grid=4)}
    for name, cfg in tiny_cfgs.items():
        monkeypatch.setitem(models.ENCODERS, name, cfg)
    for name in (V3, "dinov3_tiny_swiglu", TINY, "dinov2_tiny_noreg", "beit_tiny"):
        sd = ViTill(tiny_cfgs[name]).state_dict()
        assert checkpoints.architecture_from_state_dict(sd, "m.pth") == (name, 8, "mlp")
        assert checkpoints.encoder_from_state_dict(sd, "m.pth", name) == name
    # Dinomaly2 (two-stage bottleneck, recentred targets) on DINOv3: detected, and its maps have the patch grid
    dinomaly2 = ViTill(V3_CFG, bottleneck_kind="two_stage", recenter=True).eval()
    assert checkpoints.architecture_from_state_dict(dinomaly2.state_dict(), "m.pth") == (V3, 8, "two_stage")
    with torch.no_grad():
        en, de = dinomaly2(torch.randn(1, 3, 48, 80))
    assert [t.shape for t in en + de] == [(1, 64, 3, 5)] * 4
    sd = ViTill(plain).state_dict()  # DINO, MAE, DeiT, iBOT share one layout: the run's config.json tells
    with pytest.raises(UserError, match=r"m.pth fits several encoders \(vit_tiny_a, vit_tiny_b\) and has no "
                                        r"config.json beside it; pass --encoder NAME"):
        checkpoints.encoder_from_state_dict(sd, "m.pth")
    assert checkpoints.encoder_from_state_dict(sd, "m.pth", "vit_tiny_b") == "vit_tiny_b"
    with pytest.raises(UserError, match=f"holds a vit_tiny_a / vit_tiny_b model, not {V3}"):
        checkpoints.encoder_from_state_dict(sd, "m.pth", V3)
    sd = ViTill(V3_CFG).state_dict()
    sd["encoder.cls_token"] = torch.zeros(1, 1, 48)
    with pytest.raises(UserError, match=r"no known encoder has this layout \(dinov3, embed dim 48, 8 blocks\)"):
        checkpoints.encoder_from_state_dict(sd, "m.pth")


# ----------------------------------------------------------------------------------------------- patch size

def test_crop_not_a_multiple_of_the_patch_is_one_line_with_suggestions(capsys):
    with pytest.raises(UserError, match=r"^--crop_size 392 is not a multiple of the encoder's patch size 16; use 384 "
                                        r"or 400 \(with a --image_size at least that large\)$"):
        check_sizes(448, 392, 16)
    check_sizes(512, 448, 16)
    check_sizes(448, 392, 14)
    with pytest.raises(UserError, match="use 14 or 28"):
        check_sizes(64, 20, 14)
    with pytest.raises(UserError, match=r"use 16 \("):
        check_sizes(64, 10, 16)
    with pytest.raises(SystemExit) as e:  # at parse time, before PyTorch is imported (test_silent.py)
        cli.parse("", dinomaly_mvtec_uni.RECIPE, dinomaly_mvtec_uni.DEFAULTS, argv=[
            "--encoder", V3, "--data_path", "/nonexistent/mvtec", "--encoder_weights", "random"])
    assert e.value.code == 2
    assert "--crop_size 392 is not a multiple of the encoder's patch size 16; use 384" in capsys.readouterr().err
    with pytest.raises(UserError, match="patch size 16"):
        benchmark.main(["infer", "--encoder", V3, "--device", "cpu", "--crop_size", "56"])


# ----------------------------------------------------------------------------------------------- runs

def test_dinomaly_trains_with_a_tiny_dinov3_and_the_run_folder_remembers_it(tmp_path):
    from test_end_to_end import RUN, run_script
    demo = make_demo_data(str(tmp_path / "data"), size=64, seed=0, n_train=4, n_test_good=2, n_test_bad=2)
    small = ["--encoder_weights", "random", "--image_size", "64", "--crop_size", "64", *RUN]
    run_script(dinomaly_mvtec_uni,
               ["--data_path", demo["mvtec"], "--encoder", V3, "--total_iters", "2", "--batch_size", "2",
                "--save_dir", str(tmp_path), "--save_name", "v3", *small])
    sd = torch.load(tmp_path / "v3" / "model.pth", weights_only=True)
    assert "encoder.storage_tokens" in sd and "encoder.blocks.0.attn.qkv.bias_mask" in sd
    assert checkpoints.architecture_from_state_dict(sd, "model.pth") == (V3, 8, "mlp")
    first = (tmp_path / "v3" / "scores.csv").read_text()
    run_script(dinomaly_mvtec_uni, ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(tmp_path / "v3"),
                                    "--save_dir", str(tmp_path), "--save_name", "again", *RUN])
    again = (tmp_path / "again" / "scores.csv").read_text()
    assert [r.split(",")[:3] for r in again.splitlines()] == [r.split(",")[:3] for r in first.splitlines()]
    scores = [[float(r.split(",")[3]) for r in t.splitlines()[1:]] for t in (first, again)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    assert "64 -> 64 px" in (tmp_path / "again" / "log.txt").read_text()
    # predict and export build the run's encoder from its config.json
    detector = predict.Detector(str(tmp_path / "v3"), device="cpu")
    assert detector.mapper.model.encoder.cfg == V3_CFG and detector.crop_size == 64
    cli.export_main(["--checkpoint", str(tmp_path / "v3"), "--out", str(tmp_path / "v3.onnx")])
    assert (tmp_path / "v3.onnx").is_file()


def test_dinomaly2_few_shot_trains_with_a_tiny_dinov3_and_reloads(tmp_path):
    from test_end_to_end import RUN

    import dinomaly2_fewshot
    demo = make_demo_data(str(tmp_path / "data"), size=64, seed=0, n_train=4, n_test_good=2, n_test_bad=2)
    argv = ["--data_path", demo["mvtec"], "--encoder", V3, "--encoder_weights", "random", "--image_size", "64",
            "--crop_size", "64", "--total_iters", "2", "--batch_size", "2", "--shot", "2", "--save_dir",
            str(tmp_path), *RUN]
    cli.run_script(dinomaly2_fewshot, ["--save_name", "v3_mvtec", *argv])
    run = tmp_path / "v3_mvtec"
    sd = torch.load(run / "model.pth", weights_only=True)
    assert checkpoints.architecture_from_state_dict(sd, "model.pth") == (V3, 8, "two_stage")
    config = json.loads((run / "config.json").read_text())["model"]
    assert (config["encoder"], config["method"], config["setting"]) == (V3, "dinomaly2", "2-shot")
    detector = predict.Detector(str(run), device="cpu")
    assert detector.mapper.model.encoder.cfg == V3_CFG and detector.mapper.model.recenter
    rows = (run / "scores.csv").read_text().splitlines()[1:]
    path, score = rows[0].split(",")[1], float(rows[0].split(",")[3])
    assert detector(path).score == pytest.approx(score, rel=1e-5)


def test_benchmark_takes_the_encoder(tmp_path):
    common = ["--encoder", V3, "--device", "cpu", "--compile", "none", "--batch_size", "2", "--image_size", "64",
              "--crop_size", "64", "--warmup", "0", "--iters", "1"]
    out = benchmark.main(["infer", *common, "--tasks", "dinomaly", "--json", str(tmp_path / "i.json")])
    assert out["settings"]["encoder"] == V3 and out["results"]
    out = benchmark.main(["train", *common, "--steps", "dinomaly", "--source_size", "64", "--n_train", "2",
                          "--num_workers", "0", "--json", str(tmp_path / "t.json")])
    assert out["settings"]["encoder"] == V3 and {r["step"] for r in out["results"]} == {"dinomaly"}
