"""Dinomaly2, RGB + infrared: one model for all classes of MulSen-AD, each sample its RGB image and its infrared
image of the same name, both through the same model as separate images (the preview's dinomaly_mulsen.py); the
sample's score is the mean of the two images' scores (the preview's sum, halved), its label the largest of its
RGB, infrared and point-cloud labels, the pixel metrics per image (P-* for the RGB images, IR-P-* for the infrared
ones). Layout as distributed:
<class>/{RGB,Infrared}/{train,test/<kind>,GT/<kind>}/<n>.png with RGB/GT/<kind>/data.csv (the point clouds are
not read)."""
from dinomaly import cli

from dinomaly2_2d import DEFAULTS as DEFAULTS_2D
from dinomaly2_2d import RECIPE as RECIPE_2D

# the 2D recipe, with what the preview's dinomaly_mulsen.py sets otherwise
RECIPE = RECIPE_2D.replace(
    modality="rgbir",  # RGB + infrared pairs, side by side
    encoder="dinov2reg_vit_large_14",
    dropout=0.2,
    total_iters=20000,
    batch_size=8,  # pairs: 16 images a step
)
DEFAULTS = dict(
    DEFAULTS_2D,
    dataset="mulsen",
    data_path="../MulSen_AD",
    save_name="dinomaly2_mulsen_uni",
    gt_binarize="mulsen",  # masks > 0.5, then nearest
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
