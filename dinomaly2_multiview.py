"""Dinomaly2, multi-view: Real-IAD, Real-IAD Variety or MANTA-Tiny, several views of each object; each view trained
as an image, evaluated per image, per pixel, per object and (Real-IAD's official sample level) per sample.
--data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly import cli

from dinomaly2_2d import DEFAULTS as DEFAULTS_2D
from dinomaly2_2d import RECIPE as RECIPE_2D

# the 2D recipe, with what the preview's multi-view script sets otherwise
RECIPE = RECIPE_2D.replace(
    encoder="dinov2reg_vit_base_14",
    total_iters=100000,
    bottleneck_in_lr=2e-3,  # the whole bottleneck at 2e-3
)
DEFAULTS = dict(
    DEFAULTS_2D,
    dataset="realiad",
    save_name="dinomaly2_{dataset}_multiview",
    aupro="exact",  # ADEval's AUPRO
    multiview="on",
)
DATASETS = {
    "realiad": dict(data_path="../Real-IAD", image_size=448, crop_size=392),
    "realiad_variety": dict(data_path="../Real-IAD_Variety", image_size=280, crop_size=280),
    "manta": dict(data_path="../MANTATiny", image_size=280, crop_size=280),
}

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS, DATASETS)
