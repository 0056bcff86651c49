"""A run's options, apart from its recipe: which data, where the run goes, how it evaluates. Frozen dataclasses,
importable without PyTorch; cli.py parses the command line once into a `Settings` (the recipe and these), which
the jobs receive and pass on in pieces. The defaults here are the flags' defaults.
"""
import dataclasses
import os
from dataclasses import dataclass, field

from . import recipes
from .recipes import Recipe, SegmentationRecipe

MAX_SCORE_CHANGE = 0.002  # INT8 exports' layer selection: the largest relative score change of a held-out good image


@dataclass(frozen=True)
class DataOptions:
    """Which images a run reads and how (see samples.py, dataset.py, training_data.py)."""
    data_path: str | None = None
    dataset: str = "mvtec"
    classes: tuple[str, ...] | None = None  # None: the dataset's standard list, or the class folders found
    realiad_resolution: str | None = None
    json_dir: str | None = None
    allow_outside_paths: bool = False
    num_workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    val: str | None = None
    val_share: float = 0.2  # good images of a class without a test folder held out for its threshold
    anomaly_source_path: str = "../dtd"  # CRR's textures; "none": anomalies from the image itself
    foreground_path: str | None = None
    cache_images: str = "none"
    cache_dir: str | None = None  # cli fills in <save_dir>/image_cache

    def replace(self, **changes) -> "DataOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunOptions:
    """Where the run goes, what it loads, how it runs (see run.py, train_state.py, speed.py)."""
    save_dir: str = "./saved_results"
    save_name: str | None = None
    save_name_given: bool = False  # whether --save_name was on the command line (not the script's default)
    device: str | None = None
    seed: int = 1
    cudnn: str | None = None
    precision: str = "fp32"
    compile: bool = False
    log_every: int = 100
    save_every: int = 1000
    resume: bool = False
    overwrite: bool = False
    per_class: bool = False
    eval_only: bool = False
    checkpoint: str | None = None
    seg_checkpoint: str | None = None
    encoder_weights: str | None = None
    mask_rng: str = "cpu"
    tensorboard: str = "auto"  # TensorBoard event files (events.py): on when the package is installed

    def replace(self, **changes) -> "RunOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EvalOptions:
    """How a run evaluates (see evaluate.py, utils.py, thresholds.py)."""
    batch_size: int = 16
    aupro: str | None = None
    gt_binarize: str | None = None
    multiview: str = "off"
    max_ratio: float = 0.01
    fusion_alpha: float = 0.7
    replace_results: bool = False
    false_alarm_rate: float = 0.01  # where there are no defect images, see thresholds.py
    save_heatmaps: int = 0


@dataclass(frozen=True)
class Settings:
    """One invocation of a script: its job, its recipe (a training job's; None for CRR's test), the recipe fields
    given on the command line (`given`: what a loaded run's recipe yields to) and its options."""
    job: str
    recipe: Recipe | SegmentationRecipe | None
    given: dict
    data: DataOptions
    run: RunOptions
    evaluation: EvalOptions

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    def config(self, model: Recipe | None = None, training: Recipe | SegmentationRecipe | None = None,
               setting: str | None = None, **extra) -> dict:
        """config.json: the options flat (as the flags), the recipe of the model trained or used under "model"
        (its architecture, with the run's `setting`), the recipe it trained with under "training" (the rest of
        it; see recipes.model_part), and `extra` entries."""
        out = {**dataclasses.asdict(self.data), **dataclasses.asdict(self.run), **dataclasses.asdict(self.evaluation),
               "given": sorted(self.given)}
        if model is not None:
            out["model"] = dict(recipes.model_part(model), **({"setting": setting} if setting else {}))
        if training is not None:
            out["training"] = recipes.training_part(training)
        return dict(out, **extra)
