"""CRR Stage I on Real-IAD: reconstruction + repair of synthetic anomalies, bottleneck masking 0.4, then an
evaluation of the reconstruction map. Writes <save_dir>/<save_name>/model.pth."""
from dinomaly import cli, recipes

# Dinomaly's Real-IAD recipe with bottleneck masking 0.4, kept on at test time (recipes.CRR_STAGE1)
RECIPE = recipes.CRR_STAGE1.replace(total_iters=50000, batch_size=16, dropout=0.4, mask_ratio=0.4)
DEFAULTS = dict(
    dataset="realiad",
    data_path="../Real-IAD",
    save_name="vitill_realiad_uni_dinov2_0.4",
    aupro="exact",
    cudnn="benchmark",
    gt_binarize="crr",
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
