"""Dinomaly2, RGB + depth: one model for all classes of MVTec 3D-AD, each sample its RGB image and its depth (the
point cloud's z channel, background removed, coloured per sample) through the same frozen encoder, fused per tap
0.5 * RGB + 0.5 * depth (the preview's DinomalyRGBD), trained with the preview's recipe, then evaluated as 2D.
The dataset as distributed (<class>/{train,test}/<kind>/{rgb,xyz,gt}); prepare_data/prepare_mvtec3d.py prepares
the depth once (else it is prepared on the fly: pass --cache_images memory or disk)."""
from dinomaly import cli

from dinomaly2_2d import DEFAULTS as DEFAULTS_2D
from dinomaly2_2d import RECIPE as RECIPE_2D

# the 2D recipe, with what the preview's dinomaly_mvtec3d.py sets otherwise
RECIPE = RECIPE_2D.replace(
    modality="rgbd",  # RGB + depth pairs, fused per tap
    encoder="dinov2reg_vit_base_14",
    image_size=448,  # as the preview's README runs it (its argparse default is 392 / 392)
    crop_size=392,
    total_iters=40000,
    bottleneck_in_lr=2e-3,  # the whole bottleneck at 2e-3
)
DEFAULTS = dict(
    DEFAULTS_2D,
    dataset="mvtec3d",
    data_path="../mvtec_3d",
    save_name="dinomaly2_mvtec3d",
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
