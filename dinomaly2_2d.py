"""Dinomaly2, 2D multi-class: one model for all classes of an MVTec-layout dataset (MVTec AD, VisA 1cls, MPDD,
BTAD, MIAD, Uni-Medical, or your own folder with --classes), trained with the preview code's recipe, then
evaluated. --data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly import cli, recipes

# the preview's recipe (recipes.DINOMALY2: ViT-S/14 with registers, the two-stage bottleneck with dropout 0.4,
# recentering, the first bottleneck layer at 2e-4, a constant rate after warm-up, ...)
RECIPE = recipes.DINOMALY2.replace(total_iters=40000, batch_size=16, dropout=0.4)
DEFAULTS = dict(
    dataset="mvtec",
    save_name="dinomaly2_{dataset}_uni",
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)
# --dataset -> its data folder and sizes, as the preview's README runs them; other datasets need all three
DATASETS = {
    "mvtec": dict(data_path="../mvtec_anomaly_detection", image_size=448, crop_size=392),
    "visa": dict(data_path="../VisA_pytorch/1cls", image_size=448, crop_size=392),
    "mpdd": dict(data_path="../MPDD", image_size=448, crop_size=392),
    "btad": dict(data_path="../BTech_Dataset_transformed", image_size=392, crop_size=392),
    "miad": dict(data_path="../MIAD", image_size=392, crop_size=392),
    "unimedical": dict(data_path="../Uni-Medical", image_size=280, crop_size=280),
}

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS, DATASETS)
