"""The command line of every script: every flag, its default and its validation, by job, and the entry points.

A script passes its defaults (data path, run name, iterations, batch, dropout, AUPRO variant, ground truth rule),
optionally per --dataset (`dataset_defaults`: the values that depend on the dataset, filled in where not given),
and its job: "dinomaly", "dinomaly2", "crr_stage1", "crr_stage2" or "crr_test". Each job offers only the flags it
uses.
"""
import argparse
import importlib
import os

from .flags import (ADAM_EPS, CACHE_MODES, DATASET_NAMES, FALSE_ALARM_RATE, LC_CHOICES, PRECISIONS, VAL_SHARE,
                    ArgumentParser, float_in, int_at_least)

JOBS = ("dinomaly", "dinomaly2", "crr_stage1", "crr_stage2", "crr_test")


def launch(job_function: str, parser: ArgumentParser, argv: list[str] | None = None, module: str = "engine"):
    """Parse the arguments first, so that --help and argument errors answer before PyTorch and the engine are
    imported, then run <module>.<job_function> (engine.dinomaly_main, predict.predict, ...) under run.main."""
    parser.parse_args(argv)
    from .run import main
    main(getattr(importlib.import_module(f"{__package__}.{module}"), job_function), parser, argv)


def encoder_name(text: str) -> str:
    """--encoder: one of models.ENCODERS (imported, with PyTorch, only when the flag is given)."""
    from . import models
    if text not in models.ENCODERS:
        raise argparse.ArgumentTypeError(f"unknown encoder {text}; choose one of {', '.join(models.ENCODERS)}")
    return text


def dataset_defaults(datasets: dict[str, tuple[str, int, int]], save_name: str) -> dict[str, dict]:
    """build_parser's dataset_defaults from {dataset: (data path, image size, crop size)} and a run-name pattern
    with {dataset}."""
    return {name: dict(data_path=path, image_size=size, crop_size=crop, save_name=save_name.format(dataset=name))
            for name, (path, size, crop) in datasets.items()}


def build_parser(description: str, defaults: dict, job: str,
                 dataset_defaults: dict[str, dict] | None = None) -> ArgumentParser:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}")
    trains_recon = job in ("dinomaly", "dinomaly2", "crr_stage1")
    trains = trains_recon or job == "crr_stage2"
    evaluates = job != "crr_stage2"
    crr = job.startswith("crr")
    p = ArgumentParser(description)

    data = p.add_argument_group("data")
    data.add_argument("--data_path", help="dataset root folder")
    data.add_argument("--dataset", choices=sorted(DATASET_NAMES),
                      help="reader and default classes: mvtec and visa read the MVTec layout (also MPDD, BTAD and "
                           "your own data with --classes); realiad and realiad_variety read Real-IAD's JSON splits; "
                           "manta reads MANTA-Tiny (five views side by side in each image)")
    data.add_argument("--classes", nargs="+", metavar="CLASS",
                      help="classes (folders) to use; default: the dataset's standard list")
    data.add_argument("--realiad_resolution",
                      help="Real-IAD image folder: realiad_1024 (default), realiad_512, realiad_256 or realiad_raw; "
                           "Real-IAD Variety: realiadvariety_1024 where it exists (default), else realiadvariety_raw")
    data.add_argument("--json_dir",
                      help="Real-IAD split folder: realiad_jsons (default), realiad_jsons_sv (single view), "
                           "realiad_jsons_fuiad_0.1, ... (fully unsupervised); Real-IAD Variety: realiadvariety_jsons")
    from_run = "" if trains_recon else "; default: the Stage-I run's"  # later CRR stages follow Stage I
    data.add_argument("--allow_outside_paths", action="store_true",
                      help="Real-IAD: accept split-file paths that lead out of --data_path (../)")
    data.add_argument("--image_size", type=int_at_least(14), default=448 if trains_recon else None,
                      help="images are resized to this square size" + from_run)
    data.add_argument("--crop_size", type=int_at_least(14), default=392 if trains_recon else None,
                      help="then centre-cropped to this size, a multiple of the encoder's patch size (14 for "
                           "DINOv2, 16 for DINOv3: e.g. 392 or 448, both a 28 x 28 grid)" + from_run)
    data.add_argument("--num_workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                      help="data loader worker processes")
    data.add_argument("--val", metavar="DIR",
                      help="good images to set the thresholds of classes without a test folder, DIR/<class>/ "
                           "(default: hold out --val_share of their training images)")
    data.add_argument("--val_share", type=float_in(0, 1, high_open=True), default=VAL_SHARE,
                      help="share of the good images of a class without a test folder held out of training, "
                           "chosen with --seed, to set its threshold")
    if crr and job != "crr_test":
        data.add_argument("--anomaly_source_path", default="../dtd",
                          help="texture images for anomaly synthesis (the DTD dataset, <dtd>/images/*/*.jpg); "
                               "'none': anomalies made from the image itself only (not the paper's recipe)")
        data.add_argument("--foreground_path",
                          help="object masks restricting where anomalies go, <DIR>/<class>/<image path with OK -> "
                               "DISthresh> (default for Real-IAD: <data_path>/<resolution>_DISthresh, where the "
                               "released code looks; without them anomalies may fall anywhere)")

    run = p.add_argument_group("run")
    run.add_argument("--save_dir", default="./saved_results", help="parent folder of the run folders")
    run.add_argument("--save_name", help="run folder name under --save_dir")
    run.add_argument("--device", help="torch device, e.g. cuda, cuda:1 or cpu (default: cuda when available)")
    run.add_argument("--seed", type=int_at_least(0, 2 ** 31), default=1, help="random seed")
    run.add_argument("--cudnn", choices=["deterministic", "benchmark"],
                     help="cuDNN mode: deterministic kernels, or the fastest found by benchmarking (the reference "
                          "scripts use deterministic for MVTec AD, VisA and the CRR test, benchmark for CRR training)")
    run.add_argument("--batch_size", type=int_at_least(1), help="images per step (the global batch under torchrun)")

    model = p.add_argument_group("model")
    if trains_recon:
        model.add_argument("--encoder", type=encoder_name,
                           help="encoder to train with (default dinov2reg_vit_base_14; see the README's table); "
                                "with --eval_only the architecture comes from the run or the checkpoint and this "
                                "checks it, or names it for a checkpoint without config.json whose layout several "
                                "encoders share")
        model.add_argument("--encoder_weights",
                           help="the encoder's weight file as its publisher distributes it, or 'random' for a "
                                "smoke run (default: backbones/weights/<publisher's file name>; see the README)")
        model.add_argument("--dropout", type=float_in(0, 1, high_open=True), help="bottleneck dropout rate")
        model.add_argument("--eval_only", action="store_true", help="skip training; evaluate --checkpoint")
    model.add_argument("--checkpoint",
                       help="reconstruction model: a run folder or a model.pth (ours or official); its image "
                            "size, crop size, encoder, mask ratio, test masking and attention epsilon are used "
                            "unless given here" +
                            ("; default: <save_dir>/<save_name>/model.pth" if not trains_recon else ""))
    model.add_argument("--attn_eps", type=float_in(0, 1), default=0.0 if trains_recon else None,
                       help="epsilon in the linear-attention denominator (0 = official; 1e-6 avoids NaNs)" + from_run)
    if crr:
        model.add_argument("--mask_ratio", type=float_in(0, 1, high_open=True), default=0.4 if trains_recon else None,
                           help="bottleneck masking ratio" + from_run)
        model.add_argument("--test_mask", choices=["on", "off"], default="on" if trains_recon else None,
                           help="bottleneck masking of the frozen model in eval mode (on = the released code, "
                                "seeded)" + from_run)
        model.add_argument("--mask_rng", choices=["cpu", "device"], default="cpu",
                           help="where the frozen model's masks are drawn in evaluation and Stage II: cpu (the "
                                "released code's random stream, reproduced by --seed; slow next to a GPU) or device "
                                "(on the model's device, the GPU; in evaluation each image's mask is seeded by --seed, "
                                "its class and its index, so the metrics do not depend on the batch size or the "
                                "number of processes)")
    if job == "dinomaly2":
        model.add_argument("--lc", type=int, choices=LC_CHOICES, default=2,
                           help="groups of the 8 taps compared (loose constraint): 0 layer to layer, 1 one group, 2 "
                                "two groups of 4, 3 three, 4 four, 11 the last tap, 12 taps 4 and 8, 14 taps 2, 4, 6, 8")
        model.add_argument("--cr", type=int, choices=[0, 1], default=1,
                           help="context-aware recentering of the encoder targets: LN(patch tokens - CLS) (1), or the "
                                "raw tokens as Dinomaly (0)")
        model.add_argument("--la", type=int, choices=[0, 1], default=1,
                           help="decoder attention: linear (1), or softmax (0)")
    if job == "crr_test":
        model.add_argument("--seg_checkpoint",
                           help="segmentation network (default: Seg_model_7999.pth, else Seg_model_last.pth, "
                                "beside the model, else in the run folder)")
        model.add_argument("--fusion_alpha", type=float_in(0, 1), default=0.7,
                           help="fused map = a * reconstruction + (1 - a) * segmentation")

    if trains:
        train = p.add_argument_group("training")
        train.add_argument("--total_iters", type=int_at_least(1), help="training iterations")
        if job == "dinomaly2":
            train.add_argument("--shot", type=int_at_least(1),
                               help="few-shot: train on this many images per class (chosen with --seed as the "
                                    "preview code does), with strong augmentation (default: all images)")
            train.add_argument("--bottleneck_in_lr", type=float_in(0, 1), default=2e-4,
                               help="learning rate of the first bottleneck layer (D -> 256); the rest use 2e-3")
            train.add_argument("--lr_decay_ratio", type=float_in(0, 1), default=1.0,
                               help="the learning rate after warm-up falls on a cosine to this share of its start "
                                    "(1: constant)")
        if trains_recon:
            train.add_argument("--adam_eps", type=float_in(0, 1), default=ADAM_EPS, help="StableAdamW's epsilon")
        if job in ("dinomaly", "dinomaly2"):
            train.add_argument("--per_class", action="store_true",
                               help="one model per class (the class-separated setting): each class is trained and "
                                    "evaluated alone, as a run on that class alone would be, into <run>/<class>/; "
                                    "the run folder gets the table of all classes and their mean, and predict.py "
                                    "sends each image to its class's model")
        train.add_argument("--log_every", type=int_at_least(1), default=100,
                           help="log the mean loss every N iterations")
        train.add_argument("--save_every", type=int_at_least(1), default=1000,
                           help="save the model and the training state (for --resume) every N iterations")
        start = train.add_mutually_exclusive_group()
        start.add_argument("--resume", action="store_true",
                           help="continue the run folder's interrupted training from its train_state" +
                                ("_stage2" if job == "crr_stage2" else "") + ".pth, with the same settings")
        start.add_argument("--overwrite", action="store_true",
                           help="start afresh in a run folder that holds a trained " +
                                ("segmentation network (Seg_model_*.pth), deleting it" if job == "crr_stage2" else
                                 "model (model.pth), deleting it and Stage II's Seg_model_*.pth made from it"))

    fast = p.add_argument_group("speed (the defaults reproduce the papers)")
    fast.add_argument("--precision", choices=PRECISIONS, default="fp32",
                      help="fp32; tf32 (TF32 tensor-core matmuls); bf16 (bfloat16 autocast of the forward pass and "
                           "the loss; float32 weights, maps and scores)")
    fast.add_argument("--compile", action="store_true", help="torch.compile the network blocks (slow first steps)")
    fast.add_argument("--cache_images", choices=CACHE_MODES, default="none",
                      help="keep decoded, resized images (identical tensors): memory (training images, shared by "
                           "the loader workers) or disk (memory-mapped files in --cache_dir, kept for later runs: "
                           "training and test images)" +
                           ("; CRR training also keeps its object masks and textures" if crr and trains else ""))
    fast.add_argument("--cache_dir", help="folder of disk image caches (default: <save_dir>/image_cache)")

    if evaluates:
        ev = p.add_argument_group("evaluation")
        ev.add_argument("--aupro", choices=["exact", "dinomaly"],
                        help="AUPRO: exact (MVTec definition) or dinomaly (200 thresholds, as the Dinomaly paper)")
        ev.add_argument("--gt_binarize", choices=["dinomaly", "crr"],
                        help="pixel ground truth at 256: nearest then >0 (dinomaly) or >=0.5, bilinear, >=0.5 (crr)")
        ev.add_argument("--multiview", choices=["on", "off"], default="off",
                        help="Real-IAD, Real-IAD Variety, MANTA-Tiny: on = Dinomaly2's multi-view evaluation: test "
                             "views grouped into objects, an anomalous view without a mask counted normal, and the "
                             "object level (O-AUROC, O-AP, O-F1max) and Real-IAD's sample level (S-AUROC) added")
        ev.add_argument("--max_ratio", type=float_in(0, 1), default=0.01,
                        help="image score = mean of this top share of the map (0 = its maximum)")
        ev.add_argument("--replace_results", action="store_true",
                        help="evaluate another run's --checkpoint into a --save_name folder that holds a trained "
                             "model, replacing that run's thresholds.json, metrics, scores and pictures")
        ev.add_argument("--false_alarm_rate", type=float_in(0, 1, high_open=True), default=FALSE_ALARM_RATE,
                        help="for classes tested on good images only: the image threshold calls about this share of "
                             "good images anomalous (with defect images the threshold maximises F1)")
        ev.add_argument("--save_heatmaps", type=int_at_least(0), default=0, metavar="N",
                        help="write image | ground truth | anomaly map PNGs for the first N anomalous test images "
                             "of each class")
    p.set_defaults(**defaults)
    p.dataset_defaults = dataset_defaults or {}
    return p


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

EXPORT_HELP = """Export a trained run to ONNX: the whole map computation in one graph, for deployment without PyTorch.

    pip install -r requirements-export.txt        # onnx and onnxruntime (installed: pip install dinomaly[export])
    python export.py --checkpoint saved_results/<run> --out model.onnx
    dinomaly-export ...        (the same command, after pip install)

Input `image`: float32 [B, 3, crop, crop], RGB in [0, 1], already resized to image_size and centre-cropped
(not normalised: the ImageNet normalisation is inside the graph). Outputs `anomaly_map` [B, 1, 256, 256] (the
smoothed map) and `score` [B] (mean of its top max_ratio share). The batch size is dynamic. A CRR run (with
Seg_model_*.pth) exports the fused map, with the test-time bottleneck masking off: it is random, and a
deployed model should give the same answer twice. The run's sizes and calibrated thresholds (its
thresholds.json, or --thresholds FILE: for a CRR run, one from an evaluation with --test_mask off matches the
exported map) are written into the model's metadata (image_size, crop_size, threshold, pixel_threshold,
mask_threshold, class_thresholds, color_range). A run with several classes and its class_prototypes.pt also
finds each image's class in the graph: outputs `class_index` [B] (int64, into the metadata's `classes`) and
`class_distance` [B] (1 - cosine to that class's prototype; the image matches no class well when it exceeds
class_far x class_radius[class_index]); pick class_thresholds[classes[class_index]] as predict.py does. After
writing, the file is checked with onnxruntime against PyTorch on random images.
"""


def predict_parser() -> ArgumentParser:
    p = ArgumentParser(PREDICT_HELP)
    p.add_argument("--checkpoint", required=True, help="a run folder or its model.pth (ours or official)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quoted)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float,
                   help="image threshold: anomalous when score >= this (default: the run's thresholds.json)")
    p.add_argument("--class_name", help="use this class's calibrated thresholds instead of all classes'")
    p.add_argument("--thresholds", help="a thresholds.json other than the run folder's")
    p.add_argument("--normalize", action="store_true",
                   help="add normalized_score: 0 at the lowest normal test score, 0.5 at the threshold, clipped "
                        "to [0, 1]")
    p.add_argument("--seg_checkpoint",
                   help="CRR segmentation network (default: the run folder's Seg_model_7999.pth or _last.pth)")
    p.add_argument("--batch_size", type=int_at_least(1), default=8)
    p.add_argument("--num_workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                   help="image reading processes")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    over = p.add_argument_group("overrides (default: the run's)")
    over.add_argument("--image_size", type=int_at_least(14))
    over.add_argument("--crop_size", type=int_at_least(14))
    over.add_argument("--test_mask", choices=["on", "off"], help="CRR bottleneck masking at test time")
    over.add_argument("--mask_ratio", type=float_in(0, 1, high_open=True))
    over.add_argument("--max_ratio", type=float_in(0, 1), help="image score = mean of this top share of the map")
    over.add_argument("--fusion_alpha", type=float_in(0, 1), help="CRR: a * reconstruction + (1 - a) * segmentation")
    return p


def export_parser() -> ArgumentParser:
    p = ArgumentParser(EXPORT_HELP)
    p.add_argument("--checkpoint", required=True, help="a run folder or its model.pth")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--seg_checkpoint",
                   help="CRR segmentation network (default: the run folder's Seg_model_7999.pth or _last.pth)")
    p.add_argument("--thresholds", help="the thresholds.json to store (default: the run folder's)")
    p.add_argument("--check_batch", type=int_at_least(1), default=2,
                   help="random images to compare onnxruntime with PyTorch on (a batch: checks the dynamic axis)")
    return p


def predict_main(argv: list[str] | None = None):
    """predict.py and the `dinomaly-predict` command."""
    launch("predict", predict_parser(), argv, module="predict")


def export_main(argv: list[str] | None = None):
    """export.py and the `dinomaly-export` command."""
    launch("export", export_parser(), argv, module="export")
