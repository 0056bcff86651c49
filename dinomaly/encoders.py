"""The encoders `--encoder` accepts, a registry of data importable without PyTorch (so that the command line
checks --encoder at once): each one's configuration (architecture, taps, prefix tokens, patch size, the
publisher's weight file and address). models/encoder.py builds the network of an entry.

Taps, as the references do it: 12-block models (S, S+, B) tap blocks 2..9, 24-block models (L) blocks 4, 6, ..,
18 (the Dinomaly reference and the Dinomaly2 preview, by model size); the 32-block DINOv3 H+, for which no
reference exists, taps blocks 5, 8, .., 26 (L's span stretched to 32 blocks: 8 taps 3 apart from about 1/6 of the
depth to about 4/5). The first 4 taps form one group, the last 4 the other.
"""
from dataclasses import dataclass

from .errors import UserError

DEFAULT_ENCODER = "dinov2reg_vit_base_14"  # the references' default
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderConfig:
    embed_dim: int
    num_heads: int
    depth: int
    taps: tuple[int, ...]  # 0-based indices of the blocks whose outputs feed the decoder
    weight_file: str  # the publisher's file name; the default path is backbones/weights/<weight_file>
    patch_size: int = 14
    num_register_tokens: int = 4  # register (DINOv2-R) or storage (DINOv3) tokens after CLS
    pretrain_grid: int = 37  # side of the patch grid a learned position embedding was trained for (518 px / 14)
    family: str = "dinov2"  # "dinov2" (LayerScale, mask token), "vit" (DINO, MAE, DeiT, iBOT, MoCo v3), "dinov3",
    # "beit" (BEiT, BEiT v2)
    url: str = ""  # where the publisher distributes weight_file
    swiglu: bool = False  # DINOv3 S+ and H+: SwiGLU feed-forward
    unwrap: tuple[str, ...] = ()  # the publisher's wrapping: prefixes stripped from the backbone's keys
    extra_keys: tuple[str, ...] = ()  # regular expressions matching the publisher's non-backbone keys (heads)
    fixed_grid: int | None = None  # the only patch-grid side the encoder takes (BEiT: its relative position bias)
    # The normalisation the encoder was trained with. The data pipeline normalises with ImageNet's mean and std
    # for every encoder, as the Dinomaly reference does; recorded here, not applied.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


SMALL_TAPS = (2, 3, 4, 5, 6, 7, 8, 9)
LARGE_TAPS = (4, 6, 8, 10, 12, 14, 16, 18)
HUGE_TAPS = (5, 8, 11, 14, 17, 20, 23, 26)
SIZES = {"small": (384, 6, 12, SMALL_TAPS), "base": (768, 12, 12, SMALL_TAPS), "large": (1024, 16, 24, LARGE_TAPS)}
ABBREVIATIONS = {"small": "s", "base": "b", "large": "l"}
HEAD = (r"head\.",)  # classification or projection head


def dinov2(size: str, registers: bool) -> EncoderConfig:
    stem = f"dinov2_vit{ABBREVIATIONS[size]}14"
    file = f"{stem}_reg4_pretrain.pth" if registers else f"{stem}_pretrain.pth"
    d, heads, depth, taps = SIZES[size]
    return EncoderConfig(d, heads, depth, taps, file, num_register_tokens=4 if registers else 0,
                         url=f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}")


DINOV3_HASHES = {"s": "08c60483", "splus": "4057cbaa", "b": "73cec8be", "l": "8aa4cbdd", "hplus": "7c1da9a5"}


def dinov3(arch: str, d: int, heads: int, depth: int, taps: tuple[int, ...], swiglu: bool = False) -> EncoderConfig:
    stem = "dinov3_vit" + arch.replace("plus", "16plus") if "plus" in arch else f"dinov3_vit{arch}16"
    file = f"{stem}_pretrain_lvd1689m-{DINOV3_HASHES[arch]}.pth"
    return EncoderConfig(d, heads, depth, taps, file, patch_size=16, family="dinov3", swiglu=swiglu,
                         url=f"https://dl.fbaipublicfiles.com/dinov3/{stem}/{file}")


def vit(size: str, patch: int, file: str, url: str, heads: int | None = None, **kwargs) -> EncoderConfig:
    """DINO, MAE, DeiT, iBOT, MoCo v3: a plain ViT trained at 224 px (no registers, no LayerScale)."""
    d, default_heads, depth, taps = SIZES[size]
    return EncoderConfig(d, heads or default_heads, depth, taps, file, patch_size=patch, num_register_tokens=0,
                         pretrain_grid=224 // patch, family="vit", url=url, **kwargs)


def dino(size: str, patch: int) -> EncoderConfig:
    stem = f"dino_deitsmall{patch}_pretrain" if size == "small" else f"dino_vitbase{patch}_pretrain"
    return vit(size, patch, f"{stem}.pth", f"https://dl.fbaipublicfiles.com/dino/{stem}/{stem}.pth")


def ibot(size: str) -> EncoderConfig:
    # every size is published as checkpoint_teacher.pth: saved here under a name of its own
    folder = f"vit{ABBREVIATIONS[size]}_16_rand_mask"
    return vit(size, 16, f"ibot_{folder}_checkpoint_teacher.pth",
               f"https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{folder}/"
               f"checkpoint_teacher.pth", unwrap=("backbone.",), extra_keys=HEAD + (r"masked_embed$",))


def beit(version: str) -> EncoderConfig:
    """BEiT / BEiT v2 ViT-B/16 fine-tuned on ImageNet-22k: the files the reference loads (its only size). BEiT was
    trained with mean = std = 0.5, BEiT v2 with ImageNet's."""
    stem = "beit_base_patch16_224_pt22k_ft22k" if version == "v1" else "beitv2_base_patch16_224_pt1k_ft21k"
    release = "v1.0" if version == "v1" else "BEiT-v2"
    half = (0.5, 0.5, 0.5)
    d, heads, depth, taps = SIZES["base"]
    return EncoderConfig(d, heads, depth, taps, f"{stem}.pth", patch_size=16, num_register_tokens=0,
                         pretrain_grid=14, family="beit", fixed_grid=14,
                         url=f"https://github.com/addf400/files/releases/download/{release}/{stem}.pth",
                         extra_keys=HEAD + (r".*\.relative_position_index$",),
                         mean=half if version == "v1" else IMAGENET_MEAN, std=half if version == "v1" else IMAGENET_STD)


ENCODERS = {
    **{f"dinov2reg_vit_{s}_14": dinov2(s, registers=True) for s in SIZES},
    **{f"dinov2_vit_{s}_14": dinov2(s, registers=False) for s in SIZES},
    "dinov3_vit_small_16": dinov3("s", 384, 6, 12, SMALL_TAPS),
    "dinov3_vit_small_plus_16": dinov3("splus", 384, 6, 12, SMALL_TAPS, swiglu=True),
    "dinov3_vit_base_16": dinov3("b", 768, 12, 12, SMALL_TAPS),
    "dinov3_vit_large_16": dinov3("l", 1024, 16, 24, LARGE_TAPS),
    "dinov3_vit_huge_plus_16": dinov3("hplus", 1280, 20, 32, HUGE_TAPS, swiglu=True),
    **{f"dino_vit_{s}_{p}": dino(s, p) for s in ("small", "base") for p in (8, 16)},
    **{f"ibot_vit_{s}_16": ibot(s) for s in SIZES},
    **{f"mae_vit_{s}_16": vit(s, 16, f"mae_pretrain_vit_{s}.pth",
                              f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{s}.pth")
       for s in ("base", "large")},
    "deit_vit_small_16": vit("small", 16, "deit_small_patch16_224-cd65a155.pth",
                             "https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
                             extra_keys=HEAD),
    "deit_vit_base_16": vit("base", 16, "deit_base_patch16_224-b5f2ef4d.pth",
                            "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
                            extra_keys=HEAD),
    # MoCo v3's ViT-S has 12 heads (its vits.py); its file holds both encoders and the predictor
    **{f"moco_vit_{s}_16": vit(s, 16, f"vit-{s[0]}-300ep.pth.tar",
                               f"https://dl.fbaipublicfiles.com/moco-v3/vit-{s[0]}-300ep/vit-{s[0]}-300ep.pth.tar",
                               heads=12, unwrap=("base_encoder.",), extra_keys=HEAD)
       for s in ("small", "base")},
    "beit_vit_base_16": beit("v1"),
    "beitv2_vit_base_16": beit("v2"),
}


def check_sizes(image_size: int, crop_size: int, patch_size: int, grid: int | None = None,
                origin: dict[str, str] | None = None):
    """The crop must be a whole number of the encoder's patches (`grid` of them a side, for an encoder that takes
    one grid only) and fit in the resized image. `origin`: where a size not given as a flag comes from (field ->
    e.g. "the run's settings <path>"), which the message names instead of the flag."""
    origin = origin or {}

    def named(field: str, value: int) -> str:
        return f"{field} {value} (from {origin[field]})" if field in origin else f"--{field} {value}"

    if grid is not None and crop_size != grid * patch_size:
        raise UserError(f"{named('crop_size', crop_size)}: this encoder takes {grid * patch_size}-px crops only "
                        f"({grid} x {grid} patches of {patch_size}); use --crop_size {grid * patch_size}")
    if crop_size % patch_size:
        low = crop_size // patch_size * patch_size
        nearest = " or ".join(str(c) for c in (low, low + patch_size) if c > 0)
        raise UserError(f"{named('crop_size', crop_size)} is not a multiple of the encoder's patch size "
                        f"{patch_size}; use {nearest} (with a --image_size at least that large)")
    if crop_size > image_size:
        raise UserError(f"{named('crop_size', crop_size)} is larger than {named('image_size', image_size)}")
