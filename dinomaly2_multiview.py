"""Dinomaly2, multi-view: Real-IAD, Real-IAD Variety or MANTA-Tiny, several views of each object; each view trained
as an image, evaluated per image, per pixel, per object and (Real-IAD's official sample level) per sample.
--data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly.cli import build_parser, dataset_defaults, launch

from dinomaly2_2d import DEFAULTS as DEFAULTS_2D

# the 2D recipe, with what the preview's multi-view script sets otherwise
DEFAULTS = dict(
    DEFAULTS_2D,
    dataset="realiad",
    encoder="dinov2reg_vit_base_14",
    total_iters=100000,
    bottleneck_in_lr=2e-3,  # the whole bottleneck at 2e-3
    aupro="exact",  # ADEval's AUPRO
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
