"""Networks and checkpoints against independent float64 references."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinomaly import checkpoints, models
from dinomaly.errors import UserError
from dinomaly.models.decoder import LinearAttention
from dinomaly.encoders import ENCODERS
from dinomaly.models.segnet import SegmentationNet, segmentation_input
from dinomaly.models.vit import ViTEncoder, interpolate_patch_pos_embed
from dinomaly.models.vitill import ViTill

from conftest import DEVICES, TINY, TINY_CFG


def naive_linear_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """Float64, one head and one query at a time, straight from the formula."""
    x = x.double()
    b, n, c = x.shape
    d = c // heads
    qkv = x @ qkv_w.double().T + qkv_b.double()
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    out = torch.zeros(b, n, c, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qh, kh, vh = F.elu(q[bi, :, sl]) + 1, F.elu(k[bi, :, sl]) + 1, v[bi, :, sl]
            kv = sum(torch.outer(kh[t], vh[t]) for t in range(n))
            ksum = kh.sum(0)
            for s in range(n):
                out[bi, s, sl] = (qh[s] @ kv) / (qh[s] @ ksum)
    return out @ proj_w.double().T + proj_b.double()


def test_linear_attention_matches_naive_float64():
    torch.manual_seed(0)
    attn = LinearAttention(16, num_heads=4)
    x = torch.randn(2, 7, 16)
    ref = naive_linear_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 4)
    torch.testing.assert_close(attn(x).double(), ref, rtol=1e-5, atol=1e-6)


def cubic_weights(t, a=-0.75):
    """PyTorch's bicubic kernel (Keys, a = -0.75) for the 4 taps around a fractional offset t."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1
    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def naive_bicubic_scale(grid, scale, out):
    """Float64 bicubic resampling of [M, M, D] with a given scale factor (align_corners=False, border clamp)."""
    m = grid.shape[0]
    def axis_weights(o):
        src = (o + 0.5) / scale - 0.5
        i0 = math.floor(src)
        return [(min(max(i0 - 1 + j, 0), m - 1), w) for j, w in enumerate(cubic_weights(src - i0))]
    res = np.zeros((out, out, grid.shape[2]))
    for oy in range(out):
        for ox in range(out):
            for iy, wy in axis_weights(oy):
                for ix, wx in axis_weights(ox):
                    res[oy, ox] += wy * wx * grid[iy, ix]
    return res


@pytest.mark.parametrize("grid", [28, 16, 8])
def test_pos_embed_interpolation_uses_official_offset(grid):
    torch.manual_seed(0)
    m, d = 37, 3
    pos = torch.randn(1, m * m, d)
    out = interpolate_patch_pos_embed(pos, grid, grid)
    assert out.shape == (1, grid * grid, d)
    ref = naive_bicubic_scale(pos[0].reshape(m, m, d).double().numpy(), (grid + 0.1) / m, grid)
    np.testing.assert_allclose(out[0].reshape(grid, grid, d).numpy(), ref, rtol=1e-4, atol=1e-5)
    # the offset matters: resampling to the plain size gives other values
    plain = F.interpolate(pos.reshape(1, m, m, d).permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic")
    assert not torch.allclose(plain.permute(0, 2, 3, 1).reshape(1, -1, d), out, atol=1e-4)


def test_pos_embed_at_518_is_unchanged_and_tokens_are_laid_out_officially():
    pos = torch.randn(1, 37 * 37, 4)
    assert interpolate_patch_pos_embed(pos, 37, 37) is pos
    enc = ViTEncoder(TINY_CFG)
    torch.nn.init.normal_(enc.register_tokens)
    x = torch.randn(2, 3, 56, 56)
    tokens = enc.prepare_tokens(x)
    assert tokens.shape == (2, 1 + 4 + 16, 32)
    # CLS gets its own position embedding, registers get none and sit right after CLS
    torch.testing.assert_close(tokens[:, 0], (enc.cls_token + enc.pos_embed[:, :1])[:, 0].expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:5], enc.register_tokens.expand(2, -1, -1))
    patches = enc.patch_embed(x) + interpolate_patch_pos_embed(enc.pos_embed[:, 1:], 4, 4)
    torch.testing.assert_close(tokens[:, 5:], patches)


def meta_keys(depth):
    """The key list of Meta's weight files, written out by hand from the DINOv2 reg4 architecture."""
    keys = ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
            "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(depth):
        for part in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]:
            keys.append(f"blocks.{i}.{part}")
    return keys


def official_reconstruction_keys(depth, decoder_depth=8):
    keys = [f"encoder.{k}" for k in meta_keys(depth)]
    keys += [f"bottleneck.0.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")]
    for i in range(decoder_depth):
        for part in ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]:
            keys += [f"decoder.{i}.{part}.weight", f"decoder.{i}.{part}.bias"]
    return keys


def test_meta_layout_loads_strictly(tmp_path):
    cfg = ENCODERS["dinov2reg_vit_small_14"]
    enc = ViTEncoder(cfg)
    assert sorted(enc.state_dict()) == sorted(meta_keys(12))
    assert enc.pos_embed.shape == (1, 1370, 384) and enc.register_tokens.shape == (1, 4, 384)
    sd = {k: torch.randn_like(v) for k, v in enc.state_dict().items()}
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    fresh = ViTEncoder(cfg)
    checkpoints.load_encoder_weights(fresh, str(path))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    del sd["blocks.3.ls1.gamma"]
    torch.save(sd, path)
    with pytest.raises(UserError, match="missing.*blocks.3.ls1.gamma"):
        checkpoints.load_encoder_weights(ViTEncoder(cfg), str(path))


def test_missing_weight_file_names_path_and_source(tmp_path):
    with pytest.raises(UserError) as e:
        checkpoints.build_model("dinov2reg_vit_base_14", str(tmp_path / "nope.pth"))
    msg = str(e.value)
    assert "nope.pth" in msg and "dinov2_vitb14_reg4_pretrain.pth" in msg and "\n" not in msg


def test_official_layout_checkpoint_round_trip(tmp_path):
    model = ViTill(ENCODERS["dinov2reg_vit_small_14"])
    assert sorted(model.state_dict()) == sorted(official_reconstruction_keys(12))
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "model.pth"
    torch.save(sd, path)
    loaded = checkpoints.load_model(str(path))
    assert loaded.encoder.cfg == ENCODERS["dinov2reg_vit_small_14"]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(UserError, match="not dinov2reg_vit_base_14"):
        checkpoints.load_model(str(path), encoder="dinov2reg_vit_base_14")
    backbone = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}, backbone)
    with pytest.raises(UserError, match="plain encoder weight file"):
        checkpoints.load_model(str(backbone))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        checkpoints.load_model(str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name,count", [("dinov2reg_vit_small_14", 15_377_280), ("dinov2reg_vit_base_14", 61_425_408),
                                        ("dinov2reg_vit_large_14", 109_163_520)])
def test_trainable_parameter_counts(name, count):
    with torch.device("meta"):  # shapes only: fast
        model = ViTill(ENCODERS[name])
    assert sum(p.numel() for p in model.trainable_parameters()) == count
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_vitill_groups_and_reversal(tiny_encoder):
    torch.manual_seed(0)
    model = ViTill(models.encoder_config(TINY), dropout=0.0).eval()
    x = torch.randn(2, 3, 56, 56)
    en, de = model(x)
    assert len(en) == 2 and en[0].shape == (2, 32, 4, 4)
    taps = model.encoder(x)
    h = torch.stack(taps, 1).mean(1)
    h = model.bottleneck(h)
    outs = []
    for blk in model.decoder:
        h = blk(h)
        outs.append(h)
    # encoder taps 0-3 pair with the LAST four decoder blocks
    ref_en0 = torch.stack(taps[:4], 1).mean(1)[:, 5:].transpose(1, 2).reshape(2, 32, 4, 4)
    ref_de0 = torch.stack(outs[4:], 1).mean(1)[:, 5:].transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(en[0], ref_en0)
    torch.testing.assert_close(de[0], ref_de0)


def test_init_of_trainable_parts():
    torch.manual_seed(0)
    model = ViTill(ENCODERS["dinov2reg_vit_small_14"])
    w = model.decoder[0].mlp.fc1.weight
    assert w.abs().max() <= 0.03 and 0.0095 < w.std() < 0.0101  # N(0, 0.01) cut at 3 sigma: std 0.00986
    assert torch.all(model.decoder[0].attn.qkv.bias == 0)
    assert torch.all(model.decoder[0].norm1.weight == 1) and model.decoder[0].norm1.eps == 1e-8


def test_masking_ratio_and_modes(tiny_encoder):
    torch.manual_seed(0)
    model = ViTill(models.encoder_config(TINY), mask_ratio=0.4, mask_in_eval=True)
    x = torch.ones(4, 21, 32)
    for mode in (True, False):
        model.train(mode)
        kept = model.bottleneck_mask(x)
        assert set(kept.unique().tolist()) == {0.0, 1.0}
        assert abs(1 - kept.mean().item() - 0.4) < 0.02
    model.mask_in_eval = False
    model.eval()
    torch.manual_seed(1)
    a = model(torch.randn(1, 3, 56, 56))
    b = model(torch.randn(1, 3, 56, 56) * 0 + torch.randn(1, 3, 56, 56))
    torch.manual_seed(1)
    a2 = model(torch.randn(1, 3, 56, 56))
    torch.testing.assert_close(a[1][0], a2[1][0])  # deterministic without test-time masking
    del b


@pytest.mark.parametrize("device", DEVICES)
def test_eval_masks_cpu_stream_or_seeded_per_image(tiny_encoder, device):
    model = ViTill(models.encoder_config(TINY), mask_ratio=0.4, mask_in_eval=True).eval()
    x = torch.ones(3, 21, 32, device=device)
    # "cpu" (default): the released code's draw, torch.rand((B, N, C)) on the CPU generator, kept where <= 1 - ratio
    torch.manual_seed(5)
    kept = model.bottleneck_mask(x, mask_seeds=[1, 2, 3])  # seeds are ignored
    torch.manual_seed(5)
    torch.testing.assert_close(kept, (torch.rand(3, 21, 32) <= 0.6).float().to(device), rtol=0, atol=0)
    # "device": each image's mask from its own seed, whatever else is in the batch
    model.mask_rng = "device"
    together = model.bottleneck_mask(x, mask_seeds=[7, 8, 9])
    alone = torch.cat([model.bottleneck_mask(x[:1], mask_seeds=[s]) for s in (7, 8, 9)])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    g = torch.Generator(device).manual_seed(8)
    torch.testing.assert_close(together[1], (torch.rand(21, 32, generator=g, device=device) <= 0.6).float(), rtol=0,
                               atol=0)
    assert not torch.equal(together[0], together[1])
    big = model.bottleneck_mask(torch.ones(2, 400, 50, device=device), mask_seeds=[1, 2])
    assert abs(1 - big.mean().item() - 0.4) < 0.01
    with pytest.raises(ValueError, match="2 mask seeds for a batch of 3"):
        model.bottleneck_mask(x, mask_seeds=[1, 2])
    # without seeds (CRR Stage II's frozen model): drawn on the device from its generator
    torch.manual_seed(5)
    a = model.bottleneck_mask(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, (torch.rand_like(x) <= 0.6).float(), rtol=0, atol=0)


def test_mask_seeds_per_seed_class_and_image():
    from dinomaly import evaluate
    seeds = evaluate.mask_seeds(1, "nut", [0, 1, 2]) + evaluate.mask_seeds(1, "weave", [0, 1]) + \
        evaluate.mask_seeds(2, "nut", [0])
    assert len(set(seeds)) == 6 and all(0 <= s < 2 ** 64 for s in seeds)
    assert evaluate.mask_seeds(1, "nut", [2, 0]) == [seeds[2], seeds[0]]  # a function of the image, not the batch


def test_segmentation_input_formula():
    torch.manual_seed(0)
    en = [torch.randn(2, 5, 3, 3) for _ in range(2)]
    de = [torch.randn(2, 5, 3, 3, requires_grad=True) for _ in range(2)]
    out = segmentation_input(en, de)
    assert out.shape == (2, 10, 3, 3)
    e, d = en[1].double(), de[1].detach().double()
    ref = -(e / e.norm(dim=1, keepdim=True)) * (d / d.norm(dim=1, keepdim=True))
    torch.testing.assert_close(out[:, 5:].double(), ref)
    # summed over channels it is minus the cosine similarity
    torch.testing.assert_close(out[:, :5].sum(1), -F.cosine_similarity(en[0], de[0], dim=1), rtol=1e-5, atol=1e-6)


def test_segmentation_net_shapes_params_and_init():
    with torch.device("meta"):
        net = SegmentationNet(base_width=2 * 768 // 8)
    n = sum(p.numel() for p in net.parameters())
    assert 69e6 < n < 71e6
    assert net.up1[1].in_channels == 1536 and net.db4[3].out_channels == 48 and net.fin_out[0].out_channels == 2
    net = SegmentationNet(base_width=32)
    assert abs(net.db1[0].weight.std().item() - 0.02) < 1e-3
    bn = net.db1[1]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.weight.std() > 0.01 and torch.all(bn.bias == 0)
    assert {"up1.1.weight", "db1.4.running_var", "db4.3.weight", "fin_out.0.bias"} <= set(net.state_dict())
    small = SegmentationNet(base_width=8).eval()
    assert small(torch.randn(1, 64, 7, 7)).shape == (1, 2, 256, 256)
