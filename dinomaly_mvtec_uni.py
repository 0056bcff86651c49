"""Dinomaly on MVTec AD: one model for all 15 classes, trained with the paper's settings, then evaluated."""
from dinomaly.cli import build_parser, launch

DEFAULTS = dict(
    dataset="mvtec",
    data_path="../mvtec_anomaly_detection",
    save_name="vitill_mvtec_uni_dinov2br_c392_en29_bn4dp2_de8_laelu_md2_i1_it10k_sams2e3_wd1e4_w1hcosa2e4_ghmp09f01w01_b16_s1",
    total_iters=10000,
    batch_size=16,
    dropout=0.2,
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)

if __name__ == "__main__":
    launch("dinomaly_main", build_parser(__doc__, DEFAULTS, "dinomaly"))
