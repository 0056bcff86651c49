"""Checkpoint and run files: reading weight files safely (tensors only), a publisher's encoder weights, our own and
the official reconstruction checkpoints (architecture from the keys and shapes), a run's saved recipe (its
config.json), a trained model with that recipe (load_trained), CRR's segmentation network and its owner."""
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import warnings

import torch

from . import recipes
from .errors import UserError, check_entries, choice, integer, kind, number
from .encoders import check_sizes
from .models import ENCODERS, GROUPINGS, EncoderConfig, SegmentationNet, ViTill, encoder_config, segmentation_net
from .recipes import Recipe

log = logging.getLogger("anomaly")
SEPARATE = "class-separated"  # config.json's "setting" of a run with one model per class (--per_class)
# What saved_settings checks in config.json's "model" entry, key by key (keys not listed are left alone; a run
# saved before a key existed lacks it, and the recipe of its method stands in).
SAVED_SETTINGS = {
    "method": choice(*recipes.METHODS).optional(),
    "encoder": kind(str, "an encoder name").optional(),
    "image_size": integer(14).optional(),
    "crop_size": integer(14).optional(),
    "mask_ratio": number(0, 1, hi_open=True).optional(),
    "test_mask": choice("on", "off").optional(),
    "attn_eps": number(0, 1).optional(),
    "dropout": number(0, 1, hi_open=True).or_null().optional(),
    "decoder_depth": integer(1).optional(),
    "taps": kind(list, "a list of 8 block indices").or_null().optional(),
    "lc": choice(*GROUPINGS).optional(),
    "cr": choice(0, 1).optional(),
    "la": choice(0, 1).optional(),
    "modality": choice(*recipes.MODALITIES).optional(),
}


def load_file(path: str, what: str):
    """torch.load(weights_only=True) with one-line errors for a missing, empty, damaged or non-PyTorch file, and
    for one holding Python objects other than tensors, which is refused unread: unpickling them can run code."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a file that is refused anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        objects = f" ({found.group(1)})" if found else ""
        raise UserError(f"cannot read {what} {path}: it holds Python objects{objects}, not only tensors; such files "
                        f"are refused because unpickling them can run code; pass a file of tensors") from None
    except Exception:
        with open(path, "rb") as f:
            head = f.read(2)
        reason = "it is empty" if not head else "it is truncated or damaged; copy or save it again" \
            if head == b"PK" else "it is not a PyTorch file"
        raise UserError(f"cannot read {what} {path}: {reason}") from None


# Keys under which publishers wrap a state dict: MAE, DeiT and BEiT {'model': ...}, iBOT and MoCo v3
# {'state_dict': ...}, DINO's training checkpoints {'teacher': ...}, DeepSpeed {'module': ...}.
WRAPPERS = ("model", "state_dict", "teacher", "module")


def read_state_dict(path: str, what: str) -> dict:
    """A state dict of tensors (unwrapped from WRAPPERS, `module.` prefixes removed) with one-line errors for any
    other file."""
    sd = load_file(path, what)
    if isinstance(sd, dict) and "iteration" in sd and "optimizer" in sd:
        raise UserError(f"{path} is a training state, not a {what}; continue its training with --resume, or pass "
                        f"the model the run saved beside it (model.pth, Seg_model_last.pth)")
    while isinstance(sd, dict) and (wrapper := [k for k in WRAPPERS if isinstance(sd.get(k), dict)]):
        sd = sd[wrapper[0]]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{what} {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_strict(module: torch.nn.Module, sd: dict, path: str, what: str):
    """load_state_dict(strict=True) with a readable one-line error."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise UserError(f"{what} {path} does not match the model: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=True)


def default_encoder_weights(name: str) -> str:
    return os.path.join("backbones", "weights", encoder_config(name).weight_file)


def read_encoder_weights(path: str, cfg: EncoderConfig) -> dict:
    """The publisher's weight file of an encoder, read and unwrapped (the backbone's keys only), checked before any
    model is built."""
    if not os.path.isfile(path):
        relative = "" if os.path.isabs(path) else f" ({path}, relative to the current folder)"
        raise UserError(f"encoder weight file not found: {os.path.abspath(path)}{relative}; download "
                        f"{cfg.weight_file} from {cfg.url} and put it there, or pass --encoder_weights PATH (or "
                        f"'random' for a smoke run)")
    sd = read_state_dict(path, "encoder weight file")
    if any(k.startswith("encoder.") for k in sd):
        raise UserError(f"{path} is a full reconstruction-model checkpoint, not an encoder's weight file; "
                        f"pass it as --checkpoint")
    if is_segmentation_state_dict(sd):
        raise UserError(f"{path} is a segmentation network (Seg_model_*.pth), not an encoder's weight file; "
                        f"pass it as --seg_checkpoint")
    for prefix in cfg.unwrap:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not any(re.match(pattern, k) for pattern in cfg.extra_keys)}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # every training step would be skipped as non-finite
        raise UserError(f"encoder weight file {path} holds NaN or infinite values ({len(bad)} "
                        f"tensor{'s' * (len(bad) != 1)}, e.g. {bad[0]}); it is damaged: download {cfg.weight_file} "
                        f"again from {cfg.url}")
    return sd


def load_encoder_weights(encoder: torch.nn.Module, path: str):
    """Load the publisher's weight file of `encoder` into it, strictly."""
    load_strict(encoder, read_encoder_weights(path, encoder.cfg), path, "encoder weight file")


def is_backbone_state_dict(sd: dict) -> bool:
    return "cls_token" in sd and not any(k.startswith("decoder.") for k in sd)


def is_segmentation_state_dict(sd: dict) -> bool:
    return "fin_out.0.weight" in sd


def bottleneck_kind(sd: dict) -> str | None:
    """"mlp" (Dinomaly, CRR) or "two_stage" (Dinomaly2) from a reconstruction checkpoint's keys; None if neither."""
    if "bottleneck.0.fc1.weight" in sd:
        return "mlp"
    if "bottleneck.0.0.weight" in sd and "bottleneck.1.3.weight" in sd:
        return "two_stage"
    return None


def layout(cfg: EncoderConfig) -> tuple:
    """What an encoder's state dict shows of it: family, width, depth, and what tells the family's variants apart:
    SwiGLU or not (DINOv3), the register count (DINOv2), the patch size (the others)."""
    detail = {"dinov3": cfg.swiglu, "dinov2": cfg.num_register_tokens}.get(cfg.family, cfg.patch_size)
    return cfg.family, cfg.embed_dim, cfg.depth, detail


def encoders_like(sd: dict) -> tuple[tuple, list[str]]:
    """(the layout (see layout) that the `encoder.*` keys and shapes of a state dict show, the registry's encoders
    of that layout)."""
    dim, depth = sd["encoder.cls_token"].shape[-1], 1 + max(int(k.split(".")[2]) for k in sd
                                                           if k.startswith("encoder.blocks."))
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    if "encoder.storage_tokens" in sd:
        found = "dinov3", dim, depth, "encoder.blocks.0.mlp.w1.weight" in sd
    elif "encoder.blocks.0.attn.relative_position_bias_table" in sd:
        found = "beit", dim, depth, patch
    elif "encoder.mask_token" in sd:
        registers = sd["encoder.register_tokens"].shape[1] if "encoder.register_tokens" in sd else 0
        found = "dinov2", dim, depth, registers
    else:
        found = "vit", dim, depth, patch
    return found, [n for n, c in ENCODERS.items() if layout(c) == found]


def weight_file_hint(sd: dict, encoder: str) -> str:
    """For an encoder weight file that does not fit `encoder`: which encoders it looks like, and the flags."""
    try:
        names = [n for n in encoders_like({f"encoder.{k}": v for k, v in sd.items()})[1] if n != encoder]
    except (KeyError, ValueError, IndexError):  # not a layout we know
        names = []
    looks = f"it looks like the weights of {' or '.join(names)} (pass --encoder {names[0]}), or " if names else ""
    return f"; {looks}pass the weight file of {encoder} as --encoder_weights"


def encoder_from_state_dict(sd: dict, path: str, encoder: str | None = None) -> str:
    """The encoder of a reconstruction checkpoint, from its `encoder.*` keys and shapes: DINOv3 (storage tokens;
    SwiGLU or not), BEiT (relative position bias), DINOv2 (mask token; registers or not) or a plain ViT (DINO,
    MAE, DeiT, iBOT, MoCo v3: patch size); width and depth from the shapes. Plain ViTs of one size, and BEiT and
    BEiT v2, share a layout: `encoder` (the run's config.json or --encoder) names which; without it an ambiguous
    file is a one-line error."""
    found, names = encoders_like(sd)
    if not names:
        raise UserError(f"{path}: no known encoder has this layout ({found[0]}, embed dim {found[1]}, {found[2]} "
                        f"blocks)")
    if encoder is not None:
        if encoder not in names:
            raise UserError(f"checkpoint {path} holds a {names[0] if len(names) == 1 else ' / '.join(names)} "
                            f"model, not {encoder}; fix --encoder or the checkpoint")
        return encoder
    if len(names) > 1:
        raise UserError(f"{path} fits several encoders ({', '.join(names)}) and has no config.json beside it; "
                        f"pass --encoder NAME")
    return names[0]


def architecture_from_state_dict(sd: dict, path: str, encoder: str | None = None) -> tuple[str, int, str]:
    """Encoder name, decoder depth and bottleneck kind of an official-layout reconstruction checkpoint, from its
    keys and shapes (`encoder`: the name the run recorded, when known; see encoder_from_state_dict)."""
    if is_backbone_state_dict(sd):
        raise UserError(f"{path} is a plain encoder weight file, not a trained model; pass it as "
                        f"--encoder_weights, or pass a trained model.pth as --checkpoint")
    if is_segmentation_state_dict(sd):
        raise UserError(f"{path} is a segmentation network (Seg_model_*.pth); pass it as --seg_checkpoint")
    kind = bottleneck_kind(sd)
    if kind is None or "encoder.cls_token" not in sd:
        raise UserError(f"{path} is not a Dinomaly, Dinomaly2 or CRR reconstruction checkpoint (no encoder.* / "
                        f"bottleneck.* keys)")
    name = encoder_from_state_dict(sd, path, encoder)
    decoder_depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder."))
    return name, decoder_depth, kind


def build_model(encoder: str, encoder_weights: str | None, **kwargs) -> ViTill:
    """A fresh ViTill: encoder from its publisher's file (None or 'random': random weights), trainable parts
    initialised."""
    cfg = encoder_config(encoder)
    sd = None if encoder_weights in (None, "random") else read_encoder_weights(encoder_weights, cfg)
    model = ViTill(cfg, **kwargs)
    if sd is not None:
        try:
            load_strict(model.encoder, sd, encoder_weights, "encoder weight file")
        except UserError as e:
            raise UserError(f"{e}{weight_file_hint(sd, encoder)}") from None
    return model


def load_model(path: str, encoder: str | None = None, sd: dict | None = None, **kwargs) -> ViTill:
    """A reconstruction model from a checkpoint (ours or official; `sd`: its state dict when already read). The
    architecture comes from `encoder` (e.g. read from config.json) or, without it, from the tensor shapes; the
    bottleneck from the keys."""
    sd = read_state_dict(path, "checkpoint") if sd is None else sd
    name, decoder_depth, kind = architecture_from_state_dict(sd, path, encoder)
    kwargs.update(decoder_depth=decoder_depth, bottleneck_kind=kind)
    model = ViTill(encoder_config(name), **kwargs)
    load_strict(model, sd, path, "checkpoint")
    return model


def model_options(recipe: Recipe) -> dict:
    """ViTill's keyword arguments for a recipe's architecture, but the encoder (build_model, load_model)."""
    return dict(dropout=recipe.dropout, decoder_depth=recipe.decoder_depth, bottleneck_kind=recipe.bottleneck,
                mask_ratio=recipe.mask_ratio, mask_in_eval=recipe.test_mask == "on", attn_eps=recipe.attn_eps,
                lc=recipe.lc, recenter=bool(recipe.cr), linear_attention=bool(recipe.la), taps=recipe.taps,
                modality=recipe.modality)


def checkpoint_file(path: str) -> str:
    """A run folder's model.pth, or the file itself; a one-line UserError when there is none."""
    if os.path.isdir(path):
        classes = class_models(path)
        if classes:
            first = next(iter(classes.values()))
            raise UserError(f"{path} holds one model per class ({', '.join(classes)}): pass one class's folder, "
                            f"e.g. {first}")
        path = os.path.join(path, "model.pth")
        if not os.path.isfile(path):
            raise UserError(f"no model.pth in the run folder {os.path.dirname(path)}; has its training finished? "
                            f"(--checkpoint takes a run folder that holds one, or the model.pth; without it the run "
                            f"folder is --save_dir/--save_name)")
    elif not os.path.isfile(path):
        relative = "" if os.path.isabs(path) else f" (relative to the current folder, {os.getcwd()})"
        raise UserError(f"checkpoint not found: {path}{relative}; pass a run folder or a model.pth as --checkpoint")
    return path


def class_models(path: str) -> dict[str, str] | None:
    """The classes of a run folder with one model per class (--per_class; config.json's setting SEPARATE) -> their
    folders, each a one-class run; None for any other path."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "model.pth")) or \
            saved_settings(os.path.join(path, "model.pth")).get("setting") != SEPARATE:
        return None
    folders = {c: os.path.join(path, c) for c in sorted(os.listdir(path))
               if os.path.isfile(os.path.join(path, c, "model.pth"))}
    if not folders:
        raise UserError(f"{path} is a run with one model per class, but none of its class folders holds a model.pth "
                        f"yet; has its training started? (continue it with --resume)")
    return folders


def segmentation_file(run_dir: str) -> str | None:
    """A CRR run folder's segmentation network: Seg_model_7999.pth (the full Stage II), else Seg_model_last.pth
    (a shorter one); None when there is neither."""
    found = [p for p in (os.path.join(run_dir, f"Seg_model_{n}.pth") for n in ("7999", "last")) if os.path.isfile(p)]
    return found[0] if found else None


# Where a model's settings are: its training run's config.json, else the config of an evaluation of the model in
# its own folder (an official model.pth evaluated there: the sizes its thresholds were made at).
SETTINGS_FILES = ("config.json", "config_eval.json", "config_test.json")
# Files that show a folder is a run (ours), whose settings file must then be there.
RUN_FILES = ("thresholds.json", "train_state.pth", "scores.csv", "metrics.csv", "class_prototypes.pt")


def settings_file(checkpoint: str) -> str | None:
    """The settings file beside a checkpoint (SETTINGS_FILES), None without one (an official file)."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    found = [p for p in (os.path.join(folder, n) for n in SETTINGS_FILES) if os.path.isfile(p)]
    return found[0] if found else None


def check_settings_file(checkpoint: str, given: dict, recipe: Recipe):
    """A run folder (RUN_FILES) whose settings file is gone is refused unless the sizes are given: rebuilt at
    its method's default sizes, the model would be decided with thresholds made at the run's own sizes."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    found = [n for n in RUN_FILES if os.path.exists(os.path.join(folder, n))]
    if settings_file(checkpoint) is not None or not found:
        return
    if "image_size" in given and "crop_size" in given:
        log.warning(f"warning: {folder} has no config.json: the model is rebuilt with the sizes given and the "
                    f"{recipe.method} recipe's other settings")
        return
    raise UserError(f"{folder} holds a run ({', '.join(found)}) but no config.json, where its settings are (image "
                    f"and crop size, encoder, ...): without it the model would be rebuilt at {recipe.method}'s "
                    f"default {recipe.image_size} -> {recipe.crop_size} px, which may not be the run's; copy the "
                    f"run's config.json back, or give the sizes it was trained at (--image_size and --crop_size; "
                    f"Python: image_size=..., crop_size=...)")


def saved_entries(checkpoint: str) -> tuple[dict, dict]:
    """The "model" entry (checked, SAVED_SETTINGS) and the "training" entry of the settings file beside the
    checkpoint (settings_file), read once; ({}, {}) without one (an official file)."""
    path = settings_file(checkpoint)
    if path is None:
        return {}, {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the run's settings {path} ({e}); fix or remove that file") from None
    if not isinstance(config, dict):
        raise UserError(f"cannot read the run's settings {path} (not a JSON object); fix or remove that file")
    settings, training = config.get("model", {}), config.get("training", {})
    if not isinstance(settings, dict):
        raise UserError(f"{path}: its \"model\" entry is not a mapping; fix or remove that file")
    check_entries(settings, SAVED_SETTINGS, f"the run's settings {path} (\"model\" entry)",
                  "fix or remove that file, or train the model again")
    return settings, training if isinstance(training, dict) else {}


def saved_settings(checkpoint: str) -> dict:
    """The settings a model was trained with (encoder, image_size, crop_size, mask_ratio, test_mask, attn_eps,
    ...): the "model" section of the config.json beside the checkpoint; {} without one (an official file)."""
    return saved_entries(checkpoint)[0]


def saved_recipe(checkpoint: str, method: str) -> tuple[Recipe, set[str]]:
    """The recipe a model was trained with, and the fields its run recorded: its config.json's "model" and
    "training" entries over the recipe of its method (recipes.PAPER; `method` for a checkpoint without a
    config.json, an official file, or a run saved before the entry existed; Dinomaly2's for such a checkpoint
    with Dinomaly2's bottleneck). The encoder is the saved one, else "" (found from the checkpoint's shapes)."""
    saved, training = saved_entries(checkpoint)
    base = recipes.PAPER[saved.get("method", method)]
    names = {f.name for f in dataclasses.fields(Recipe)}
    values = {k: v for k, v in {**training, **saved}.items() if k in names and v is not None}
    for key in ("betas", "taps"):  # JSON lists
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return base.replace(**dict(dict(encoder=""), **values)), set(saved) | set(training)


def followed(saved: Recipe, given: dict, known: set[str]) -> Recipe:
    """The saved recipe with what the command line gave (`given`: recipe fields); an override of a value the run
    recorded (`known`: the fields it recorded) is logged."""
    for key, value in given.items():
        if key in known and value != getattr(saved, key):
            log.info(f"--{key} {value} given; the model was trained with {getattr(saved, key)}")
    return saved.replace(**given)


def load_trained(path: str, given: dict, method: str, modality: str | None = None) -> tuple[ViTill, Recipe]:
    """A trained reconstruction model (a run folder or a model.pth) in eval mode, and the recipe it is built with:
    its run's (method, encoder, image and crop size, mask ratio, test masking, attention epsilon, Dinomaly2's
    lc/cr/la, ...), with the recipe fields given on the command line (`given`) overriding them. A checkpoint
    without a config.json gets the recipe of `method`, or Dinomaly2's when its bottleneck is Dinomaly2's.
    `modality` (a script's: what its inputs are): the model's when the run did not record one (an official file,
    e.g. the preview's DinomalyRGBD model.pth); a run recorded with another is refused."""
    path = checkpoint_file(path)
    sd = read_state_dict(path, "checkpoint")
    kind = bottleneck_kind(sd)
    saved, recorded = saved_recipe(path, "dinomaly2" if kind == "two_stage" else method)
    check_settings_file(path, given, saved)
    if modality is not None and "modality" not in recorded:
        saved = saved.replace(modality=modality)
    elif modality is not None and saved.modality != modality:
        raise UserError(f"{path} is a model of {saved.modality} inputs ({recipes.MODALITIES[saved.modality]}), but "
                        f"this script's are {modality} ({recipes.MODALITIES[modality]}); use the script it was trained "
                        f"with")
    r = followed(saved, given, recorded)
    if kind not in (None, recipes.PAPER[r.method].bottleneck):
        raise UserError(f"checkpoint {path} has a {kind} bottleneck, but its run says method "
                        f"{r.method}; fix the run's config.json or pass the right checkpoint")
    name, decoder_depth, kind = architecture_from_state_dict(sd, path, r.encoder or None)
    r = r.replace(encoder=name, decoder_depth=decoder_depth, bottleneck=kind)
    model = ViTill(encoder_config(name), **model_options(r))
    load_strict(model, sd, path, "checkpoint")
    source = settings_file(path)
    origin = {k: f"the run's settings {source}" if k in recorded else f"{r.method}'s recipe"
              for k in ("image_size", "crop_size") if k not in given}
    check_sizes(r.image_size, r.crop_size, model.encoder.cfg.patch_size, model.encoder.cfg.fixed_grid, origin)
    options = f", mask ratio {r.mask_ratio}, test masking {r.test_mask}" if r.method == "crr" else \
        f", lc {r.lc}, cr {r.cr}, la {r.la}" if r.method == "dinomaly2" else ""
    log.info(f"loaded {path} ({r.method}: {model.encoder.cfg.embed_dim}-d encoder, {len(model.decoder)} decoder "
             f"blocks; {r.image_size} -> {r.crop_size} px, attention epsilon {r.attn_eps}{options})")
    return model.eval(), r


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights (names, shapes and 1,024 evenly spaced values of each tensor): two
    trainings give two fingerprints. Stage II records its reconstruction model's in config_stage2.json."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_segmentation_owner(folder: str, model: ViTill, model_path: str, what: str):
    """Refuse a segmentation network (`what`, in `folder`) that Stage II trained on another reconstruction
    model than `model`, as recorded in the folder's config_stage2.json; one without a record (released
    weights, a run of an older version) is taken as it is."""
    path = os.path.join(folder, "config_stage2.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f).get("stage1_model")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"cannot read {path} ({e}); fix or remove that file") from None
    if recorded is not None and recorded != fingerprint(model):
        raise UserError(f"{what} was trained on another reconstruction model than {model_path} (Stage I was "
                        f"trained again since, or the files come from different runs); train Stage II again "
                        f"(crr_realiad_stage2.py --overwrite), or pass the matching --seg_checkpoint")


def load_segmentation_net(path: str, embed_dim: int) -> SegmentationNet:
    sd = read_state_dict(path, "segmentation checkpoint")
    if not is_segmentation_state_dict(sd):
        kind = "a reconstruction model; pass it as --checkpoint" if "bottleneck.0.fc1.weight" in sd else \
            "an encoder's weight file" if is_backbone_state_dict(sd) else "not a segmentation network"
        raise UserError(f"{path} is {kind}; --seg_checkpoint takes a Stage-II Seg_model_*.pth")
    net = segmentation_net(embed_dim)
    load_strict(net, sd, path, "segmentation checkpoint")
    return net


