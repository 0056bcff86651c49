"""The methods' recipes: everything that defines a method, one frozen dataclass each, importable without PyTorch.

A paper script states its recipe as one of these with what it changes, e.g.

    RECIPE = recipes.DINOMALY.replace(total_iters=10000, dropout=0.2)

The command-line flags that change a recipe are generated from its fields (cli.py): a field with a `help` text
is a flag of the same name, type and default (the script's value), so a new setting is one line here. A run
saves its recipe in config.json: the fields marked "model" (what rebuilds the trained network) under "model",
the others under "training" (checkpoints.saved_recipe reads them back).

The values are the reference code's (tests/test_recipes.py compares them field by field):
- Dinomaly (`dinomaly_mvtec_uni.py`, `dinomaly_visa_uni.py`): ViT-B/14 with registers, 448 -> 392 px, the
  MLP bottleneck with dropout 0.2, 8 decoder blocks with linear attention, two groups of 4 taps; StableAdamW
  (lr 2e-3, betas 0.9/0.999, weight decay 1e-4, eps 1e-10, AMSGrad), warm-up over 100 iterations then a cosine
  to 2e-4, gradient clipping at 0.1, hard mining to 0.9 over 1,000 iterations with factor 0.1; 10,000
  iterations of batch 16.
- CRR Stage I (`crr_realiad_stage1.py`): Dinomaly's Real-IAD recipe (dropout 0.4, 50,000 iterations) with
  bottleneck masking 0.4, kept on at test time. Stage II: Adam at 1e-4 on the segmentation network, batch 8,
  8,000 iterations, checkpoints every 4,000.
- Dinomaly2 (`dinomaly2_*.py`, the preview code): the two-stage bottleneck (D -> 256 -> 4D -> D) with dropout
  0.4, context-aware recentering, attention epsilon 1e-8; StableAdamW without AMSGrad, the first bottleneck
  layer at 2e-4, each group warmed up over 100 iterations then constant (--lr_decay_ratio 1); 40,000
  iterations of batch 16 on ViT-S.
"""
import dataclasses
from dataclasses import dataclass, field

from .arguments import LC_CHOICES, encoder_name, float_in, int_at_least
from .encoders import DEFAULT_ENCODER
from .errors import UserError

METHODS = {"dinomaly": "Dinomaly", "dinomaly2": "Dinomaly2", "crr": "CRR"}  # the reconstruction methods, by name
# what a model's inputs are (models/vitill.py: MODALITIES; modalities.py): images, or pairs of two modalities
MODALITIES = {"rgb": "RGB images", "rgbd": "RGB + depth pairs", "rgbir": "RGB + infrared pairs"}


def setting(default, help: str | None = None, part: str = "training", methods: tuple[str, ...] | None = None,
            **flag):
    """A recipe field. With `help` it is a command-line flag (`flag`: argparse's type, choices, metavar) of the
    scripts of `methods` (None: of every method); part "model": saved in config.json's "model" entry (it
    rebuilds the trained network)."""
    return field(default=default, metadata=dict(help=help, part=part, methods=methods, flag=flag))


@dataclass(frozen=True)
class Recipe:
    """A reconstruction method: Dinomaly, Dinomaly2 or CRR Stage I."""
    # architecture: what the trained network is ("model")
    method: str = setting("dinomaly", part="model")
    encoder: str = setting(DEFAULT_ENCODER, "the encoder to train with (see docs/encoders.md); with --eval_only the "
                           "run's is used and this checks it, or names it for a checkpoint without config.json "
                           "whose layout several encoders share", part="model", type=encoder_name)
    image_size: int = setting(448, "images are resized to this square size", part="model", type=int_at_least(14))
    crop_size: int = setting(392, "then centre-cropped to this size, a multiple of the encoder's patch size (14 "
                             "for DINOv2, 16 for DINOv3)", part="model", type=int_at_least(14))
    taps: tuple[int, ...] | None = setting(None, "the 8 encoder blocks (0-based) whose outputs are reconstructed, "
                                           "the first 4 one group and the last 4 the other (default: the "
                                           "encoder's, e.g. 2 to 9 of a 12-block ViT; docs/encoders.md)",
                                           part="model", type=int_at_least(0), nargs=8, metavar="BLOCK")
    bottleneck: str = setting("mlp", part="model")  # "mlp" (Dinomaly, CRR) or "two_stage" (Dinomaly2)
    dropout: float = setting(0.2, "bottleneck dropout rate", part="model", type=float_in(0, 1, high_open=True))
    decoder_depth: int = setting(8, "decoder blocks", part="model", type=int_at_least(1))
    attn_eps: float = setting(0.0, "epsilon in the linear-attention denominator (0 = Dinomaly's official code; "
                              "1e-6 avoids NaNs)", part="model", type=float_in(0, 1))
    mask_ratio: float = setting(0.0, "bottleneck masking ratio", part="model", methods=("crr",),
                                type=float_in(0, 1, high_open=True))
    test_mask: str = setting("off", "bottleneck masking of the trained model in eval mode (on = the released "
                             "code, seeded)", part="model", methods=("crr",), choices=["on", "off"])
    lc: int = setting(2, "groups of the 8 taps compared (loose constraint): 0 layer to layer, 1 one group, 2 two "
                      "groups of 4, 3 three, 4 four, 11 the last tap, 12 taps 4 and 8, 14 taps 2, 4, 6, 8",
                      part="model", methods=("dinomaly2",), type=int, choices=LC_CHOICES)
    cr: int = setting(0, "context-aware recentering of the encoder targets: LN(patch tokens - CLS) (1, "
                      "Dinomaly2), or the raw tokens (0)", part="model", methods=("dinomaly2",), type=int,
                      choices=[0, 1])
    la: int = setting(1, "decoder attention: linear (1), or softmax (0)", part="model", methods=("dinomaly2",),
                      type=int, choices=[0, 1])
    # "rgb", or a pair: "rgbd" (RGB + depth fused per tap), "rgbir" (RGB + infrared side by side); see MODALITIES
    modality: str = setting("rgb", part="model")
    # data and run length
    total_iters: int = setting(10000, "training iterations", type=int_at_least(1))
    batch_size: int = setting(16, "images per step (the global batch under torchrun; also the evaluation's)",
                              type=int_at_least(1))
    shot: int | None = setting(None, "few-shot: train on this many images per class (chosen with --seed as the "
                               "Dinomaly2 preview code does), with strong augmentation (default: all images)",
                               methods=("dinomaly2",), type=int_at_least(1))
    # optimisation: StableAdamW over the bottleneck and the decoder
    lr: float = setting(2e-3, "learning rate of the bottleneck and the decoder", type=float_in(0, 1))
    bottleneck_in_lr: float | None = setting(None, "learning rate of the first bottleneck layer, in a parameter "
                                             "group of its own", methods=("dinomaly2",), type=float_in(0, 1))
    betas: tuple[float, float] = setting((0.9, 0.999))
    adam_eps: float = setting(1e-10, "StableAdamW's epsilon", type=float_in(0, 1))
    weight_decay: float = setting(1e-4, "StableAdamW's decoupled weight decay", type=float_in(0, 1))
    amsgrad: bool = setting(True)
    clip_norm: float = setting(0.1, "gradient clipping: the largest global L2 norm", type=float_in(0, 1e6))
    # "cosine": linspace(0, lr) over warmup_iters, then a cosine to lr_final (Dinomaly's WarmCosineScheduler);
    # "ratio": each group's rate * it / warmup_iters, then a cosine to rate * lr_decay_ratio (Dinomaly2's
    # WarmupCosineScheduler; ratio 1: constant)
    schedule: str = setting("cosine")
    warmup_iters: int = setting(100, "learning-rate warm-up iterations", type=int_at_least(0))
    lr_final: float = setting(2e-4, "the learning rate at the end of the cosine", methods=("dinomaly", "crr"),
                              type=float_in(0, 1))
    lr_decay_ratio: float = setting(1.0, "after warm-up each group's rate falls on a cosine to this share of its "
                                    "start (1: constant)", methods=("dinomaly2",), type=float_in(0, 1))
    # hard mining: the share of easy positions ramps to hm_max_p over hm_ramp_iters; their gradient * hm_factor
    hm_max_p: float = setting(0.9, "hard mining: the share of easy positions after the ramp",
                              type=float_in(0, 1))
    hm_ramp_iters: int = setting(1000, "hard mining: iterations to reach that share", type=int_at_least(1))
    hm_factor: float = setting(0.1, "hard mining: the gradient factor of the easy positions", type=float_in(0, 1))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SegmentationRecipe:
    """CRR Stage II: the segmentation network on the frozen Stage-I model (whose recipe gives the sizes)."""
    method: str = setting("crr_stage2")
    total_iters: int = setting(8000, "training iterations", type=int_at_least(1))
    batch_size: int = setting(8, "images per step (the global batch under torchrun)", type=int_at_least(1))
    lr: float = setting(1e-4, "Adam's learning rate", type=float_in(0, 1))
    checkpoint_every: int = setting(4000)  # Seg_model_3999.pth, Seg_model_7999.pth, ... as the released code

    def replace(self, **changes) -> "SegmentationRecipe":
        return dataclasses.replace(self, **changes)


DINOMALY = Recipe()
CRR_STAGE1 = DINOMALY.replace(method="crr", dropout=0.4, mask_ratio=0.4, test_mask="on", total_iters=50000)
DINOMALY2 = DINOMALY.replace(method="dinomaly2", encoder="dinov2reg_vit_small_14", bottleneck="two_stage",
                             dropout=0.4, attn_eps=1e-8, cr=1, total_iters=40000, amsgrad=False, schedule="ratio",
                             bottleneck_in_lr=2e-4)
CRR_STAGE2 = SegmentationRecipe()
PAPER = {"dinomaly": DINOMALY, "crr": CRR_STAGE1, "dinomaly2": DINOMALY2}  # a run saved without its recipe


def flags(recipe_type, method: str | None = None) -> list[dataclasses.Field]:
    """The fields of a recipe class that are command-line flags (of `method`'s scripts when given)."""
    return [f for f in dataclasses.fields(recipe_type) if f.metadata["help"] and
            (method is None or f.metadata["methods"] is None or method in f.metadata["methods"])]


def model_part(recipe: Recipe) -> dict:
    """config.json's "model" entry: the fields that rebuild the trained network."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.metadata["part"] == "model"}


def training_part(recipe) -> dict:
    """config.json's "training" entry: the rest of the recipe."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.metadata["part"] != "model"}


def check(recipe: Recipe):
    """What a recipe must hold beyond each field's type (UserError names the flags)."""
    if recipe.schedule == "cosine" and recipe.bottleneck_in_lr is not None:
        raise UserError("--bottleneck_in_lr needs Dinomaly2's schedule (one rate per parameter group); Dinomaly's "
                        "cosine schedule sets one rate for all")
