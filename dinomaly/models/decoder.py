"""The bottlenecks and decoder layers: Dinomaly's (and CRR's) and Dinomaly2's."""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

BOTTLENECKS = ("mlp", "two_stage")
TWO_STAGE_WIDTH = 256  # Dinomaly2's narrow first bottleneck layer


class LinearAttention(nn.Module):
    """Linear attention with the elu+1 feature map: no softmax, no 1/sqrt(d) scaling.

    Per head: KV = k^T v, z_s = 1 / (q_s . sum_t k_t), out_s = z_s q_s KV. `eps` (default 0, as official) is
    added to the denominator when set.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, eps: float = 0.0, **_):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal=False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, d]
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = torch.einsum("bhsd,bhse->bhde", k, v)  # [B, H, d, d]
        z = 1.0 / (torch.einsum("bhsd,bhd->bhs", q, k.sum(dim=-2)) + self.eps)  # [B, H, N]
        x = torch.einsum("bhde,bhsd,bhs->bhse", kv, q, z)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


def decoder_block(dim: int, num_heads: int, attn_eps: float = 0.0, linear: bool = True) -> Block:
    """Pre-norm transformer block, LayerNorm eps 1e-8, no LayerScale: linear attention (with `attn_eps` in its
    denominator), or softmax attention (Dinomaly2's `--la 0` ablation; timm's, the same keys qkv and proj)."""
    if not linear:
        return Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-8))
    block = Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-8),
                  attn_layer=LinearAttention)
    block.attn.eps = attn_eps
    return block


class BottleneckMLP(nn.Module):
    """Dropout -> Linear(D, 4D) -> GELU -> Dropout -> Linear(4D, D) -> Dropout; the same rate three times."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.drop(x))))))


def bottleneck(kind: str, dim: int, dropout: float) -> nn.Sequential:
    """The noisy bottleneck between the encoder's fused taps and the decoder, in the official key layouts.

    "mlp" (Dinomaly, CRR): `bottleneck.0.fc1/fc2`, BottleneckMLP(D, 4D).
    "two_stage" (Dinomaly2): `bottleneck.0.0` Linear(D, 256) -> Dropout, then `bottleneck.1.0` Linear(256, 4D) ->
    GELU -> Dropout -> `bottleneck.1.3` Linear(4D, D) -> Dropout; no dropout on its input.
    """
    if kind == "mlp":
        return nn.Sequential(BottleneckMLP(dim, 4 * dim, dropout))
    if kind == "two_stage":
        return nn.Sequential(
            nn.Sequential(nn.Linear(dim, TWO_STAGE_WIDTH), nn.Dropout(dropout)),
            nn.Sequential(nn.Linear(TWO_STAGE_WIDTH, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                          nn.Dropout(dropout)))
    raise ValueError(f"unknown bottleneck {kind!r} (expected 'mlp' or 'two_stage')")
