"""The jobs of the paper scripts, each run from the Settings its command line was parsed into (cli.py):

- `train_and_evaluate` (jobs "dinomaly", "dinomaly2", "crr_stage1"): train one model of the script's recipe on
  all classes (or load `--checkpoint` with `--eval_only`), then evaluate; with --per_class one model per class.
- `crr_stage2`: CRR Stage II, the segmentation network on the frozen Stage-I model.
- `crr_test`: CRR test, the fused map.
"""
import os

from . import checkpoints, models, preflight, recipes, samples, speed, train_state
from . import dataset as ds
from . import thresholds as th
from .anomaly_map import AnomalyMapper, check_max_ratio
from .errors import UserError
from .evaluate import evaluate, save_class_prototypes, write_results
from .options import Settings
from .recipes import Recipe
from .run import Run, log, seed_everything
from .train import train_loader, train_reconstruction, train_segmentation
from .training_data import synthetic_train_set, train_dataset
from .utils import read_metrics_csv

SEGMENTATION_FILES = ["Seg_model_*.pth", train_state.SEGMENTATION]  # CRR Stage II's, in Stage I's run folder


def train_and_evaluate(settings: Settings):
    """Dinomaly, Dinomaly2 or CRR Stage I (method "crr": reconstruction + repair with bottleneck masking): train
    one model on all classes unless --eval_only, save model.pth, evaluate the reconstruction map. With --per_class
    (or --eval_only of such a run): one model per class (per_class)."""
    recipe, data, options = settings.recipe, settings.data, settings.run
    check_max_ratio(settings.evaluation.max_ratio)
    needed = ds.PAIR_DATASETS.get(data.dataset, "rgb")
    if needed != recipe.modality:
        scripts = {"rgbd": "dinomaly2_mvtec3d.py", "rgbir": "dinomaly2_mulsen.py"}
        raise UserError(f"--dataset {data.dataset} holds {recipes.MODALITIES[needed]}, but this script's model takes "
                        f"{recipes.MODALITIES[recipe.modality]}; " +
                        (f"use {scripts[needed]}" if needed in scripts else
                         f"pass --dataset {dict(map(reversed, ds.PAIR_DATASETS.items()))[recipe.modality]}"))
    if data.data_path is None:
        raise UserError(f"this script has no default data folder for --dataset {data.dataset}; pass --data_path "
                        f"(and --image_size and --crop_size)")
    if options.eval_only:
        if options.checkpoint is None:
            raise UserError("--eval_only needs --checkpoint (a run folder or model.pth)")
        if options.resume or options.overwrite:
            raise UserError("--resume and --overwrite are for training; --eval_only writes only metrics")
        run = Run(options, "config_eval.json")
        check_output_folder(run, options.checkpoint, settings.evaluation.replace_results)
    else:
        if recipe.image_size is None or recipe.crop_size is None:
            raise UserError(f"this script has no default sizes for --dataset {data.dataset}; pass --image_size and "
                            f"--crop_size")
        run = Run(options, "config.json")
    settings = with_classes(settings)
    if options.per_class or (options.eval_only and checkpoints.class_models(options.checkpoint)):
        return per_class(run, settings)
    mapper, used = run_model(run, settings)
    evaluate(run, mapper, settings.data, settings.evaluation, used.image_size, used.crop_size,
             tag="_recon" if recipe.method == "crr" else "")
    save_class_prototypes(run, mapper, settings.data, used.image_size, used.crop_size, settings.evaluation.batch_size)


def with_classes(settings: Settings) -> Settings:
    """The settings with the run's classes: --classes, the dataset's, or the class folders found (samples.py)."""
    return settings.replace(data=settings.data.replace(classes=tuple(samples.find_classes(settings.data))))


def run_model(run: Run, settings: Settings, checked: bool = False) -> tuple[AnomalyMapper, Recipe]:
    """The run's model in eval mode behind its AnomalyMapper, and its recipe: --checkpoint's with --eval_only
    (the given recipe fields overriding the saved ones), else the script's, trained now (continued with
    --resume). The data is checked first unless `checked`."""
    data, options, seed = settings.data, run.options, run.options.seed
    if options.eval_only:
        if not checked:
            preflight.check_data(data, seed)  # the data before the model, which takes longer to load
        model, recipe = trained_model(run, options.checkpoint, settings.given, settings.recipe.method,
                                      settings.recipe.modality)
        run.save_config(settings.config(model=recipe))
    else:
        recipe = settings.recipe
        crr = recipe.method == "crr"
        # what Stage II derived from an earlier model goes with it
        state = train_state.start(run, train_state.RECONSTRUCTION, ["model.pth", *SEGMENTATION_FILES])
        train_set = synthetic_train_set(data, seed, recipe.image_size, recipe.crop_size) if crr else \
            train_dataset(run, data, recipe)
        if not checked:
            preflight.check_data(data, seed, train_set.samples, train_set.synthesizer.texture_paths if crr else ())
        model = fresh_model(run, recipe, options.encoder_weights)
        loader = train_loader(run, train_set, recipe.batch_size, data.num_workers)
        run.save_config(settings.config(model=recipe, training=recipe, setting=training_setting(settings)))
        resume = train_state.settings(data, recipe, recipe.batch_size, recipe.total_iters, seed, len(train_set),
                                      run.world_size)
        train_reconstruction(run, model, loader, recipe, state, resume)
    run.barrier()
    model.eval()
    seed_everything(seed)
    return AnomalyMapper(model, max_ratio=settings.evaluation.max_ratio, precision=options.precision), recipe


def per_class(run: Run, settings: Settings):
    """One model per class (the class-separated setting): each class is trained (with --eval_only: --checkpoint's
    <class>/model.pth loaded) and evaluated alone in <run>/<class>/, from the seed on, as a run on that class
    alone would be; that folder is a complete one-class run. The run folder gets the table of every class and
    their mean (metrics.csv), and the class prototypes with which predict.py sends each image to its class's
    model. --resume skips the classes already evaluated and continues the one whose training stopped."""
    data, options, evaluation = settings.data, run.options, settings.evaluation
    train = [s for name in data.classes for s in samples.split_training(data, options.seed, name)[0]]
    preflight.check_data(data, options.seed, None if options.eval_only else train)  # each class logs its own
    run.save_config(settings.config() if options.eval_only else  # the setting marks the folder
                    settings.config(model=settings.recipe, training=settings.recipe, setting=checkpoints.SEPARATE))
    results, mapper, used = {}, None, None
    for i, name in enumerate(data.classes):
        checkpoint = os.path.join(options.checkpoint, name) if options.eval_only else options.checkpoint
        resume = options.resume and os.path.isfile(os.path.join(run.dir, name, train_state.RECONSTRUCTION))
        sub = run.subfolder(name, checkpoint=checkpoint, resume=resume)
        one = settings.replace(data=data.replace(classes=(name,)), run=sub.options)
        log.info(f"class {name} ({i + 1} of {len(data.classes)}): {sub.dir}")
        if options.resume and os.path.isfile(sub.path("metrics.csv")):
            results[name] = read_metrics_csv(sub.path("metrics.csv")).get(name)
            if results[name] is None:
                raise UserError(f"{sub.path('metrics.csv')} has no row for {name}; delete it to evaluate {name} again")
            log.info(f"{name}: trained and evaluated before (its metrics.csv); skipped")
            continue
        seed_everything(options.seed + run.rank)  # what a run on this class alone starts from
        mapper, used = run_model(sub, one, checked=True)
        results.update(evaluate(sub, mapper, one.data, evaluation, used.image_size, used.crop_size))
    if run.is_main:
        log.info(f"one model per class, {len(results)} classes:")
        for name, metrics in results.items():
            calibration = os.path.join(run.dir, name, "thresholds.json")
            entry = th.load(calibration)["classes"][name] if os.path.isfile(calibration) else None
            log.info(samples.metrics_line(name, metrics, entry))
        write_results(run, results)
    if mapper is None:  # every class was done before: the prototypes come from one of their models
        model, used = trained_model(run, run.path(data.classes[-1]), settings.given, settings.recipe.method,
                                    settings.recipe.modality)
        mapper = AnomalyMapper(model, max_ratio=evaluation.max_ratio, precision=options.precision)
    save_class_prototypes(run, mapper, data, used.image_size, used.crop_size, evaluation.batch_size)


def check_output_folder(run: Run, checkpoint: str, replace_results: bool):
    """Evaluating another run's model into a folder that holds a trained model would replace that run's
    thresholds.json, metrics, scores and pictures with those of another model: refused unless
    --replace_results."""
    own = run.path("model.pth")
    if replace_results or not os.path.isfile(own) or \
            os.path.samefile(checkpoints.checkpoint_file(checkpoint), own):
        return
    default = "" if run.options.save_name_given else \
        " (without --save_name the evaluation goes into the default training run's folder)"
    raise UserError(f"{run.dir} holds another trained model{default}; evaluating {checkpoint} there would replace "
                    f"that run's thresholds.json, metrics, scores and pictures: pass another --save_name, or "
                    f"--replace_results to replace them")


def training_setting(settings: Settings) -> str:
    """What the run is, in words, for config.json: "multi-class", "class-separated" (one model per class: the
    run folder and each class's folder in it), "K-shot" or "multi-view"."""
    if settings.run.per_class:
        return checkpoints.SEPARATE
    if settings.recipe.shot:
        return f"{settings.recipe.shot}-shot"
    return "multi-view" if settings.evaluation.multiview == "on" else "multi-class"


def trained_model(run: Run, path: str, given: dict, method: str,
                  modality: str | None = None) -> tuple[models.ViTill, Recipe]:
    """A trained reconstruction model in eval mode on the run's device, and its recipe: the saved run's, with
    the recipe fields `given` on the command line; `modality`: the script's inputs (checkpoints.load_trained)."""
    model, recipe = checkpoints.load_trained(path, given, method, modality)
    return prepared(run, model), recipe


def fresh_model(run: Run, recipe: Recipe, encoder_weights: str | None) -> models.ViTill:
    """A new model of the recipe, its encoder from --encoder_weights (default: the publisher's file in
    backbones/weights/)."""
    weights = encoder_weights or checkpoints.default_encoder_weights(recipe.encoder)
    model = checkpoints.build_model(recipe.encoder, weights, **checkpoints.model_options(recipe))
    if weights == "random":
        log.warning("warning: the encoder has random weights (--encoder_weights random): a smoke run only")
    log.info(f"trainable parameters: {sum(p.numel() for p in model.trainable_parameters()):,}")
    return prepared(run, model)


def prepared(run: Run, model: models.ViTill) -> models.ViTill:
    """`model` on the run's device with --mask_rng (CRR), --precision and --compile applied."""
    model.mask_rng = run.options.mask_rng
    speed.configure(run.options.precision)
    return speed.maybe_compile(model.to(run.device), run.options.compile)


# ----------------------------------------------------------------------------------------------- CRR's later stages

def crr_stage2(settings: Settings):
    """CRR Stage II: train the segmentation network on the frozen Stage-I model (never written)."""
    options, recipe = settings.run, settings.recipe
    run = Run(options, "config_stage2.json")
    settings = with_classes(settings)
    data = settings.data
    state = train_state.start(run, train_state.SEGMENTATION, ["Seg_model_*.pth"])
    checkpoint = checkpoints.checkpoint_file(options.checkpoint or run.dir)
    # the Stage-I run's sizes, then the data checked before the model, which takes longer to load
    sizes = checkpoints.saved_recipe(checkpoint, "crr")[0].replace(**settings.given)
    train_set = synthetic_train_set(data, options.seed, sizes.image_size, sizes.crop_size)
    preflight.check_data(data, options.seed, train_set.samples, train_set.synthesizer.texture_paths, test=False)
    model, stage1 = trained_model(run, checkpoint, settings.given, "crr")
    model.requires_grad_(False)
    if state is not None:
        checkpoints.check_segmentation_owner(run.dir, model, checkpoint, run.path(train_state.SEGMENTATION))
    run.save_config(settings.config(model=stage1, training=recipe, stage1_model=checkpoints.fingerprint(model)))
    loader = train_loader(run, train_set, recipe.batch_size, data.num_workers)
    resume = train_state.settings(data, stage1, recipe.batch_size, recipe.total_iters, options.seed, len(train_set),
                                  run.world_size)
    train_segmentation(run, model, loader, recipe, state, resume)


def crr_test(settings: Settings):
    """CRR test: fused map 0.7 * reconstruction + 0.3 * segmentation, metrics, optional heatmaps."""
    options, evaluation = settings.run, settings.evaluation
    check_max_ratio(evaluation.max_ratio)
    run = Run(options, "config_test.json")
    if options.checkpoint is not None:
        check_output_folder(run, options.checkpoint, evaluation.replace_results)
    settings = with_classes(settings)
    data = settings.data
    preflight.check_data(data, options.seed)  # the data before the model, which takes longer to load
    model, recipe = trained_model(run, options.checkpoint or run.dir, settings.given, "crr")
    run.save_config(settings.config(model=recipe))
    checkpoint = checkpoints.checkpoint_file(options.checkpoint or run.dir)
    folder = os.path.dirname(checkpoint)  # Stage II's network beside Stage I's model
    seg_path = options.seg_checkpoint or checkpoints.segmentation_file(folder) or \
        checkpoints.segmentation_file(run.dir)
    if seg_path is None:
        where = " or ".join(dict.fromkeys(os.path.normpath(f) for f in (folder, run.dir)))
        kind = " (this model was trained without bottleneck masking: a Dinomaly model, not CRR's Stage I?)" \
            if checkpoints.saved_settings(checkpoint).get("mask_ratio") == 0 else ""
        raise UserError(f"no segmentation network (Seg_model_7999.pth or Seg_model_last.pth) in {where}{kind}; "
                        f"run crr_realiad_stage2.py on this run first, or pass --seg_checkpoint")
    checkpoints.check_segmentation_owner(os.path.dirname(os.path.abspath(seg_path)), model, checkpoint, seg_path)
    segnet = checkpoints.load_segmentation_net(seg_path, model.encoder.cfg.embed_dim).to(run.device).eval()
    log.info(f"loaded {seg_path}")
    seed_everything(options.seed)
    mapper = AnomalyMapper(model, segnet, evaluation.fusion_alpha, evaluation.max_ratio, options.precision,
                           options.compile)
    evaluate(run, mapper, data, evaluation, recipe.image_size, recipe.crop_size)
    save_class_prototypes(run, mapper, data, recipe.image_size, recipe.crop_size, evaluation.batch_size)


JOBS = {"dinomaly": train_and_evaluate, "dinomaly2": train_and_evaluate, "crr_stage1": train_and_evaluate,
        "crr_stage2": crr_stage2, "crr_test": crr_test}
