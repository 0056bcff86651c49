"""A frozen DINOv3 ViT (RoPE, 4 storage tokens, LayerScale, masked k bias; SwiGLU in S+ and H+) on timm's `Eva`,
presenting and loading Meta's key layout.

timm's Eva computes what Meta's `DinoVisionTransformer` computes in eval mode, with other parameter names. The
module's state dict is Meta's (`cls_token`, `storage_tokens`, `mask_token`, `rope_embed.periods`,
`blocks.i.attn.qkv.bias` + `bias_mask`, `blocks.i.ls1.gamma`, `mlp.w1/w2/w3`, ...), converted to and from timm's
by state-dict hooks, so Meta's weight files and the Dinomaly2 preview's checkpoints (`encoder.*` in Meta's layout)
load strictly, and ours load into the preview. Two values that timm does not keep are handled here:
- RoPE periods: Meta's files carry `rope_embed.periods` (stored in bf16 in the released files); the file's values
  replace timm's recomputed float32 ones, so the features are Meta's.
- the k bias: Meta masks the k third of the qkv bias with `bias_mask` (1 for q and v, 0 for k); timm keeps a zero
  k bias. A file whose mask is anything else is refused.
Meta's training-time RoPE coordinate rescaling is not implemented by timm: the encoder is deterministic.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models.eva import Eva

from ..errors import UserError
from .vit import tap_outputs


def renames(swiglu: bool) -> dict[str, str]:
    """Meta's name parts -> timm's (the qkv bias, its mask and the RoPE periods are converted apart)."""
    ffn = {"mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.", "mlp.w3.": "mlp.fc2."} if swiglu else {}
    return {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2", **ffn}


def meta_to_timm_name(name: str, swiglu: bool) -> str:
    if name == "storage_tokens":
        return "reg_token"
    for meta, timm_name in renames(swiglu).items():
        name = name.replace(meta, timm_name)
    return name


def timm_to_meta_name(name: str, swiglu: bool) -> str:
    if name == "reg_token":
        return "storage_tokens"
    for meta, timm_name in renames(swiglu).items():
        name = name.replace(timm_name, meta)
    return name


class DinoV3Encoder(nn.Module):
    """Token sequence [CLS, S1..S4, P1..PN]; returns the raw outputs of the tap blocks (no final norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vit = Eva(img_size=224, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                       num_heads=cfg.num_heads, qkv_bias=True, init_values=1e-5, rope_type="dinov3",
                       rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
                       num_reg_tokens=cfg.num_register_tokens, swiglu_mlp=cfg.swiglu,
                       swiglu_align_to=8 if cfg.swiglu else 0, use_fc_norm=False, num_classes=0,
                       norm_layer=partial(LayerNorm, eps=1e-5), dynamic_img_size=True)
        self.register_buffer("mask_token", torch.zeros(1, cfg.embed_dim))  # unused; part of Meta's layout
        self.register_state_dict_post_hook(to_meta_layout)
        self.register_load_state_dict_pre_hook(from_meta_layout)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what --compile compiles one by one)."""
        return self.vit.blocks

    def fix_grid(self, grid_h: int, grid_w: int):
        """For a static exported graph: nothing to store, RoPE is computed from the input's grid."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(x)  # [B, h, w, D]
        x, rope = vit._pos_embed(x)  # prefix tokens prepended; RoPE sin/cos of the h x w grid
        return tap_outputs(vit.blocks, vit.norm_pre(x), self.cfg.taps, rope=rope)


def to_meta_layout(module: DinoV3Encoder, state_dict: dict, prefix: str, local_metadata):
    """Rewrite the module's timm entries (prefix + "vit.*") in Meta's layout, in place."""
    vit_prefix, swiglu = prefix + "vit.", module.cfg.swiglu
    timm_sd = {k[len(vit_prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(vit_prefix)]}
    state_dict[prefix + "rope_embed.periods"] = module.vit.rope.periods.detach()
    for name, value in timm_sd.items():
        if name.endswith("attn.q_bias"):
            block = name[: -len("q_bias")]
            zeros, ones = torch.zeros_like(value), torch.ones_like(value)
            state_dict[prefix + block + "qkv.bias"] = torch.cat([value, zeros, timm_sd[block + "v_bias"]])
            state_dict[prefix + block + "qkv.bias_mask"] = torch.cat([ones, zeros, ones])
        elif not name.endswith("attn.v_bias"):
            state_dict[prefix + timm_to_meta_name(name, swiglu)] = value


def from_meta_layout(module: DinoV3Encoder, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs):
    """Rewrite Meta's entries of `state_dict` (in place) as the timm entries the module loads: the qkv bias split
    into q and v (the k third dropped once the mask is checked), the file's RoPE periods copied into timm's
    buffer. A missing periods or mask entry is reported as a missing key."""
    swiglu = module.cfg.swiglu
    keys = [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "vit.")
            and k != prefix + "mask_token"]
    needed = [prefix + "rope_embed.periods"] + [prefix + f"blocks.{i}.attn.qkv.bias_mask"
                                                  for i in range(module.cfg.depth)]
    missing_keys.extend(k for k in needed if k not in keys)
    for key in keys:
        name, value = key[len(prefix):], state_dict.pop(key)
        if name == "rope_embed.periods":
            periods = module.vit.rope.periods
            if value.shape != periods.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(periods.shape)}")
            else:
                with torch.no_grad():
                    periods.copy_(value.float())
        elif name.endswith("attn.qkv.bias_mask"):
            d = value.shape[0] // 3
            if not torch.equal(value.float().cpu(), torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])):
                raise UserError(f"{key} is not Meta's k-bias mask (1 for q and v, 0 for k); this DINOv3 file "
                                f"is not a released one")
        elif name.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            block = prefix + "vit." + name[: -len("qkv.bias")]
            state_dict[block + "q_bias"], state_dict[block + "v_bias"] = q, v
        else:
            state_dict[prefix + "vit." + meta_to_timm_name(name, swiglu)] = value
