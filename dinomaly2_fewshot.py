"""Dinomaly2, few-shot multi-class: --shot K normal images per class (default 4, chosen with --seed as the preview
code chooses them), strong augmentation, one model for all classes, then evaluated on the whole test sets.
--data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly.cli import build_parser, dataset_defaults, launch

from dinomaly2_2d import DATASETS
from dinomaly2_2d import DEFAULTS as DEFAULTS_2D

DEFAULTS = dict(DEFAULTS_2D, shot=4)

if __name__ == "__main__":
    launch("dinomaly2_main", build_parser(__doc__, DEFAULTS, "dinomaly2",
                                          dataset_defaults(DATASETS, "dinomaly2_{dataset}_fewshot")))
