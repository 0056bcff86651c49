"""CRR Stage I on Real-IAD: reconstruction + repair of synthetic anomalies, bottleneck masking 0.4, then an
evaluation of the reconstruction map. Writes <save_dir>/<save_name>/model.pth."""
from dinomaly.cli import build_parser, launch

DEFAULTS = dict(
    dataset="realiad",
    data_path="../Real-IAD",
    save_name="vitill_realiad_uni_dinov2_0.4",
    total_iters=50000,
    batch_size=16,
    dropout=0.4,
    aupro="exact",
    cudnn="benchmark",
    gt_binarize="crr",
)

if __name__ == "__main__":
    launch("crr_stage1_main", build_parser(__doc__, DEFAULTS, "crr_stage1"))
