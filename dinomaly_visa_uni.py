"""Dinomaly on VisA (prepared 1cls layout): one model for all 12 classes, trained and evaluated."""
from dinomaly import cli, recipes

RECIPE = recipes.DINOMALY.replace(total_iters=10000, batch_size=16, dropout=0.2)  # as on MVTec AD
DEFAULTS = dict(
    dataset="visa",
    data_path="../VisA_pytorch/1cls",
    save_name="vitill_visa_uni_dinov2br_c392_en29_bn4dp2_de8_laelu_md2_i1_it10k_sams2e3_wd1e4_w1hcosa2e4_ghmp09f01w01_b16_s1",
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS)
