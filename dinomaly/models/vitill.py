"""ViTill, the reconstruction model of Dinomaly, CRR (optional bottleneck masking) and Dinomaly2 (two-stage
bottleneck, context-aware recentering of the encoder targets, a choice of tap groups and attention, and two
modalities in one input: RGB + depth fused per tap as the preview's DinomalyRGBD, RGB + infrared side by side).

The state dict is the official one: `encoder.*` (the publisher's names), `bottleneck.*` (decoder.bottleneck),
`decoder.{i}.*`.
"""
import dataclasses
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .decoder import bottleneck, decoder_block
from .encoder import EncoderConfig, build_encoder


def mask_seed(key: bytes) -> int:
    """A seed for one image's test-time mask (mask_rng "device"): a 64-bit hash of `key`, the same key giving the
    same mask."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors, dim=1).mean(dim=1)


# Dinomaly2's `--lc` ("loose constraint"): which of the 8 taps (and of the 8 reversed decoder outputs) are averaged
# into each compared group. 2 is Dinomaly's fixed choice and Dinomaly2's default.
GROUPINGS = {
    0: [[0], [1], [2], [3], [4], [5], [6], [7]],
    1: [[0, 1, 2, 3, 4, 5, 6, 7]],
    2: [[0, 1, 2, 3], [4, 5, 6, 7]],
    3: [[0, 1, 2], [3, 4, 5], [6, 7]],
    4: [[0, 1], [2, 3], [4, 5], [6, 7]],
    11: [[7]],
    12: [[3], [7]],
    14: [[1], [3], [5], [7]],
}
RECENTER_EPS = 1e-8  # the layer norm of Dinomaly2's recentred targets
# What an input holds (modality): "rgb" an image [B, 3, H, W]; "rgbd" and "rgbir" a pair [B, 6, H, W], the RGB
# image's channels then the depth's (coloured) or the infrared image's. Both halves of a pair go through the same
# frozen encoder as separate images. "rgbd": each tap is then RGB_WEIGHT * rgb + (1 - RGB_WEIGHT) * depth (all
# tokens), and the rest is as for an image (the preview's DinomalyRGBD, rgb_ratio 0.5). "rgbir": the two halves stay
# separate images, [rgb_0 .. rgb_B-1, ir_0 .. ir_B-1] (the preview's forward of cat([rgb, infrared])): en and de
# hold 2B maps.
MODALITIES = {"rgb": 3, "rgbd": 6, "rgbir": 6}  # -> input channels
RGB_WEIGHT = 0.5
TAPS = 8  # the groupings pair 8 taps with the 8 decoder outputs


def checked_taps(taps, depth: int) -> tuple[int, ...]:
    """8 distinct blocks of an encoder of `depth` blocks, in increasing order (--taps)."""
    taps = tuple(taps)
    if len(taps) != TAPS or list(taps) != sorted(set(taps)) or taps[0] < 0 or taps[-1] >= depth:
        raise UserError(f"--taps {' '.join(map(str, taps))}: give {TAPS} different blocks in increasing order, "
                        f"from 0 to {depth - 1} (this encoder has {depth})")
    return taps


def recentered(tokens: torch.Tensor, num_prefix: int, dim: int) -> torch.Tensor:
    """Dinomaly2's context-aware recentering of an encoder group [B, T, dim]: each patch token minus the CLS token
    (token 0) of the same group, then layer-normalised over the channels without affine parameters. (`dim` is
    passed, not read from the shape, so that an ONNX export keeps it a constant.)"""
    return F.layer_norm(tokens[:, num_prefix:] - tokens[:, :1], (dim,), eps=RECENTER_EPS)


class ViTill(nn.Module):
    def __init__(self, encoder_cfg: EncoderConfig, dropout: float = 0.2, decoder_depth: int = 8,
                 mask_ratio: float = 0.0, mask_in_eval: bool = False, attn_eps: float = 0.0,
                 bottleneck_kind: str = "mlp", recenter: bool = False, lc: int = 2, linear_attention: bool = True,
                 taps: tuple[int, ...] | None = None, modality: str = "rgb"):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r} (expected one of {sorted(MODALITIES)})")
        self.modality = modality
        d, heads = encoder_cfg.embed_dim, encoder_cfg.num_heads
        if lc not in GROUPINGS:
            raise ValueError(f"unknown tap grouping lc={lc} (expected one of {sorted(GROUPINGS)})")
        if taps is not None:  # other blocks than the encoder's standard taps
            encoder_cfg = dataclasses.replace(encoder_cfg, taps=checked_taps(taps, encoder_cfg.depth))
        self.encoder = build_encoder(encoder_cfg)
        self.encoder.requires_grad_(False)
        self.bottleneck = bottleneck(bottleneck_kind, d, dropout)
        self.decoder = nn.ModuleList([decoder_block(d, heads, attn_eps, linear_attention)
                                      for _ in range(decoder_depth)])
        self.groups = GROUPINGS[lc]
        self.recenter = recenter  # Dinomaly2: targets LN(patches - CLS) per group
        self.mask_ratio = mask_ratio  # CRR: probability of zeroing each scalar of the bottleneck input
        self.mask_in_eval = mask_in_eval  # CRR's released test keeps the masking on in eval mode
        self.mask_rng = "cpu"  # where eval-mode masks are drawn: "cpu" (the released code) or "device"
        self.bottleneck.apply(init_weights)
        self.decoder.apply(init_weights)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen, and it has no dropout: eval keeps it deterministic either way
        return self

    @property
    def test_mask(self) -> str:
        """"on" when eval-mode forward passes mask the bottleneck input (CRR's test), else "off"."""
        return "on" if self.mask_ratio > 0 and self.mask_in_eval else "off"

    def bottleneck_mask(self, x: torch.Tensor, mask_seeds: list[int] | None = None) -> torch.Tensor:
        """CRR's element-wise mask: 0 with probability mask_ratio. In training it is drawn on x's device. In eval
        mode it is drawn from the CPU generator as the released code does (mask_rng "cpu"), so a seeded run
        reproduces its masks; with mask_rng "device" on x's device instead, each image's from a generator
        seeded with its entry of `mask_seeds` when given (then an image's mask does not depend on its batch)."""
        if self.mask_rng not in ("cpu", "device"):
            raise ValueError(f"unknown mask_rng {self.mask_rng!r} (expected 'cpu' or 'device')")
        keep = 1 - self.mask_ratio
        if self.training or self.mask_rng == "device" and mask_seeds is None:
            return (torch.rand_like(x) <= keep).to(x.dtype)
        if self.mask_rng == "device":
            if len(mask_seeds) != x.shape[0]:
                raise ValueError(f"{len(mask_seeds)} mask seeds for a batch of {x.shape[0]}")
            gens = [torch.Generator(x.device).manual_seed(s) for s in mask_seeds]
            u = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device) for g in gens])
            return (u <= keep).to(x.dtype)
        return (torch.rand(x.shape) <= keep).to(x.device, x.dtype)

    def forward(self, x: torch.Tensor, mask_seeds: list[int] | None = None) -> tuple[list[torch.Tensor],
                                                                                       list[torch.Tensor]]:
        """[B, 3, H, W] -> (en, de): two lists (one map per group) of [B, D, H/14, W/14]. `mask_seeds`: one
        seed per image for eval-mode masks drawn on the device (see bottleneck_mask)."""
        taps, grid = self.tapped(x)  # 8 x [B, T, D]
        x = mean_of(taps)
        if self.mask_ratio > 0 and (self.training or self.mask_in_eval):
            x = x * self.bottleneck_mask(x, mask_seeds)
        x = self.bottleneck(x)
        outs = []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        outs = outs[::-1]  # index 0 = last decoder block
        de = [mean_of([outs[i] for i in g])[:, self.encoder.num_prefix_tokens:] for g in self.groups]
        return self.group_features(taps, grid), [token_map(t, grid) for t in de]

    def encoded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """en alone (the frozen encoder's group features, nothing decoded): [B, 3, H, W] -> one [B, D, h, w] per
        group, the same as forward's."""
        return self.group_features(*self.tapped(x))

    def tapped(self, x: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The frozen encoder's 8 taps of an input (a pair's halves fused for "rgbd", side by side for "rgbir"; see
        MODALITIES) and the patch grid."""
        channels = MODALITIES[self.modality]
        if x.shape[1] != channels:
            raise ValueError(f"a {self.modality} model takes inputs of {channels} channels, not {x.shape[1]}")
        grid = x.shape[-2] // self.encoder.cfg.patch_size, x.shape[-1] // self.encoder.cfg.patch_size
        if channels == 6:
            x = torch.cat([x[:, :3], x[:, 3:]])
        with torch.no_grad():
            taps = self.encoder(x)
        if self.modality == "rgbd":
            b = taps[0].shape[0] // 2
            taps = [RGB_WEIGHT * t[:b] + (1 - RGB_WEIGHT) * t[b:] for t in taps]
        return taps, grid

    def group_features(self, taps: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
        """The encoder's taps -> en: per group their mean (Dinomaly2: recentred), patch tokens as [B, D, h, w]."""
        p = self.encoder.num_prefix_tokens
        en = [mean_of([taps[i] for i in g]) for g in self.groups]
        return [token_map(recentered(e, p, self.encoder.cfg.embed_dim) if self.recenter else e[:, p:], grid)
                for e in en]


def token_map(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, N, D] -> [B, D, h, w]."""
    return t.transpose(1, 2).reshape(t.shape[0], -1, *grid)


def init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
