"""Dinomaly on VisA (prepared 1cls layout): one model for all 12 classes, trained and evaluated."""
from dinomaly.cli import build_parser, launch

DEFAULTS = dict(
    dataset="visa",
    data_path="../VisA_pytorch/1cls",
    save_name="vitill_visa_uni_dinov2br_c392_en29_bn4dp2_de8_laelu_md2_i1_it10k_sams2e3_wd1e4_w1hcosa2e4_ghmp09f01w01_b16_s1",
    total_iters=10000,
    batch_size=16,
    dropout=0.2,
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)

if __name__ == "__main__":
    launch("dinomaly_main", build_parser(__doc__, DEFAULTS, "dinomaly"))
