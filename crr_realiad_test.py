"""CRR test on Real-IAD: the fused map 0.7 * reconstruction + 0.3 * segmentation, the seven metrics plus mAD
per class and their mean; --save_heatmaps N writes pictures of what the model found."""
from dinomaly import cli

RECIPE = None  # no training: the model and its recipe are the Stage-I run's
DEFAULTS = dict(
    dataset="realiad",
    data_path="../Real-IAD",
    save_name="vitill_realiad_uni_dinov2_0.4",
    batch_size=16,
    fusion_alpha=0.7,
    aupro="exact",
    cudnn="deterministic",
    gt_binarize="crr",
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
