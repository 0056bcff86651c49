"""CRR's segmentation network and its input.

Module names (`up1..up4`, `db1..db4`, `fin_out`) follow the released `Seg_model_7999.pth`.
"""
import torch
import torch.nn as nn


def segmentation_input(en: list[torch.Tensor], de: list[torch.Tensor]) -> torch.Tensor:
    """Per group -(en/|en|) * (de/|de|) along channels, not summed, en detached; groups concatenated.

    en, de: lists of [B, D, h, w] -> [B, len(en) * D, h, w].
    """
    def l2_normalize(t):
        return t / (t.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-12)
    return torch.cat([-l2_normalize(e.detach()) * l2_normalize(d) for e, d in zip(en, de)], dim=1)


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegmentationNet(nn.Module):
    """[B, 8w, h, w] -> 2-class logits [B, 2, out, out]; w = 2D/8 (192 for ViT-B)."""

    def __init__(self, base_width: int, out_channels: int = 2, output_size: int = 256):
        super().__init__()
        w = base_width
        self.up1 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(8 * w, 8 * w))
        self.db1 = nn.Sequential(*conv_bn_relu(8 * w, 8 * w), *conv_bn_relu(8 * w, 4 * w))
        self.up2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(4 * w, 4 * w))
        self.db2 = nn.Sequential(*conv_bn_relu(4 * w, 4 * w), *conv_bn_relu(4 * w, 2 * w))
        self.up3 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(2 * w, 2 * w))
        self.db3 = nn.Sequential(*conv_bn_relu(2 * w, 2 * w), *conv_bn_relu(2 * w, w))
        self.up4 = nn.Sequential(nn.Upsample(size=(output_size, output_size), mode="bilinear", align_corners=True),
                                 *conv_bn_relu(w, w))
        self.db4 = nn.Sequential(*conv_bn_relu(w, w), *conv_bn_relu(w, 48))
        self.fin_out = nn.Sequential(nn.Conv2d(48, out_channels, kernel_size=3, padding=1))
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.up1, self.db1, self.up2, self.db2, self.up3, self.db3, self.up4, self.db4, self.fin_out):
            x = stage(x)
        return x


def init_weights(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
