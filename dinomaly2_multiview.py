"""Dinomaly2, multi-view: Real-IAD, Real-IAD Variety or MANTA-Tiny, several views of each object; each view trained
as an image, evaluated per image, per pixel, per object and (Real-IAD's official sample level) per sample.
--data_path, the image and crop sizes and the run name follow --dataset unless given."""
from cli import build_parser, dataset_defaults, launch

DEFAULTS = dict(
    dataset="realiad",
    encoder="dinov2reg_vit_base_14",
    total_iters=100000,
    batch_size=16,
    dropout=0.4,
    attn_eps=1e-8,
    bottleneck_in_lr=2e-3,  # the preview's multi-view script trains the whole bottleneck at 2e-3
    image_size=None,
    crop_size=None,
    aupro="exact",
    cudnn="deterministic",
    gt_binarize="dinomaly",
    multiview="on",
)
DATASETS = {
    "realiad": ("../Real-IAD", 448, 392),
    "realiad_variety": ("../Real-IAD_Variety", 280, 280),
    "manta": ("../MANTATiny", 280, 280),
}

if __name__ == "__main__":
    launch("dinomaly2_main", build_parser(__doc__, DEFAULTS, "dinomaly2",
                                          dataset_defaults(DATASETS, "dinomaly2_{dataset}_multiview")))
