"""The networks: the encoder registry (timm ViTs with the publishers' layouts), ViTill (encoder taps ->
bottleneck -> decoder) and CRR's segmentation network. Building one from a weight file, and every checkpoint and
run file, is checkpoints.py's."""
from ..errors import UserError
from .encoder import DEFAULT_ENCODER, ENCODERS, EncoderConfig, build_encoder
from .segnet import SegmentationNet, segmentation_input
from .vitill import GROUPINGS, MODALITIES, ViTill, mask_seed


def encoder_config(name: str) -> EncoderConfig:
    if name not in ENCODERS:
        raise UserError(f"unknown --encoder {name}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name]


def segmentation_net(embed_dim: int) -> SegmentationNet:
    """CRR's segmentation network for an encoder of width embed_dim (its input: 2 groups x embed_dim channels;
    base width 2 * embed_dim / 8)."""
    return SegmentationNet(base_width=2 * embed_dim // 8)


__all__ = ["DEFAULT_ENCODER", "ENCODERS", "EncoderConfig", "build_encoder", "GROUPINGS", "MODALITIES", "ViTill", "mask_seed",
           "SegmentationNet", "segmentation_input", "encoder_config", "segmentation_net"]
