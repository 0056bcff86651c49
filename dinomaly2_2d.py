"""Dinomaly2, 2D multi-class: one model for all classes of an MVTec-layout dataset (MVTec AD, VisA 1cls, MPDD,
BTAD, MIAD, Uni-Medical, or your own folder with --classes), trained with the preview code's settings, then
evaluated. --data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly.cli import build_parser, dataset_defaults, launch

DEFAULTS = dict(
    dataset="mvtec",
    encoder="dinov2reg_vit_small_14",
    total_iters=40000,
    batch_size=16,
    dropout=0.4,
    attn_eps=1e-8,
    image_size=None,
    crop_size=None,
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)
# --dataset -> (data path, image size, crop size), as the preview's README runs them
DATASETS = {
    "mvtec": ("../mvtec_anomaly_detection", 448, 392),
    "visa": ("../VisA_pytorch/1cls", 448, 392),
    "mpdd": ("../MPDD", 448, 392),
    "btad": ("../BTech_Dataset_transformed", 392, 392),
    "miad": ("../MIAD", 392, 392),
    "unimedical": ("../Uni-Medical", 280, 280),
}


if __name__ == "__main__":
    launch("dinomaly2_main", build_parser(__doc__, DEFAULTS, "dinomaly2",
                                          dataset_defaults(DATASETS, "dinomaly2_{dataset}_uni")))
