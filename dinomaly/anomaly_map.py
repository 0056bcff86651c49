"""From features to decisions: the anomaly map, its smoothing, the image score, and ground truth at the
map's resolution. Evaluation, prediction, the benchmark and the ONNX export all compute maps here.

- Dinomaly map: per group 1 - cos(en_g, de_g) along channels, bilinear (align_corners=True) to the crop size,
  mean of the groups, then bilinear (align_corners=False) to 256 x 256.
- CRR's fused map: 0.7 * reconstruction (per group 1 - cos straight to 256, align_corners=True) + 0.3 *
  softmax channel 1 of the segmentation network.
- Either is smoothed with a 5x5, sigma-4 Gaussian; the image score is the mean of its top 1 %.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import speed
from .errors import UserError
from .models import MODALITIES, SegmentationNet, ViTill, segmentation_input

MAP_SIZE = 256  # anomaly maps and ground truth are compared at 256 x 256


@functools.lru_cache(maxsize=None)
def _gaussian_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """5x5 Gaussian, sigma 4, normalised to sum 1: [1,1,5,5]."""
    x = torch.arange(5, dtype=torch.float64) - 2
    w = torch.exp(-x ** 2 / (2 * 4.0 ** 2))
    w = w / w.sum()  # 0.187627, 0.206068, 0.212609, 0.206068, 0.187627
    return torch.outer(w, w).to(device=device, dtype=dtype)[None, None]


def gaussian_smooth(maps: torch.Tensor) -> torch.Tensor:
    """5x5 sigma-4 Gaussian smoothing with zero padding: [B,1,H,W] -> [B,1,H,W]."""
    return F.conv2d(maps, _gaussian_kernel(maps.device, maps.dtype), padding=2)


def reconstruction_map(en: list[torch.Tensor], de: list[torch.Tensor], out_size: int) -> torch.Tensor:
    """Mean over groups of 1 - cos(en_g, de_g), each upsampled (bilinear, align_corners=True).

    en, de: one [B,C,h,w] per group -> [B,1,out_size,out_size].
    """
    maps = []
    for e, d in zip(en, de, strict=True):
        m = 1 - F.cosine_similarity(e, d, dim=1)  # [B,h,w]
        maps.append(F.interpolate(m[:, None], size=out_size, mode="bilinear", align_corners=True))
    return torch.stack(maps).mean(dim=0)


def top_ratio_score(maps: torch.Tensor, max_ratio: float = 0.01) -> torch.Tensor:
    """Image score: mean of the top int(H*W*max_ratio) values; max_ratio 0 -> max. [B,1,H,W] -> [B]."""
    flat = maps.flatten(1)  # [B,H*W]
    if max_ratio == 0:
        return flat.amax(dim=1)
    return flat.topk(int(flat.shape[1] * max_ratio), dim=1).values.mean(dim=1)


def check_max_ratio(max_ratio: float):
    """--max_ratio must select at least one pixel of the map (0 selects its maximum)."""
    if 0 < max_ratio and int(MAP_SIZE * MAP_SIZE * max_ratio) < 1:
        raise UserError(f"--max_ratio {max_ratio} selects no pixel of a {MAP_SIZE}x{MAP_SIZE} map; use 0 (the "
                        f"maximum) or at least {1 / MAP_SIZE ** 2:.2g}")


def binarize_gt(masks: torch.Tensor, size: int = 256, mode: str = "dinomaly") -> torch.Tensor:
    """Pixel ground truth at size x size: [B,1,H,W] in [0,1] -> bool [B,1,size,size].

    "dinomaly": nearest resize, then > 0.  "crr": >= 0.5, bilinear resize, >= 0.5 again.  "mulsen": > 0.5, then
    nearest resize (the preview's MulSen-AD reader binarises its masks).
    """
    if mode == "dinomaly":
        return F.interpolate(masks.float(), size=size, mode="nearest") > 0
    if mode == "mulsen":
        return F.interpolate((masks > 0.5).float(), size=size, mode="nearest") > 0
    if mode == "crr":
        binary = (masks >= 0.5).float()
        return F.interpolate(binary, size=size, mode="bilinear", align_corners=False) >= 0.5
    raise ValueError(f"unknown ground-truth mode {mode!r} (expected 'dinomaly', 'crr' or 'mulsen')")


class AnomalyMapper(nn.Module):
    """Normalised images [B, 3, crop, crop] -> (smoothed anomaly map [B, 1, 256, 256], image score [B]).

    Without a segmentation network: the Dinomaly map. With one (CRR): the fused map
    `fusion_alpha * reconstruction + (1 - fusion_alpha) * segmentation`.

    `precision` ("fp32", "tf32" or "bf16", see speed.py) applies to the networks; the map, its smoothing and
    the score are computed in float32 (on a GPU cuDNN's convolutions, the patch embedding and the smoothing, use
    TF32 as PyTorch's defaults have it, as for the reference code). Constructing a mapper sets the process-wide
    matmul precision for `precision` (speed.configure). `compile` compiles the networks' blocks in place
    (speed.maybe_compile).
    """

    def __init__(self, model: ViTill, segnet: SegmentationNet | None = None, fusion_alpha: float = 0.7,
                 max_ratio: float = 0.01, precision: str = "fp32", compile: bool = False):
        super().__init__()
        speed.configure(precision)
        self.model, self.segnet = speed.maybe_compile(model, compile), speed.maybe_compile(segnet, compile)
        self.fusion_alpha, self.max_ratio, self.precision = fusion_alpha, max_ratio, precision

    def scoring_settings(self) -> dict:
        """How this mapper makes its scores, as thresholds.json records them: the map, fusion_alpha, max_ratio,
        and the test-time bottleneck masking with its ratio."""
        masked = self.model.test_mask == "on"
        return dict(map="reconstruction" if self.segnet is None else "fused", fusion_alpha=self.fusion_alpha,
                    max_ratio=self.max_ratio, test_mask=self.model.test_mask,
                    mask_ratio=self.model.mask_ratio if masked else 0.0)

    def raw_map(self, img: torch.Tensor, mask_seeds: list[int] | None = None) -> torch.Tensor:
        """The map before smoothing: [B, 1, 256, 256]. `mask_seeds`: see ViTill.bottleneck_mask."""
        return self._raw_map(img, mask_seeds)[0]

    def _raw_map(self, img: torch.Tensor, mask_seeds: list[int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the map before smoothing, the encoder's group features en)."""
        with speed.autocast(img.device, self.precision):
            en, de = self.model(img, mask_seeds)
            seg = None if self.segnet is None else self.segnet(segmentation_input(en, de))
        en, de = [e.float() for e in en], [d.float() for d in de]
        if seg is None:
            amap = reconstruction_map(en, de, img.shape[-1])
            return F.interpolate(amap, size=MAP_SIZE, mode="bilinear", align_corners=False), en
        recon = reconstruction_map(en, de, MAP_SIZE)
        seg = torch.softmax(seg.float(), dim=1)[:, 1:]
        return self.fusion_alpha * recon + (1 - self.fusion_alpha) * seg, en

    @torch.no_grad()
    def feature_width(self, crop_size: int) -> int:
        """How many pooled features (`features`) an input of this model has: measured on one blank input."""
        param = next(self.model.parameters())
        blank = torch.zeros(1, MODALITIES[self.model.modality], crop_size, crop_size, device=param.device)
        return self.features(blank).shape[1]

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """The pooled encoder features alone (class_finder), without the decoding the map needs: the same as
        forward's with `features`."""
        with speed.autocast(img.device, self.precision):
            en = self.model.encoded(img)
        return pooled_features(en, self.model.modality)

    def forward(self, img: torch.Tensor, mask_seeds: list[int] | None = None,
                features: bool = False) -> tuple[torch.Tensor, ...]:
        """(smoothed map, score), and with `features` the pooled encoder features (class_finder)."""
        raw, en = self._raw_map(img, mask_seeds)
        amap = gaussian_smooth(raw)
        return (amap, top_ratio_score(amap, self.max_ratio)) + \
            ((pooled_features(en, self.model.modality),) if features else ())


def pooled_features(en: list[torch.Tensor], modality: str = "rgb") -> torch.Tensor:
    """An input's encoder features pooled for class finding: per group the mean over the patch grid,
    L2-normalised, concatenated and normalised again. en: one [B, D, h, w] per group -> [B, groups * D]. An RGB +
    infrared pair (en holds its RGB image's maps, then its infrared image's: [2B, D, h, w]) gets one feature, its
    two images' side by side with the same weight, [B, 2 * groups * D]: the class is found from both images. (An
    RGB + depth pair's taps are already fused: its features are those of its one fused input.)"""
    pooled = [F.normalize(e.float().mean(dim=(2, 3)), dim=1) for e in en]
    if modality == "rgbir":
        b = pooled[0].shape[0] // 2
        pooled = [p[:b] for p in pooled] + [p[b:] for p in pooled]
    return F.normalize(torch.cat(pooled, dim=1), dim=1)
