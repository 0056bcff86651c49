"""CRR Stage II on Real-IAD: train the segmentation network on the frozen Stage-I model of the same run
folder. Writes Seg_model_3999.pth, Seg_model_7999.pth and Seg_model_last.pth."""
from dinomaly import cli, recipes

# Adam at 1e-4 on the segmentation network; the sizes and the model are the Stage-I run's
RECIPE = recipes.CRR_STAGE2.replace(total_iters=8000, batch_size=8, lr=1e-4)
DEFAULTS = dict(
    dataset="realiad",
    data_path="../Real-IAD",
    save_name="vitill_realiad_uni_dinov2_0.4",
    cudnn="benchmark",
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
