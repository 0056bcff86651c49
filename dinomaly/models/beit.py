"""A frozen BEiT / BEiT v2 ViT (relative position bias per block, LayerScale, no absolute position embedding) on
timm's `Beit` parts, in the publisher's key layout (timm's names are Microsoft's).

Each block's relative position bias table covers the patch grid the model was trained at (14 x 14, 224 px). The
Dinomaly reference builds BEiT for that size only (any other crop fails at its first forward), and the table
resampling it would use for other sizes needs SciPy's `interp2d`, which SciPy no longer has; so this encoder
takes that grid only (encoders.check_sizes says so before a run starts).
"""
import torch
import torch.nn as nn
from timm.models.beit import Beit

from .vit import tap_outputs


class BeitEncoder(nn.Module):
    """Token sequence [CLS, P1..PN]; returns the raw outputs of the tap blocks (no final norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        vit = Beit(img_size=cfg.pretrain_grid * cfg.patch_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                   depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=4.0, use_abs_pos_emb=False,
                   use_rel_pos_bias=True, init_values=0.1, num_classes=0, global_pool="avg")
        self.patch_embed, self.cls_token, self.blocks = vit.patch_embed, vit.cls_token, vit.blocks
        self.fc_norm = vit.fc_norm  # never applied; part of the publisher's layout

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def fix_grid(self, grid_h: int, grid_w: int):
        """For a static exported graph: nothing to store, the grid is fixed already."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)  # [B, N, D]; timm checks the input is the trained size
        return tap_outputs(self.blocks, torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1), self.cfg.taps)
