"""A frozen ViT with a learned absolute position embedding, in its publisher's key layout: DINOv2 (with or without
registers), DINO, MAE, DeiT, iBOT and MoCo v3.

Built from timm's ViT `Block` and `PatchEmbed`, whose parameter names are those of all these publishers (timm's
layout is theirs), so their files load strictly. The position embedding is interpolated to the input's patch grid
the way DINO and DINOv2 do it (offset 0.1, bicubic, no antialias; the Dinomaly reference runs every one of these
encoders through DINO's ViT class, which does exactly that); timm's own resampling gives other values.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block


def interpolate_patch_pos_embed(patch_pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, M*M, D] position embedding of an M x M grid -> [1, grid_h*grid_w, D], as the official code does it."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = int(math.sqrt(n))
    if grid_h == m and grid_w == m:
        return patch_pos
    grid = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / m, (grid_w + 0.1) / m), mode="bicubic",
                         align_corners=False, antialias=False)
    assert grid.shape[-2:] == (grid_h, grid_w)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(patch_pos.dtype)


def tap_outputs(blocks: nn.ModuleList, x: torch.Tensor, taps: tuple[int, ...], **kwargs) -> list[torch.Tensor]:
    """Run the blocks up to the last tap (keyword arguments passed to each); the raw outputs of the tap blocks,
    len(taps) x [B, T, D]."""
    out = []
    for i, blk in enumerate(blocks[: taps[-1] + 1]):
        x = blk(x, **kwargs)
        if i in taps:
            out.append(x)
    return out


class ViTEncoder(nn.Module):
    """Token sequence [CLS, R1..Rr, P1..PN] (r registers, DINOv2-R only); returns the raw outputs of the tap blocks
    (no final norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(img_size=None, patch_size=cfg.patch_size, embed_dim=d, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pretrain_grid ** 2, d))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        dinov2 = cfg.family == "dinov2"  # DINOv2 adds LayerScale and a (pretraining-only) mask token
        if dinov2:
            self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused; kept so DINOv2's files load strictly
        self.blocks = nn.ModuleList([
            Block(d, cfg.num_heads, mlp_ratio=4.0, qkv_bias=True, init_values=1e-5 if dinov2 else None,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)  # never applied; part of the publishers' layout
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if cfg.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + R + N, D]."""
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        x = self.patch_embed(x)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = self.pos_embed.float()
        pos = torch.cat([pos[:, :1], interpolate_patch_pos_embed(pos[:, 1:], h // p, w // p)], dim=1)
        x = x + pos.to(x.dtype)
        if not self.cfg.num_register_tokens:
            return x
        return torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)

    def fix_grid(self, grid_h: int, grid_w: int):
        """Store the position embedding already interpolated to one patch grid (for a static exported graph)."""
        pos = self.pos_embed.data
        self.pos_embed = nn.Parameter(torch.cat([pos[:, :1], interpolate_patch_pos_embed(pos[:, 1:], grid_h, grid_w)],
                                                dim=1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return tap_outputs(self.blocks, self.prepare_tokens(x), self.cfg.taps)
