"""The command line of every script, parsed once into typed objects (options.Settings), and the entry points.

A paper script gives its recipe (recipes.py), its options' defaults (data path, run name, AUPRO variant, ground
truth rule, cuDNN mode, ...) and optionally a table of the values that depend on --dataset:

    RECIPE = recipes.DINOMALY.replace(total_iters=10000, dropout=0.2)
    DEFAULTS = dict(dataset="mvtec", data_path="../mvtec_anomaly_detection", save_name="...", aupro="dinomaly")
    cli.main(__doc__, RECIPE, DEFAULTS)

The recipe's flags are generated from its fields (recipes.flags); each job offers only the flags it uses. A
value comes from, in order: the command line, the --dataset table, the script's DEFAULTS or RECIPE, the
dataclass's default. Only what the command line gave is kept as given (Settings.given), which a loaded run's
recipe yields to (--eval_only, CRR Stage II and test, predict).
"""
import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys

from . import recipes
from .arguments import CACHE_MODES, DATASET_NAMES, PRECISIONS, ArgumentParser, float_in, int_at_least
from .encoders import ENCODERS, check_sizes
from .errors import UserError
from .options import MAX_SCORE_CHANGE, DataOptions, EvalOptions, RunOptions, Settings
from .recipes import Recipe, SegmentationRecipe

JOBS = {"dinomaly": "dinomaly", "dinomaly2": "dinomaly2", "crr": "crr_stage1", "crr_stage2": "crr_stage2"}
MODEL_FIELDS = [f.name for f in dataclasses.fields(Recipe) if f.metadata["part"] == "model"]
# the reconstruction recipe's fields that CRR Stage II and test take from the Stage-I run unless given
FOLLOWED = ("image_size", "crop_size", "attn_eps", "mask_ratio", "test_mask")
PREDICT_OVERRIDES = ("image_size", "crop_size", "test_mask", "mask_ratio")  # predict's, of the run's recipe
OPTIONS = {f.name: cls for cls in (DataOptions, RunOptions, EvalOptions) for f in dataclasses.fields(cls)}


def job_of(recipe: Recipe | SegmentationRecipe | None) -> str:
    """The job a script's recipe runs: "dinomaly", "dinomaly2", "crr_stage1", "crr_stage2" or (no recipe)
    "crr_test"."""
    return "crr_test" if recipe is None else JOBS[recipe.method]


def shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class Flags:
    """Adds flags whose default is shown in their help and left out of the parsed namespace (SUPPRESS), so that
    the namespace holds exactly what the command line gave."""

    def __init__(self, defaults: dict):
        self.defaults = defaults

    def __call__(self, group, name: str, help: str, default_text: str | None = None, **kwargs):
        default = self.defaults.get(name)
        text = default_text if default_text is not None else \
            None if default is None or default is False else shown(default)
        suffix = f" (default: {text})" if text else ""
        group.add_argument(f"--{name}", default=argparse.SUPPRESS, help=help + suffix, **kwargs)


def recipe_flags(group, add: Flags, recipe_type, method: str | None, names=None, default_text: str | None = None):
    """The flags of a recipe's fields: those of `method` (all with a help text), or those in `names`."""
    for f in recipes.flags(recipe_type, method):
        if names is None or f.name in names:
            add(group, f.name, f.metadata["help"], default_text, **f.metadata["flag"])


def build_parser(description: str, recipe: Recipe | SegmentationRecipe | None, defaults: dict,
                 datasets: dict[str, dict] | None = None) -> ArgumentParser:
    """The script's parser: each job offers only the flags it uses, each with the script's default in its help."""
    job = job_of(recipe)
    method = recipe.method if isinstance(recipe, Recipe) else None  # a reconstruction method's training
    shown_defaults = defaults_of(recipe, defaults)
    for name in {k for row in (datasets or {}).values() for k in row}:  # the --dataset table's
        shown_defaults[name] = "per --dataset: " + ", ".join(f"{d} {shown(row[name])}" for d, row in datasets.items()
                                                              if name in row)
    add = Flags(shown_defaults)
    p = ArgumentParser(description, fixed_recipe(recipe))
    p.elsewhere = {f"--{f.name}": f"the {' and '.join(recipes.METHODS[m] for m in f.metadata['methods'])} scripts"
                   for f in recipes.flags(Recipe) if method and f not in recipes.flags(Recipe, method)}
    data_flags(p.add_argument_group("data"), add, job)
    run_flags(p.add_argument_group("run"), add, job)
    model_flags(p.add_argument_group("model" if method else "model (default: the Stage-I run's)"), add, job, method)
    if job != "crr_test":
        training_flags(p.add_argument_group("training (the recipe)"), add, job, method)
    speed_flags(p.add_argument_group("speed (the defaults reproduce the papers)"), add, job)
    if job != "crr_stage2":
        evaluation_flags(p.add_argument_group("evaluation"), add, job)
    return p


def fixed_recipe(recipe: Recipe | SegmentationRecipe | None) -> str | None:
    """The --help epilog: the recipe's fields that are not flags (fixed by the method)."""
    if recipe is None:
        return None
    fixed = [f"{f.name} {shown(getattr(recipe, f.name))}" for f in dataclasses.fields(recipe)
             if not f.metadata["help"]]
    return f"Fixed by the method (dinomaly/recipes.py): {', '.join(fixed)}."


def data_flags(data, add: Flags, job: str):
    add(data, "data_path", "dataset root folder")
    add(data, "dataset", "reader and default classes: mvtec and visa read the MVTec layout (also MPDD, BTAD and "
                         "your own data with --classes); realiad and realiad_variety read Real-IAD's JSON splits; "
                         "manta reads MANTA-Tiny (five views side by side in each image); mvtec3d (MVTec 3D-AD) and "
                         "mulsen (MulSen-AD) read pairs of two modalities, for their scripts",
        choices=sorted(DATASET_NAMES))
    add(data, "classes", "classes (folders) to use; default: the dataset's standard list", nargs="+", metavar="CLASS")
    add(data, "realiad_resolution", "Real-IAD image folder: realiad_1024 (default), realiad_512, realiad_256 or "
                                    "realiad_raw; Real-IAD Variety: realiadvariety_1024 where it exists (default), "
                                    "else realiadvariety_raw")
    add(data, "json_dir", "Real-IAD split folder: realiad_jsons (default), realiad_jsons_sv (single view), "
                          "realiad_jsons_fuiad_0.1, ... (fully unsupervised); Real-IAD Variety: realiadvariety_jsons")
    add(data, "allow_outside_paths", "Real-IAD: accept split-file paths that lead out of --data_path (../)",
        action="store_true")
    add(data, "num_workers", "data loader worker processes", type=int_at_least(0))
    add(data, "val", "good images to set the thresholds of classes without a test folder, DIR/<class>/ (default: "
                     "hold out --val_share of their training images)", metavar="DIR")
    add(data, "val_share", "share of the good images of a class without a test folder held out of training, "
                           "chosen with --seed, to set its threshold", type=float_in(0, 1, high_open=True))
    if job in ("crr_stage1", "crr_stage2"):
        add(data, "anomaly_source_path", "texture images for anomaly synthesis (the DTD dataset, "
                                         "<dtd>/images/*/*.jpg); 'none': anomalies made from the image itself only "
                                         "(not the paper's recipe)")
        add(data, "foreground_path", "object masks restricting where anomalies go, <DIR>/<class>/<image path with "
                                     "OK -> DISthresh> (default for Real-IAD: <data_path>/<resolution>_DISthresh, "
                                     "where the released code looks; without them anomalies may fall anywhere)")


def run_flags(run, add: Flags, job: str):
    add(run, "save_dir", "parent folder of the run folders")
    add(run, "save_name", "run folder name under --save_dir")
    add(run, "device", "torch device, e.g. cuda, cuda:1 or cpu (default: cuda when available)")
    add(run, "seed", "random seed", type=int_at_least(0, 2 ** 31))
    add(run, "cudnn", "cuDNN mode: deterministic kernels, or the fastest found by benchmarking (the reference "
                      "scripts use deterministic for MVTec AD, VisA and the CRR test, benchmark for CRR training)",
        choices=["deterministic", "benchmark"])
    add(run, "tensorboard", "TensorBoard event files in the run folder (loss, learning rate, data wait, gradient "
                            "norm, the evaluation's metrics per class); auto: on when tensorboard is installed",
        choices=["auto", "on", "off"])
    if job == "crr_test":
        add(run, "batch_size", "images per evaluation batch", type=int_at_least(1))


def model_flags(model, add: Flags, job: str, method: str | None):
    """The model's recipe flags (a training job's), or those a later CRR stage may override, and where the
    model comes from."""
    if method is not None:
        add(model, "encoder_weights", "the encoder's weight file as its publisher distributes it, or 'random' for "
                                      "a smoke run (default: backbones/weights/<publisher's file name>; see "
                                      "docs/encoders.md)")
        add(model, "eval_only", "skip training; evaluate --checkpoint", action="store_true")
        recipe_flags(model, add, Recipe, method, MODEL_FIELDS)
    else:
        recipe_flags(model, add, Recipe, None, FOLLOWED, "the Stage-I run's")
    add(model, "checkpoint", "reconstruction model: a run folder or a model.pth (ours or official); its recipe "
                             "(sizes, encoder, masking, attention epsilon, ...) is used unless given here" +
                             ("" if method is not None else "; default: <save_dir>/<save_name>/model.pth"))
    if job.startswith("crr"):
        add(model, "mask_rng", "where the frozen model's masks are drawn in evaluation and Stage II: cpu (the "
                               "released code's random stream, reproduced by --seed; slow next to a GPU) or device "
                               "(on the model's device, the GPU; in evaluation each image's mask is seeded by "
                               "--seed, its class and its index, so the metrics do not depend on the batch size or "
                               "the number of processes)", choices=["cpu", "device"])
    if job == "crr_test":
        add(model, "seg_checkpoint", "segmentation network (default: Seg_model_7999.pth, else Seg_model_last.pth, "
                                     "beside the model, else in the run folder)")


def training_flags(train, add: Flags, job: str, method: str | None):
    """The training recipe's flags (a reconstruction method's, or CRR Stage II's), its length and its state."""
    if method is not None:
        recipe_flags(train, add, Recipe, method, [f.name for f in dataclasses.fields(Recipe)
                                                  if f.name not in MODEL_FIELDS])
    else:
        recipe_flags(train, add, SegmentationRecipe, None)
    if job in ("dinomaly", "dinomaly2"):
        add(train, "per_class", "one model per class (the class-separated setting): each class is trained and "
                                "evaluated alone, as a run on that class alone would be, into <run>/<class>/; "
                                "the run folder gets the table of all classes and their mean, and predict.py "
                                "sends each image to its class's model", action="store_true")
    add(train, "log_every", "log the mean loss every N iterations", type=int_at_least(1))
    add(train, "save_every", "save the model and the training state (for --resume) every N iterations",
        type=int_at_least(1))
    start = train.add_mutually_exclusive_group()
    add(start, "resume", "continue the run folder's interrupted training from its train_state" +
        ("_stage2" if job == "crr_stage2" else "") + ".pth, with the same settings", action="store_true")
    add(start, "overwrite", "start afresh in a run folder that holds a trained " +
        ("segmentation network (Seg_model_*.pth), deleting it" if job == "crr_stage2" else
         "model (model.pth), deleting it and Stage II's Seg_model_*.pth made from it"), action="store_true")


def speed_flags(fast, add: Flags, job: str):
    add(fast, "precision", "fp32; tf32 (TF32 tensor-core matmuls); bf16 (bfloat16 autocast of the forward pass "
                           "and the loss; float32 weights, maps and scores)", choices=PRECISIONS)
    add(fast, "compile", "torch.compile the network blocks (slow first steps)", action="store_true")
    add(fast, "cache_images", "keep decoded, resized images (identical tensors): memory (training images, shared "
                              "by the loader workers) or disk (memory-mapped files in --cache_dir, kept for later "
                              "runs: training and test images)" +
        ("; CRR training also keeps its object masks and textures" if job in ("crr_stage1", "crr_stage2") else ""),
        choices=CACHE_MODES)
    add(fast, "cache_dir", "folder of disk image caches (default: <save_dir>/image_cache)")


def evaluation_flags(ev, add: Flags, job: str):
    add(ev, "aupro", "AUPRO: exact (MVTec definition) or dinomaly (200 thresholds, as the Dinomaly paper)",
        choices=["exact", "dinomaly"])
    add(ev, "gt_binarize", "pixel ground truth at 256: nearest then >0 (dinomaly), >=0.5, bilinear, >=0.5 (crr) "
                           "or >0.5 then nearest (mulsen)", choices=["dinomaly", "crr", "mulsen"])
    add(ev, "multiview", "Real-IAD, Real-IAD Variety, MANTA-Tiny: on = Dinomaly2's multi-view evaluation: test "
                         "views grouped into objects, an anomalous view without a mask counted normal, and the "
                         "object level (O-AUROC, O-AP, O-F1max) and Real-IAD's sample level (S-AUROC) added",
        choices=["on", "off"])
    add(ev, "max_ratio", "image score = mean of this top share of the map (0 = its maximum)", type=float_in(0, 1))
    if job == "crr_test":
        add(ev, "fusion_alpha", "fused map = a * reconstruction + (1 - a) * segmentation", type=float_in(0, 1))
    add(ev, "replace_results", "evaluate another run's --checkpoint into a --save_name folder that holds a "
                               "trained model, replacing that run's thresholds.json, metrics, scores and "
                               "pictures", action="store_true")
    add(ev, "false_alarm_rate", "for classes tested on good images only: the image threshold calls about this "
                                "share of good images anomalous (with defect images the threshold maximises F1)",
        type=float_in(0, 1, high_open=True, low_open=True))
    add(ev, "save_heatmaps", "write image | ground truth | anomaly map PNGs for the first N anomalous test "
                             "images of each class", type=int_at_least(0), metavar="N")


def defaults_of(recipe, defaults: dict) -> dict:
    """Every flag's default: the dataclasses', the script's recipe, then its DEFAULTS."""
    out = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
           for cls in (DataOptions, RunOptions, EvalOptions) for f in dataclasses.fields(cls)}
    if recipe is not None:
        out.update(dataclasses.asdict(recipe))
    return dict(out, **defaults)


def parse(description: str, recipe: Recipe | SegmentationRecipe | None, defaults: dict,
          datasets: dict[str, dict] | None = None, argv: list[str] | None = None) -> Settings:
    """The command line -> Settings (argument errors: one line, exit status 2)."""
    parser = build_parser(description, recipe, defaults, datasets)
    given = {k: tuple(v) if isinstance(v, list) else v  # lists (--classes, --taps) as tuples: frozen settings
             for k, v in vars(parser.parse_args(argv)).items()}
    values = defaults_of(recipe, defaults)
    dataset = given.get("dataset", values["dataset"])
    if datasets is not None:
        row = datasets.get(dataset, {})
        for name in {k for r in datasets.values() for k in r}:  # outside the table: no default
            values[name] = row.get(name)
    if isinstance(values.get("save_name"), str):  # a script's default run name may name the dataset
        values["save_name"] = values["save_name"].format(dataset=dataset)
    values.update(given)
    values["save_name_given"] = "save_name" in given
    if isinstance(values.get("classes"), list):  # a script's DEFAULTS
        values["classes"] = tuple(values["classes"])
    if not values.get("cache_dir"):
        values["cache_dir"] = os.path.join(values["save_dir"], "image_cache")
    if recipe is not None:
        recipe = recipe.replace(**{f.name: values[f.name] for f in dataclasses.fields(recipe)})
        if isinstance(recipe, Recipe):
            try:
                recipes.check(recipe)
                if not values["eval_only"] and recipe.image_size and recipe.crop_size:  # (--eval_only: the run's)
                    cfg = ENCODERS[recipe.encoder]
                    check_sizes(recipe.image_size, recipe.crop_size, cfg.patch_size, cfg.fixed_grid)
            except UserError as e:
                parser.error(str(e))
    if "batch_size" not in given and recipe is not None:  # a training job evaluates at its training batch
        values["batch_size"] = recipe.batch_size
    recipe_names = {f.name for cls in (Recipe, SegmentationRecipe) for f in dataclasses.fields(cls)}

    def options(cls):
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    return Settings(job=job_of(recipe), recipe=recipe,
                    given={k: v for k, v in given.items() if k in recipe_names and k not in OPTIONS},
                    data=options(DataOptions), run=options(RunOptions), evaluation=options(EvalOptions))


def main(description: str, recipe: Recipe | SegmentationRecipe | None, defaults: dict,
         datasets: dict[str, dict] | None = None, argv: list[str] | None = None):
    """A paper script: parse its command line first, so that --help and argument errors answer before PyTorch
    is imported, then run its job (jobs.JOBS) under run.main."""
    settings = parse(description, recipe, defaults, datasets, argv)
    from .run import main as run_main
    jobs = importlib.import_module(f"{__package__}.jobs")
    run_main(jobs.JOBS[settings.job], settings)


def run_script(module, argv: list[str] | None = None):
    """A paper script module (its RECIPE, DEFAULTS and, where it has one, DATASETS) run with `argv`."""
    main(module.__doc__, module.RECIPE, module.DEFAULTS, getattr(module, "DATASETS", None), argv)


# ----------------------------------------------------------------------------------------------- predict and export

PREDICT_HELP = """Run a trained model on new images: a score, a decision, a heatmap overlay and a mask for each
image, in the image's own geometry.

    python predict.py --checkpoint saved_results/<run> --input photos/ --out predictions/
    python predict.py --checkpoint saved_results/<run> --input "line3/*.png" a.bmp --out p/ --class_name nut
    dinomaly-predict ...       (the same command, after pip install)

The run folder gives the model's settings (encoder, image and crop size, CRR masking) and, for a CRR run, the
segmentation network (Seg_model_7999.pth, else Seg_model_last.pth): the fused map. Its thresholds.json
(written by evaluation) gives the decision thresholds: those of the image's class, found by the run's
class_prototypes.pt, or of one class with --class_name, else of all classes; --threshold T overrides them. An
image is anomalous when score >= threshold. A run with one model per class (--per_class) sends each image to
its class's model and thresholds.

Writes into --out: predictions.csv (image_path, score, decision, threshold, overlay, mask, class,
class_confidence[, normalized_score]), overlays/<name>.png (the map over the image on the class's fixed colour
scale, the predicted mask outlined, the border outside the centre crop, which the model never sees, hatched) and
masks/<name>.png (0/255, the image's size; 0 outside the crop). The mask of an anomalous image is where its map
reaches the pixel threshold capped by the image threshold, so it is never empty; a normal image's mask is
empty. An unreadable image is reported and skipped.

In Python:

    from dinomaly import Detector
    detector = Detector("saved_results/demo")          # same options as the flags, e.g. class_name="nut"
    r = detector(image)                                 # a path, a PIL image or an RGB numpy array
    r.score, r.is_anomalous, r.anomaly_map, r.mask      # map and mask: [H, W] like the image
    r.class_name, r.class_match                         # the class whose thresholds decided, how well it matched
"""

EXPORT_HELP = """Export a trained run to ONNX or OpenVINO: the whole map computation in one graph, for deployment
without PyTorch, in fp32, fp16 or INT8, checked against PyTorch.

    pip install -r requirements-export.txt        # onnx, onnxruntime, openvino, nncf (pip install dinomaly[openvino])
    python export.py --checkpoint saved_results/<run> --out model.onnx
    python export.py --checkpoint saved_results/<run> --out model.xml --precision int8    # OpenVINO, NNCF INT8
    dinomaly-export ...        (the same command, after pip install)

--out's suffix chooses the format: .onnx (ONNX Runtime) or .xml (OpenVINO IR, with its .bin beside it, converted
by OpenVINO's own converter). --precision int8 is ONNX Runtime's dynamic INT8 of the matrix products for .onnx,
NNCF's post-training INT8 calibrated on --calibration_images of the run's good training images for .xml; fp16
stores float16 weights. The map, smoothing, score and class distances stay float32 in every precision; INT8 also
keeps in float the blocks whose quantisation moves the scores most, measured on the run's good training images,
until no score moves by more than --max_score_change (the export reports which, and stores them in the metadata
as int8_float_layers).

Input `image`: float32 [B, 3, crop, crop], RGB in [0, 1], already resized to image_size and centre-cropped
(not normalised: the ImageNet normalisation is inside the graph). Outputs `anomaly_map` [B, 1, 256, 256] (the
smoothed map) and `score` [B] (mean of its top max_ratio share). The batch size is dynamic. A CRR run (with
Seg_model_*.pth) exports the fused map, with the test-time bottleneck masking off: it is random, and a
deployed model should give the same answer twice. The run's sizes, normalisation and calibrated thresholds (its
thresholds.json, or --thresholds FILE: for a CRR run, one from an evaluation with --test_mask off matches the
exported map) are written into the model's metadata (image_size, crop_size, mean, std, threshold,
pixel_threshold, mask_threshold, class_thresholds, color_range, and the whole thresholds file as thresholds). A
run with several classes and its class_prototypes.pt also finds each image's class in the graph: outputs
`class_index` [B] (int64, into the metadata's `classes`), `class_distance` [B] (1 - cosine to that class's
prototype; the image matches no class well when it exceeds class_far x class_radius[class_index]) and
`class_distances` [B, C]; pick class_thresholds[classes[class_index]] as predict.py does.

A run of pairs (dinomaly2_mvtec3d.py, dinomaly2_mulsen.py) exports a graph of two inputs, each float32
[B, 3, crop, crop] in [0, 1]: `rgb` and `depth` (as in training: the image with its background zeroed and the
z map coloured, dinomaly/modalities.py's rgbd_from) or `rgb` and `infrared`; the metadata's `modality` ("rgbd",
"rgbir") and `inputs` name them.
RGB + depth gives the fused map and score; RGB + infrared gives the RGB image's map as `anomaly_map`, the
infrared image's as `infrared_map` [B, 1, 256, 256], and the pair's `score`, the mean of the two images' scores.

After writing, the file is checked against PyTorch on the run's own images (those of its scores.csv: its test
images, or its held-out good images; random images without): the largest score and map differences, and the
image AUROC and decisions before and after. An fp32 export more than 1e-4 from PyTorch's score fails. predict.py
and Detector take the written file as --checkpoint.
"""


def predict_parser() -> ArgumentParser:
    p = ArgumentParser(PREDICT_HELP)
    p.add_argument("--checkpoint", required=True,
                   help="a run folder or its model.pth (ours or official), or an exported model (.onnx, .xml)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quoted)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float,
                   help="image threshold: anomalous when score >= this (default: the run's thresholds.json)")
    p.add_argument("--class_name", help="decide every image with this class's calibrated thresholds (and, in a run "
                                        "with one model per class, its model) instead of those of the class found "
                                        "for each image")
    p.add_argument("--thresholds", help="a thresholds.json other than the run folder's")
    p.add_argument("--normalize", action="store_true",
                   help="add normalized_score: 0 at the lowest normal test score, 0.5 at the threshold, clipped "
                        "to [0, 1]")
    p.add_argument("--seg_checkpoint",
                   help="CRR segmentation network (default: the run folder's Seg_model_7999.pth or _last.pth)")
    p.add_argument("--batch_size", type=int_at_least(1), default=8)
    p.add_argument("--num_workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="image reading threads (0: read in the main thread)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    over = p.add_argument_group("overrides (default: the run's)")
    for f in recipes.flags(Recipe):
        if f.name in PREDICT_OVERRIDES:
            over.add_argument(f"--{f.name}", help=f.metadata["help"], **f.metadata["flag"])
    over.add_argument("--max_ratio", type=float_in(0, 1), help="image score = mean of this top share of the map")
    over.add_argument("--fusion_alpha", type=float_in(0, 1), help="CRR: a * reconstruction + (1 - a) * segmentation")
    return p


def export_parser() -> ArgumentParser:
    p = ArgumentParser(EXPORT_HELP)
    p.add_argument("--checkpoint", required=True, help="a run folder or its model.pth")
    p.add_argument("--out", required=True, help="the file to write: .onnx (ONNX) or .xml (OpenVINO, with its .bin)")
    p.add_argument("--format", choices=["onnx", "openvino"], help="default: the one --out's suffix names")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="int8: ONNX Runtime's dynamic INT8 (onnx), NNCF's calibrated INT8 (openvino)")
    p.add_argument("--seg_checkpoint",
                   help="CRR segmentation network (default: the run folder's Seg_model_7999.pth or _last.pth)")
    p.add_argument("--thresholds", help="the thresholds.json to store (default: the run folder's)")
    p.add_argument("--check_batch", type=int_at_least(1), default=2,
                   help="batch size of the check against PyTorch (above 1: checks the dynamic axis)")
    p.add_argument("--check_images", type=int_at_least(1), default=100,
                   help="at most this many images of the run's scores.csv (a seeded subset) for the check")
    p.add_argument("--calibration_images", type=int_at_least(1), default=300,
                   help="openvino int8: good training images that calibrate the quantisation (a seeded subset; "
                        "up to 8 others measure the layer selection, in either format)")
    p.add_argument("--calibration_data", metavar="DIR",
                   help="int8: a folder of good images to calibrate on (default: the run's training images)")
    p.add_argument("--max_score_change", type=float_in(0, 1, low_open=True, high_open=True),
                   default=MAX_SCORE_CHANGE,
                   help="int8: keep in float the blocks that quantisation makes move a good image's score by more "
                        f"than this share of it (measured; default {MAX_SCORE_CHANGE:g}: {100 * MAX_SCORE_CHANGE:g}%%)")
    p.add_argument("--seed", type=int, default=0, help="chooses the check and calibration subsets")
    return p


SERVE_HELP = """Serve a trained run over HTTP: POST /predict (images in, JSON out: score, decision, threshold,
class, regions), GET /health, GET /info, the API's pages at /docs, and the review page at / (see
docs/serving.md).

    python serve.py --checkpoint saved_results/<run>                  # http://127.0.0.1:8000/
    curl -F image=@part.png http://127.0.0.1:8000/predict
    dinomaly-serve ...         (the same command, after pip install "dinomaly[serve]")

The run is loaded once, as predict.py loads it (the same flags), and concurrent requests are scored together
in batches (--max_batch, --max_wait_ms) with predict.py's code: a served score is predict.py's. Every request
is bounded (--max_mb, --max_images, --max_pixels) and at most --max_queue images wait (beyond: 503 with
Retry-After). It listens on 127.0.0.1 (this machine only) unless --host says otherwise; --token (or the
environment variable DINOMALY_SERVE_TOKEN) makes every request need 'Authorization: Bearer <token>'.
"""


def serve_parser() -> ArgumentParser:
    p = ArgumentParser(SERVE_HELP)
    p.add_argument("--checkpoint", required=True, help="a run folder or its model.pth")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (0.0.0.0: every network of this machine; then set --token)")
    p.add_argument("--port", type=int_at_least(1, 65535), default=8000)
    p.add_argument("--token", help="a secret every request must send (default: $DINOMALY_SERVE_TOKEN, else none)")
    p.add_argument("--thresholds", help="a thresholds.json other than the run folder's (the page saves into it)")
    p.add_argument("--threshold", type=float,
                   help="one image threshold for every image (default: the thresholds file's, per class)")
    p.add_argument("--seg_checkpoint",
                   help="CRR segmentation network (default: the run folder's Seg_model_7999.pth or _last.pth)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max_batch", type=int_at_least(1), default=8, help="images scored together at most")
    p.add_argument("--max_wait_ms", type=float_in(0, 1000), default=5.0,
                   help="how long the first image of a batch waits for others")
    p.add_argument("--max_queue", type=int_at_least(1), default=64,
                   help="images waiting or being scored at most; more: 503")
    p.add_argument("--max_images", type=int_at_least(1), default=16, help="images in one request at most")
    p.add_argument("--max_mb", type=float_in(0.001, 4096), default=32.0,
                   help="the size of one request at most, in MB")
    p.add_argument("--max_pixels", type=int_at_least(1), default=40_000_000,
                   help="pixels of one image at most (a larger one is refused before it is decoded)")
    p.add_argument("--review", metavar="DIR", help="a folder of images the review page scores when it opens")
    return p


def launch(module: str, options: str, parser: ArgumentParser, argv: list[str] | None, prepare=None):
    """Parse first (--help and argument errors before PyTorch is imported; `prepare(given)`: what else can be
    checked without it), then run <module>.main with the module's typed `options` (predict.PredictOptions,
    export.ExportOptions) under run.main."""
    given = {k: tuple(v) if isinstance(v, list) else v  # lists (--classes, --taps) as tuples: frozen settings
             for k, v in vars(parser.parse_args(argv)).items()}
    if prepare is not None:
        try:
            given = prepare(given)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    from .run import main as run_main
    try:
        target = importlib.import_module(f"{__package__}.{module}")
    except ImportError as e:  # a runtime install (requirements-runtime.txt) runs exported models only
        if (e.name or "").partition(".")[0] not in ("torch", "timm", "torchvision"):
            raise
        print(f"error: dinomaly-{module} needs PyTorch, and {e.name} is not installed here: pip install -r "
              f"requirements.txt (this environment runs exported models: dinomaly-predict, docs/deployment.md)",
              file=sys.stderr)
        sys.exit(2)
    run_main(target.main, getattr(target, options)(**given))


def predict_main(argv: list[str] | None = None):
    """predict.py and the `dinomaly-predict` command."""
    launch("predict", "PredictOptions", predict_parser(), argv, images_given)


def images_given(given: dict) -> dict:
    """predict's --input as the image files it names, found before PyTorch is imported: a missing path or a
    folder without images answers at once."""
    from .image_files import find_images
    return dict(given, input=tuple(find_images(given["input"], skip_dir=given["out"])))


def export_main(argv: list[str] | None = None):
    """export.py and the `dinomaly-export` command."""
    launch("export", "ExportOptions", export_parser(), argv)


def serve_main(argv: list[str] | None = None):
    """serve.py and the `dinomaly-serve` command."""
    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: the service needs {', '.join(missing)}: pip install -r requirements-serve.txt (installed: "
                 f"pip install \"dinomaly[serve]\")")
    launch("serve", "ServeOptions", serve_parser(), argv)
