"""The training sets of a run, from its samples (samples.py) and recipe: the plain images (dataset.TrainDataset),
K shots per class with strong augmentation (fewshot.py), a view of each MANTA-Tiny image, or CRR's images with
synthetic anomalies (synthesis.py); and the image caches of --cache_images (image_cache.py)."""
from . import dataset as ds
from . import fewshot, samples
from .errors import UserError
from .image_cache import build_cache
from .options import DataOptions
from .recipes import Recipe
from .run import Run, log


def train_dataset(run: Run, data: DataOptions, recipe: Recipe):
    """The reconstruction model's training images, through the image cache of --cache_images: all of them
    (ds.TrainDataset), or with the recipe's shot K, K per class with Dinomaly2's strong augmentation (fewshot.py);
    the chosen files are logged and listed in the run folder's shots.txt. MANTA-Tiny: a view of each image
    (ds.StripTrainDataset)."""
    seed, size, crop, shot = run.options.seed, recipe.image_size, recipe.crop_size, recipe.shot
    train = samples.train_samples(data, seed)
    if data.dataset == "manta":  # a random view strip of each image (not cached)
        if shot is not None:
            raise UserError("--shot is for image datasets; MANTA-Tiny's images hold five views")
        return ds.StripTrainDataset(train, size, crop, seed)
    if shot is None:
        return ds.TrainDataset(train, size, crop, image_cache(data, train, size))
    if train[0].pair_kind is not None:
        raise UserError("--shot is for image datasets: the strong augmentation of few-shot training is not defined "
                        "for pairs of modalities")
    train = fewshot.select_shots(train, shot, seed)
    log.info(f"{shot}-shot training set ({len(train)} images): " + ", ".join(s.image_path for s in train))
    if run.is_main:
        with open(run.path(fewshot.SHOTS_FILE), "w") as f:
            f.writelines(f"{s.class_name}\t{s.image_path}\n" for s in train)
    return fewshot.AugmentedDataset(train, size, crop, seed, image_cache(data, train, size))


def image_cache(data: DataOptions, some: list[ds.Sample], image_size: int, modes=("memory", "disk")):
    """The --cache_images cache of these samples' images (both of a pair: modalities.pair_reader) when its mode is
    one of `modes` (test images are read once per run: only a disk cache, kept for later runs, gains), else
    None."""
    paths = [s.image_path for s in some if s.strip is None]  # MANTA's view strips are cut from the file each time
    kind = some[0].pair_kind if some else None
    mode = data.cache_images
    if kind is None:
        return build_cache(mode, paths, image_size, data.cache_dir) if mode in modes and paths else None
    from . import modalities
    raw = [s.pair_path for s in some if kind == modalities.DEPTH and modalities.is_point_cloud(s.pair_path)]
    if raw and mode == "none":
        log.warning(f"warning: {len(raw)} samples have no prepared depth (z/ files), e.g. {raw[0]}: their point "
                    f"clouds are prepared on the fly each time they are read; run prepare_data/prepare_mvtec3d.py "
                    f"once, or pass --cache_images memory (or disk, kept for later runs)")
    return build_cache(mode, paths + [s.pair_path for s in some], image_size, data.cache_dir,
                       modalities.pair_reader(kind)) if mode in modes else None


def synthetic_train_set(data: DataOptions, seed: int, image_size: int, crop_size: int):
    """CRR's training images, each with a synthetic anomaly: textures from --anomaly_source_path (DTD), object
    masks from --foreground_path or, for Real-IAD, from where the released code looks for them; images, masks and
    textures kept decoded with --cache_images."""
    from .synthesis import SyntheticAnomalyDataset, list_textures, synthesis_caches
    if data.dataset == "manta":
        raise UserError("CRR's anomaly synthesis works on whole images, not on MANTA-Tiny's five-view images; "
                        "train CRR on another --dataset")
    textures = list_textures(data.anomaly_source_path)
    train = samples.train_samples(data, seed)
    if data.dataset == "realiad" or data.foreground_path:
        found = ds.attach_foreground(train, data.foreground_path)
        log.info(f"foreground masks found for {found} of {len(train)} training images")
    log.info(f"texture images for anomaly synthesis: {len(textures or [])}")
    caches = synthesis_caches(data.cache_images, train, textures, image_size, data.cache_dir)
    return SyntheticAnomalyDataset(train, image_size, crop_size, textures, seed, caches)
