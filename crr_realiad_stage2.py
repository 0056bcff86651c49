"""CRR Stage II on Real-IAD: train the segmentation network on the frozen Stage-I model of the same run
folder. Writes Seg_model_3999.pth, Seg_model_7999.pth and Seg_model_last.pth."""
from dinomaly.cli import build_parser, launch

DEFAULTS = dict(
    dataset="realiad",
    data_path="../Real-IAD",
    save_name="vitill_realiad_uni_dinov2_0.4",
    total_iters=8000,
    batch_size=8,
    cudnn="benchmark",
)

if __name__ == "__main__":
    launch("crr_stage2_main", build_parser(__doc__, DEFAULTS, "crr_stage2"))
