"""The frozen encoder network of a registry entry (encoders.py): DINOv2, DINO, MAE, DeiT, iBOT and MoCo v3 on timm's
ViT blocks (vit.py), DINOv3 (dinov3.py), BEiT and BEiT v2 (beit.py)."""
import torch.nn as nn

from ..encoders import DEFAULT_ENCODER, ENCODERS, EncoderConfig
from .beit import BeitEncoder
from .dinov3 import DinoV3Encoder
from .vit import ViTEncoder

__all__ = ["DEFAULT_ENCODER", "ENCODERS", "EncoderConfig", "build_encoder"]


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The frozen encoder of `cfg` (random weights; load the publisher's file into it)."""
    return {"dinov3": DinoV3Encoder, "beit": BeitEncoder}.get(cfg.family, ViTEncoder)(cfg)
