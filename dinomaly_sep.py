"""Dinomaly, one model per class (the class-separated setting of the reference's dinomaly_{mvtec,visa,realiad,
mpdd}_sep.py): each class of --dataset trained alone for 5,000 iterations, then evaluated; one run folder holds a
folder per class and the table of all classes with their mean. --data_path and the run name follow --dataset."""
from dinomaly import cli, recipes
from dinomaly.arguments import DATASET_NAMES

# the multi-class recipe, shorter, with StableAdamW's epsilon 1e-8 (the Real-IAD script keeps 1e-10: DATASETS)
RECIPE = recipes.DINOMALY.replace(total_iters=5000, batch_size=16, dropout=0.2, adam_eps=1e-8)
DEFAULTS = dict(
    dataset="mvtec",
    per_class=True,
    aupro="dinomaly",
    cudnn="deterministic",
    gt_binarize="dinomaly",
)
# --dataset -> the reference script's data path and run name; other datasets need --data_path
PATHS = {"mvtec": "../mvtec_anomaly_detection", "visa": "../VisA_pytorch/1cls", "mpdd": "../MPDD",
         "realiad": "../Real-IAD"}
SEP = "sep_dinov2br_c392_en29_bn4dp2_de8_elaelu_md2_i1_it10k_sadm2e3_wd1e4_w1hcosa_ghmp09f01w1k_b16_ev_s1"
DATASETS = {name: dict(data_path=PATHS.get(name), save_name=f"vitill_{name}_{SEP}", adam_eps=1e-8)
            for name in DATASET_NAMES}
DATASETS["realiad"].update(adam_eps=1e-10, save_name="vitill_realiad_sep_dinov2br_c392r_en29_bn4dp2_de8_elaelu_md2_i1_"
                                                     "it5k_sadm2e3_wd1e4_w1hcosa2e4_ghmp09f01w1k_b16_s1")

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS, DATASETS)
