"""Dinomaly2, few-shot multi-class: --shot K normal images per class (default 4, chosen with --seed as the preview
code chooses them), strong augmentation, one model for all classes, then evaluated on the whole test sets.
--data_path, the image and crop sizes and the run name follow --dataset unless given."""
from dinomaly import cli

from dinomaly2_2d import DATASETS
from dinomaly2_2d import DEFAULTS as DEFAULTS_2D
from dinomaly2_2d import RECIPE as RECIPE_2D

RECIPE = RECIPE_2D.replace(shot=4)  # the 2D recipe on 4 images per class
DEFAULTS = dict(DEFAULTS_2D, save_name="dinomaly2_{dataset}_fewshot")

if __name__ == "__main__":
    cli.main(__doc__, RECIPE, DEFAULTS, DATASETS)
