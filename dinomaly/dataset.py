"""Dataset readers, the dataset registry and the input transform.

Every reader turns a dataset folder into a list of `Sample`s; `TrainDataset` and `TestDataset` turn samples
into tensors with the R448-C392 transform.

Readers:
- `mvtec_samples(root, class_name, phase)`: any MVTec-layout folder (MVTec AD, prepared VisA 1cls, MPDD,
  BTAD, user data).
- `realiad_samples(root, class_name, phase, resolution, json_dir, multiview)`: Real-IAD and Real-IAD Variety
  through their split JSON files; with `multiview`, test views grouped into objects as the Dinomaly2 preview does.
- `manta_samples(root, class_name, phase)`: MANTA-Tiny, MVTec layout, each image five views side by side.
- `attach_foreground(samples, foreground_root)`: CRR's object masks, where the released code looks for them.
"""
import json
import logging
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import UserError, one_line
from .image_files import IMAGE_EXTENSIONS
from .image_files import entries as _entries
from .image_files import list_images as _list_images
from .image_files import list_subdirs as _list_subdirs
from .images import IMAGENET_MEAN, IMAGENET_STD, center_crop_box, load_image, normalised_crop, open_file, resize

MVTEC_CLASSES = [
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill",
    "screw", "toothbrush", "transistor", "zipper",
]
VISA_CLASSES = [
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
]
REALIAD_CLASSES = [
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "usb",
    "usb_adaptor", "u_block", "vcpill", "wooden_beads", "woodstick", "zipper",
]

MPDD_CLASSES = ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"]
BTAD_CLASSES = ["01", "02", "03"]
MIAD_CLASSES = ["catenary_dropper", "electrical_insulator", "metal_welding", "nut_and_bolt", "photovoltaic_module",
                "wind_turbine", "witness_mark"]
UNIMEDICAL_CLASSES = ["BraTS2021", "LIVER", "RESC"]
MVTEC3D_CLASSES = ["cable_gland", "bagel", "peach", "carrot", "dowel", "foam", "cookie", "rope", "potato", "tire"]
MULSEN_CLASSES = ["capsule", "cotton", "cube", "spring_pad", "screw", "screen", "piggy", "nut", "flat_pad",
                  "plastic_cylinder", "zipper", "button_cell", "toothbrush", "solar_panel", "light"]

# The 160 classes of Real-IAD Variety: the sorted names of its split files (the preview lists
# <data_path>/realiadvariety_jsons/*.json), spelling and all.
REALIAD_VARIETY_CLASSES = [
    "2pin_block_plug", "3_adapter", "3pin_aviation_connector", "4_wire_stepping_motor", "D-sub-connector",
    "DVD_switch", "LED_indicator", "PLCC_socket", "VR_joystick", "access_card", "accurate_detection_switch",
    "aircraft_model_head", "angled_toggle_switch", "audio_jack_socket", "bag_buckle", "ball_pin",
    "balun_transformer", "battery", "battery_holder_connector", "battery_socket_connector", "bend_connector",
    "blade_switch", "blue_light_switch", "bluetooth_module", "boost_converter_module", "bread_model",
    "brooch_clasp_accessory", "button_battery_holder", "button_motor", "button_switch", "car_door_lock_switch",
    "ceramic_fuse", "ceramic_wave_filter", "charging_port", "chip-inductor", "circuit_breaker",
    "circular_aviation_connector", "common-mode-choke", "common-mode-filter", "connector",
    "connector_housing-female", "console_switch", "crimp_st_cable_mount_box", "dc_jack", "dc_power_connector",
    "detection_switch", "duckbill_circuit_breaker", "earphone_audio_unit", "effect_transistor",
    "electronic_watch_movement", "ethernet-connector", "ferrite_bead", "ffc_connector_plug", "flow_control_valve",
    "flower_copper_shape", "flower_velvet_fabric", "fork-crimp-terminal", "fuse_cover", "fuse_holder", "gear",
    "gear_motor", "green-ring-filter", "hairdryer_switch", "hall_effect_sensor", "headphone_jack-female",
    "headphone_jack_socket", "hex_plug", "humidity_sensor", "ingot_buckle", "insect_metal_parts",
    "inverter_connector", "jam_jar_model", "joystick_switch", "kfc_push-key_switch", "knob-cap", "laser_diode",
    "lattice_block_plug", "lego-pin-connector-plate", "lego-propeller", "lego-reel", "lego-technical-gear",
    "lego-turbine", "lighting_connector", "lilypad_led", "limit-switch", "lithium_battery_plug", "littel-fuse",
    "little_cow_model", "lock", "long-zipper", "meteor_hammer_arrowhead", "miniature_laser_module",
    "miniature_lifting_motor", "miniature_motor", "miniature_stepper_motor", "mobile_charging_connector",
    "model_steering_module", "monitor_socket", "motor_bracket", "motor_gear_reducer", "motor_plug", "mouse_socket",
    "multi_function_switch", "nylon_ball_head", "optical_fiber_outlet", "pencil_sharpener", "pinboard_connector",
    "pitch_connector", "pneumatic_elbow", "pot_core", "potentiometer", "power_bank_module", "power_inductor",
    "power_jack", "power_strip_socket", "pulse_transformer", "purple-clay-pot", "push_button_switch",
    "push_in_terminal", "recorder_switch", "rectangular-connector-accessories", "red_terminal", "retaining_ring",
    "rheostat", "rotary_position_sensor", "round_twist_switch", "self-lock_switch", "shelf_support_module",
    "side_press_switch", "side_release_buckle", "silicon_cell_sensor", "sim_card_reader",
    "single-pole_potentiometer", "single_switch", "slide_switch", "slipper- model", "small_leaf",
    "smd_receiver_module", "solderless_adapter", "spherical_airstone", "spring_antenna", "square_terminal",
    "steering_T-head", "steering_wheel", "suction-cup", "telephone_spring_switch", "tension_snap_release_clip",
    "thumbtack", "thyristor", "toy-tire", "traceless_hair_clip", "travel_switch", "travel_switch_green",
    "tubular_key_switch", "vacuum_switch", "vehicle_harness_conductor", "vertical-adjustable-resistor",
    "vibration_motor", "volume_potentiometer", "wireless_receiver_module",
]
MANTA_CLASSES = [  # <domain>/<class>, the preview's list
    "agriculture/maize", "agriculture/paddy", "agriculture/soybean", "agriculture/wheat",
    "electronics/block_inductor", "electronics/copper_standoff", "electronics/flat_nut", "electronics/led",
    "electronics/led_pad", "electronics/long_button", "electronics/power_inductor", "electronics/short_button",
    "electronics/thin_resistor", "electronics/type_c", "electronics/wafer_resistor",
    "groceries/coffee_beans", "groceries/goji_berries", "groceries/pistachios",
    "mechanics/button", "mechanics/gear", "mechanics/nut", "mechanics/nut_cap", "mechanics/red_washer",
    "mechanics/round_button_cap", "mechanics/screw", "mechanics/square_button_cap", "mechanics/terminal",
    "mechanics/wire_cap", "mechanics/yellow_green_washer",
    "medicine/capsule", "medicine/coated_tablet", "medicine/embossed_tablet", "medicine/lettered_tablet",
    "medicine/oblong_tablet", "medicine/pink_tablet", "medicine/red_tablet", "medicine/white_tablet",
    "medicine/yellow_tablet",
]

# name -> standard classes; realiad and realiad_variety are read through their split JSONs, the others in the
# MVTec layout (manta with five views in each image)
DATASETS = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "realiad": REALIAD_CLASSES, "mpdd": MPDD_CLASSES,
            "btad": BTAD_CLASSES, "miad": MIAD_CLASSES, "unimedical": UNIMEDICAL_CLASSES,
            "realiad_variety": REALIAD_VARIETY_CLASSES, "manta": MANTA_CLASSES, "mvtec3d": MVTEC3D_CLASSES,
            "mulsen": MULSEN_CLASSES}
# Datasets read through Real-IAD's split files: (image folders, the first one present being the default; split
# folder). Real-IAD Variety: the README's downsampled realiadvariety_1024 when it is there (the preview reads
# realiadvariety_raw, which its README tells to downsample to realiadvariety_1024), else realiadvariety_raw.
REALIAD_FOLDERS = {"realiad": (("realiad_1024",), "realiad_jsons"),
                   "realiad_variety": (("realiadvariety_1024", "realiadvariety_raw"), "realiadvariety_jsons")}
# datasets of pairs -> the modality of the model that reads them (recipes.MODALITIES; every other dataset: "rgb")
PAIR_DATASETS = {"mvtec3d": "rgbd", "mulsen": "rgbir"}
MANTA_VIEWS, MANTA_VIEW_WIDTH = 5, 256  # a MANTA image: 5 views side by side, 256 px each, the last the remainder

# Image and mask files are recognised by extension, case-insensitively; the order is the mask search order.
# Folder names that hold normal images (MVTec, VisA 1cls, MPDD: "good"; BTAD as distributed: "ok").
NORMAL_DIR_NAMES = ("good", "ok")


@dataclass
class Sample:
    image_path: str
    label: int  # 0 normal, 1 anomalous
    mask_path: str | None  # None: no pixel ground truth (always None for normal images)
    class_name: str
    foreground_path: str | None = None  # CRR: optional object mask
    rel_path: str = ""  # the image path relative to its class folder, '/'-separated (used for foreground masks)
    object_id: str | None = None  # multi-view evaluation: the object this view shows (None: not grouped)
    strip: int | None = None  # MANTA: which view strip of the image this sample is (None: the whole image)
    pair_path: str | None = None  # two modalities (modalities.py): the second one's file (depth or infrared)
    pair_kind: str | None = None  # what pair_path is: "depth" or "infrared" (None: an RGB image alone)
    pair_mask_path: str | None = None  # RGB + infrared: the infrared image's mask (mask_path: the RGB image's)
    modal_labels: tuple[int, ...] | None = None  # MulSen-AD: the RGB, infrared and point-cloud labels


def load_mask(path: str) -> Image.Image:
    """Open a mask with its grey values kept: masks are resized first and binarised after (by the evaluation's
    threshold), as the reference transforms resize the mask file as it is.

    Bilevel ("1") and 8-bit grey ("L") masks are returned unchanged; PIL resizes mode "1" with nearest
    neighbour, as torchvision does. Any other mode becomes 8-bit grey: the maximum over the channels of its
    load_image RGB version (alpha is not part of a mask; 16-bit values are scaled to 8 bits).
    """
    m = open_file(path, "mask", "the dataset's ground-truth folder")
    if m.mode in ("1", "L"):
        return m
    return Image.fromarray(np.asarray(load_image(path)).max(axis=2))


def image_to_tensor(img: Image.Image, crop_size: int) -> torch.Tensor:
    """Resized RGB image -> centre crop -> [3, crop, crop] float, ImageNet-normalised (images.normalised_crop)."""
    return torch.from_numpy(normalised_crop(img, crop_size))


def mask_to_tensor(mask: Image.Image, crop_size: int) -> torch.Tensor:
    """Resized mask (grey "L" or bilevel "1") -> centre crop -> [1, crop, crop] float in [0, 1], not binarised:
    grey / 255, bilevel 0 or 1 (as torchvision's ToTensor)."""
    mask = mask.crop(center_crop_box(mask.size[0], crop_size))
    arr = np.asarray(mask, dtype=np.float32)
    if mask.mode != "1":
        arr = arr / 255.0
    return torch.from_numpy(arr)[None]


def load_tensor(path: str, image_size: int, crop_size: int, cache=None) -> torch.Tensor:
    """The input transform: image file -> RGB -> resize -> centre crop -> normalised [3, crop, crop]. With an
    `image_cache.ImageCache` of that image size, the resized pixels come from the cache (bit-identical)."""
    if cache is None:
        return transform(load_image(path), image_size, crop_size)
    return image_to_tensor(Image.fromarray(cache.get(path)), crop_size)


def sample_tensor(s: Sample, image_size: int, crop_size: int, cache=None) -> torch.Tensor:
    """A sample's input: [3, crop, crop] for an image, [6, crop, crop] for a pair of modalities (modalities.py)."""
    if s.pair_kind is None:
        return load_tensor(s.image_path, image_size, crop_size, cache)
    return torch.from_numpy(modalities().pair_crops(s, image_size, crop_size, cache))


def modalities():
    """modalities.py (which imports this module)."""
    from . import modalities as m
    return m


def transform(img: Image.Image, image_size: int, crop_size: int) -> torch.Tensor:
    """The input transform of an RGB image: resize -> centre crop -> normalised [3, crop, crop]."""
    return image_to_tensor(resize(img, image_size), crop_size)


class TrainDataset(Dataset):
    """Normal training images -> normalised tensors [3, crop, crop]; `cache`: an optional ImageCache."""

    def __init__(self, samples: list[Sample], image_size: int = 448, crop_size: int = 392, cache=None):
        self.samples, self.image_size, self.crop_size, self.cache = samples, image_size, crop_size, cache

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return sample_tensor(self.samples[i], self.image_size, self.crop_size, self.cache)


class TestDataset(Dataset):
    """Test images -> (image [3,c,c], mask [1,c,c] in [0,1], label, has_mask, image_path); a pair of modalities:
image [6,c,c], and for RGB + infrared masks [2,c,c] (each image's).

    `has_mask` is False for an anomalous image without pixel ground truth; such images count for the image
    metrics only. Normal images always have an all-zero mask. `cache`: an optional ImageCache for the images.
    """

    def __init__(self, samples: list[Sample], image_size: int = 448, crop_size: int = 392, cache=None):
        self.samples, self.image_size, self.crop_size, self.cache = samples, image_size, crop_size, cache

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        if s.strip is not None:
            return self.view(s)
        img = sample_tensor(s, self.image_size, self.crop_size, self.cache)
        if s.pair_kind == "infrared":  # a mask per image: [2, crop, crop], the RGB image's then the infrared's
            mask = torch.cat([self.mask_tensor(p) for p in (s.mask_path, s.pair_mask_path)])
            return img, mask, s.label, True, s.image_path
        if s.label != 0 and s.mask_path is not None:
            mask = load_mask(s.mask_path) if s.pair_kind is None else modalities().pair_mask(s)
            mask = mask_to_tensor(resize(mask, self.image_size), self.crop_size)
        else:
            mask = torch.zeros(1, self.crop_size, self.crop_size)
        has_mask = s.label == 0 or s.mask_path is not None
        return img, mask, s.label, has_mask, s.image_path

    def mask_tensor(self, path: str | None) -> torch.Tensor:
        """A mask file as [1, crop, crop] in [0, 1]; zeros without one."""
        if path is None:
            return torch.zeros(1, self.crop_size, self.crop_size)
        return mask_to_tensor(resize(load_mask(path), self.image_size), self.crop_size)

    def view(self, s: Sample):
        """A MANTA view: its strip of the image and of the mask (never cached), labelled anomalous when the
        transformed mask strip reaches 1 (the preview's int() of its maximum), named <image stem>_view<k>."""
        img = transform(view_strip(load_image(s.image_path), s.strip, s.image_path), self.image_size,
                        self.crop_size)
        mask = torch.zeros(1, self.crop_size, self.crop_size)
        if s.mask_path is not None:
            mask = mask_to_tensor(resize(view_strip(load_mask(s.mask_path), s.strip, s.mask_path), self.image_size),
                                  self.crop_size)
        stem, ext = os.path.splitext(s.image_path)
        return img, mask, int(mask.max() >= 1), True, f"{stem}_view{s.strip + 1}{ext}"


class StripTrainDataset(TrainDataset):
    """MANTA training: item i is one view strip of image i, drawn uniformly (the preview: random.randint(0, 4)
    per item) from a generator seeded with (seed, epoch, i), so a resumed run and any number of loader workers
    see the same strips. Items are keyed by (epoch, index) (epoch_key)."""

    keyed_by_epoch = True

    def __init__(self, samples: list[Sample], image_size: int, crop_size: int, seed: int = 1):
        super().__init__(samples, image_size, crop_size)
        self.seed = seed

    def __getitem__(self, key):
        epoch, i = epoch_key(key)
        strip = int(np.random.default_rng([self.seed, epoch, i]).integers(MANTA_VIEWS))
        path = self.samples[i].image_path
        return transform(view_strip(load_image(path), strip, path), self.image_size, self.crop_size)


def epoch_key(key) -> tuple[int, int]:
    """(epoch, index) of an item of a dataset whose items change with the epoch (`keyed_by_epoch`: few-shot
    augmentation, MANTA's view strips, CRR's synthetic anomalies): the training sampler's (epoch, index) key
    (train_state.EpochSampler), or a bare index for epoch 0. The epoch travels with each key, so the loader's
    worker processes can live across epochs."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return 0, int(key)


def view_strip(img: Image.Image, strip: int, path: str) -> Image.Image:
    """View `strip` of a MANTA image: columns 256 * strip .. 256 * (strip + 1), the last view to the right edge."""
    width, height = img.size
    if width <= (MANTA_VIEWS - 1) * MANTA_VIEW_WIDTH:
        raise UserError(f"{path} is {width} px wide, but a MANTA image holds {MANTA_VIEWS} views of "
                        f"{MANTA_VIEW_WIDTH} px side by side; check --dataset and --data_path")
    left = strip * MANTA_VIEW_WIDTH
    return img.crop((left, 0, width if strip == MANTA_VIEWS - 1 else left + MANTA_VIEW_WIDTH, height))


# ----------------------------------------------------------------------------------------------------------
# Folder readers


def _name_map(folder: str) -> dict[str, str]:
    """lower-cased file name -> actual file name, for the files in `folder` ({} when it does not exist)."""
    try:
        names = _entries(folder, lambda e: e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(n.lower(), n)
    return out


def _available(folder: str, suffix: str | None = None) -> str:
    """' (the classes there: a, b)': the subfolders of `folder`, or the stems of its `suffix` files."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name.removesuffix(suffix or "") for e in it if not e.name.startswith(".") and
                           (e.is_dir() if suffix is None else e.name.endswith(suffix)))
    except OSError:
        names = []
    return f" (the classes there: {', '.join(names)})" if names else f" ({folder} holds no classes)"


def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}; check --data_path")


def _class_dir(root: str, class_name: str) -> str:
    _check_root(root)
    d = os.path.join(root, class_name)
    if not os.path.isdir(d):
        raise UserError(f"class folder not found: {d}; check --data_path and --classes{_available(root)}")
    return d


def mvtec_samples(root: str, class_name: str, phase: str) -> list[Sample]:
    """Samples of one class of an MVTec-layout dataset.

    phase 'train': `<root>/<class>/train/good/*` (label 0), or, without a train folder, the images directly in
    `<root>/<class>/` (a plain folder of good images). phase 'test': every subfolder of
    `<root>/<class>/test/` ('good' -> 0, anything else -> 1), sorted by folder then file name. Anomalous
    samples get their mask from `<root>/<class>/ground_truth/<defect>/<stem>_mask.<ext>` or `<stem>.<ext>`;
    when the class has no `ground_truth` folder at all, their mask_path is None (image metrics only).
    """
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    cdir = _class_dir(root, class_name)
    samples: list[Sample] = []

    if phase == "train":
        candidates = [os.path.join(cdir, "train", n) for n in NORMAL_DIR_NAMES]
        folder = next((c for c in candidates if os.path.isdir(c)), None)
        if folder is None and (os.path.isdir(os.path.join(cdir, "train")) or not _list_images(cdir)):
            raise UserError(f"training folder not found: {candidates[0]}; the class folder must hold "
                            f"train/good, or the good images directly")
        prefix = "" if folder is None else f"train/{os.path.basename(folder)}/"
        folder = folder or cdir
        for name in _list_images(folder):
            samples.append(Sample(os.path.join(folder, name), 0, None, class_name, rel_path=prefix + name))
        if not samples:
            raise UserError(f"no images in {folder}; expected {', '.join(IMAGE_EXTENSIONS)} files there")
        return samples

    test_dir = os.path.join(cdir, "test")
    if not os.path.isdir(test_dir):
        raise UserError(f"test folder not found: {test_dir}; the class folder must hold test/<good|defect>")
    gt_dir = os.path.join(cdir, "ground_truth")
    has_gt = os.path.isdir(gt_dir)
    for sub in _list_subdirs(test_dir):
        folder = os.path.join(test_dir, sub)
        label = 0 if sub.lower() in NORMAL_DIR_NAMES else 1
        names = _list_images(folder)
        mask_names = _name_map(os.path.join(gt_dir, sub)) if (label and has_gt) else {}
        for name in names:
            mask_path = None
            if label and has_gt:
                mask_path = _find_mask(gt_dir, sub, name, mask_names, os.path.join(folder, name))
            samples.append(Sample(os.path.join(folder, name), label, mask_path, class_name,
                                  rel_path=f"test/{sub}/{name}"))
    if not samples:
        raise UserError(f"no test images in {test_dir}; expected test/<good|defect>/ folders with images")
    return samples


def _find_mask(gt_dir: str, defect: str, image_name: str, mask_names: dict[str, str], image_path: str) -> str:
    stem = os.path.splitext(image_name)[0]
    for suffix in ("_mask", ""):
        for ext in IMAGE_EXTENSIONS:
            actual = mask_names.get(f"{stem}{suffix}{ext}".lower())
            if actual is not None:
                return os.path.join(gt_dir, defect, actual)
    exts = ",".join(e[1:] for e in IMAGE_EXTENSIONS)
    d = os.path.join(gt_dir, defect)
    raise UserError(f"no mask for {image_path}: looked for {d}/{stem}_mask.{{{exts}}} and {d}/{stem}.{{{exts}}}; "
                    f"add the mask, or remove {gt_dir} to evaluate without pixel ground truth")


def realiad_json_path(root: str, class_name: str, json_dir: str = "realiad_jsons") -> str:
    """The split file `<root>/<json_dir>/<json_dir>/<class>.json`, else `<root>/<json_dir>/<class>.json`."""
    candidates = [os.path.join(root, json_dir, json_dir, f"{class_name}.json"),
                  os.path.join(root, json_dir, f"{class_name}.json")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    folder = next((os.path.dirname(c) for c in candidates if os.path.isdir(os.path.dirname(c))), None)
    there = _available(folder, ".json") if folder else ""
    mvtec_like = [d for d in _list_subdirs(root) if any(os.path.isdir(os.path.join(root, d, t)) for t in
                                                        ("train", "test"))] if os.path.isdir(root) else []
    if mvtec_like and not os.path.isdir(os.path.join(root, json_dir)):
        raise UserError(f"Real-IAD split folder not found: {os.path.join(root, json_dir)}, but {root} holds "
                        f"MVTec-layout class folders ({', '.join(mvtec_like[:4])}): pass --dataset mvtec")
    raise UserError(f"Real-IAD split file not found: {candidates[0]} or {candidates[1]}; "
                    f"check --data_path and --classes{there}, and unpack the {json_dir} archive into the dataset "
                    f"folder")


def realiad_samples(root: str, class_name: str, phase: str, resolution: str = "realiad_1024",
                    json_dir: str = "realiad_jsons", multiview: bool = False,
                    allow_outside: bool = False) -> tuple[list[Sample], int]:
    """Samples of one Real-IAD (or Real-IAD Variety) class from its split JSON; paths are relative to
    `<root>/<resolution>/<class>/`, or to `<root>/<resolution>/<class>/<class>/` where that folder exists.
    An image listed twice in the file (in either list), and a path leading out of `root` (`../`) unless
    `allow_outside`, are UserErrors naming the entries.

    Returns (samples, number of anomalous samples without a mask_path); those get mask_path None and count as
    anomalous, except in multi-view test sets. With `multiview`, test samples are views grouped into objects as the
    Dinomaly2 preview groups them: the object is the folder of the JSON's image path (object_id: its parts joined
    without separators, e.g. 'NGAKS0003'), objects sorted by it, views in JSON order, and an anomalous view
    without a mask_path is normal (the defect is not visible in it).
    """
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    _check_root(root)
    jpath = realiad_json_path(root, class_name, json_dir)
    cdir = os.path.join(root, resolution, class_name)
    if os.path.isdir(os.path.join(cdir, class_name)):  # an archive unpacked into a folder of the same name
        cdir = os.path.join(cdir, class_name)
    if not os.path.isdir(cdir):
        raise UserError(f"class folder not found: {cdir}; check --data_path and --classes "
                        f"(Real-IAD images are read from <data_path>/{resolution}/<class>; --realiad_resolution "
                        f"names another folder)"
                        f"{_available(os.path.join(root, resolution))}")
    fix = "re-extract the Real-IAD split files"
    try:
        with open(jpath, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"malformed split file {jpath} ({one_line(e)}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get(phase), list):
        raise UserError(f"malformed split file {jpath}: no '{phase}' list at the top level; {fix}")
    meta = data.get("meta")
    normal_class = meta.get("normal_class", "OK") if isinstance(meta, dict) else "OK"
    _check_listed_once(data, jpath, normal_class, fix)

    samples: list[Sample] = []
    missing = 0
    grouped = multiview and phase == "test"
    for i, item in enumerate(data[phase]):
        problem = _entry_problem(item)
        if problem:
            raise UserError(f"malformed split file {jpath}: entry {i} of '{phase}' {problem}; {fix}")
        rel = _split_path(item["image_path"])
        label = 0 if item["anomaly_class"] == normal_class else 1
        mask_path = None
        if label:
            m = item.get("mask_path")
            if m:
                mask_path = os.path.join(cdir, _split_path(m))
            else:
                missing += 1
                label = 0 if grouped else 1
        for path in (os.path.join(cdir, rel), mask_path):
            if path is not None and not allow_outside and not _inside(path, root):
                raise UserError(f"split file {jpath}: entry {i} of '{phase}' leads out of the dataset folder {root} "
                                f"({path}); fix the split file, or pass --allow_outside_paths if that is meant")
        samples.append(Sample(os.path.join(cdir, rel), label, mask_path, class_name, rel_path=rel,
                              object_id="".join(rel.split("/")[:-1]) if grouped else None))
    if not samples:
        raise UserError(f"no '{phase}' samples in {jpath}; {fix}")
    if grouped:
        samples.sort(key=lambda s: s.object_id)  # stable: the views of an object stay in JSON order
    return samples, missing


def manta_samples(root: str, class_name: str, phase: str, multiview: bool = False) -> list[Sample]:
    """Samples of one MANTA-Tiny class (MVTec layout under `<root>/<domain>/<class>`). Training samples are whole
    images (StripTrainDataset draws a view of each). Each test image gives MANTA_VIEWS samples, one per view strip
    (TestDataset labels each from its mask strip), with `multiview` grouped into one object (the image)."""
    samples = mvtec_samples(root, class_name, phase)
    if phase == "train":
        return samples
    return [replace(s, strip=v, object_id=s.image_path if multiview else None)
            for s in samples for v in range(MANTA_VIEWS)]


def mvtec3d_samples(root: str, class_name: str, phase: str) -> list[Sample]:
    """Samples of one MVTec 3D-AD class, as distributed: `<root>/<class>/train/good/rgb/<n>.png` (phase 'train'),
    `<root>/<class>/test/<kind>/rgb/<n>.png` ('test': 'good' -> 0, any other kind -> 1, mask
    `<kind>/gt/<n>.png`), sorted by kind then name; each paired with its depth (modalities.depth_file: the
    prepared `<kind>/z/<n>.tiff`, else the point cloud `<kind>/xyz/<n>.tiff`). The validation split is not read,
    as in the preview."""
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    split = os.path.join(_class_dir(root, class_name), phase)
    if not os.path.isdir(split):
        raise UserError(f"{phase} folder not found: {split}; MVTec 3D-AD's layout is <class>/{{train,test}}/<kind>/"
                        f"{{rgb,xyz,gt}}")
    kinds = [k for k in _list_subdirs(split) if phase == "test" or k.lower() in NORMAL_DIR_NAMES]
    samples = []
    for kind in kinds:
        kind_dir = os.path.join(split, kind)
        label = 0 if kind.lower() in NORMAL_DIR_NAMES else 1
        rgb_dir = os.path.join(kind_dir, "rgb")
        if not os.path.isdir(rgb_dir):
            raise UserError(f"image folder not found: {rgb_dir}; MVTec 3D-AD's layout is <class>/<split>/<kind>/"
                            f"{{rgb,xyz,gt}}")
        for name in _list_images(rgb_dir):
            stem = os.path.splitext(name)[0]
            mask = None
            if label:
                mask = os.path.join(kind_dir, "gt", stem + ".png")
                if not os.path.isfile(mask):
                    raise UserError(f"no mask for {os.path.join(rgb_dir, name)}: {mask} not found; add it, or "
                                    f"remove the sample")
            samples.append(Sample(os.path.join(rgb_dir, name), label, mask, class_name,
                                  rel_path=f"{phase}/{kind}/rgb/{name}",
                                  pair_path=modalities().depth_file(kind_dir, stem), pair_kind="depth"))
    if not samples:
        raise UserError(f"no samples in {split}; expected <kind>/rgb/<n>.png with <kind>/xyz/<n>.tiff")
    return samples


MULSEN_MODALITIES = ("RGB", "Infrared")


def mulsen_samples(root: str, class_name: str, phase: str) -> list[Sample]:
    """Samples of one MulSen-AD class: an RGB image and the infrared image of the same name,
    `<root>/<class>/{RGB,Infrared}/train/<n>.png` (phase 'train') or `.../test/<kind>/<n>.png` ('test'), sorted by
    kind then number. Test labels: 'good' all 0; any other kind's from `RGB/GT/<kind>/data.csv` (rows object,
    RGB, Infrared, point-cloud label), matched by the object's name; the sample's label is the largest of the three
    (the preview's object label: a defect labelled in the point cloud only counts too). A label-1 modality's mask
    is `<modality>/GT/<kind>/<n>.png`. An image without its other modality, a sample without its row (or a row
    without its sample) and a label without its mask are UserErrors naming them. The point clouds (.stl) are not
    read."""
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', not {phase!r}")
    cdir = _class_dir(root, class_name)
    rgb_root, ir_root = (os.path.join(cdir, m, phase) for m in MULSEN_MODALITIES)
    for d in (rgb_root, ir_root):
        if not os.path.isdir(d):
            raise UserError(f"{phase} folder not found: {d}; MulSen-AD's layout is <class>/{{RGB,Infrared}}/"
                            f"{{train,test/<kind>,GT/<kind>}}")
    kinds = [None] if phase == "train" else _list_subdirs(rgb_root)
    samples = []
    for kind in kinds:
        rgb_dir, ir_dir = (os.path.join(r, kind) if kind else r for r in (rgb_root, ir_root))
        names = _paired_names(rgb_dir, ir_dir)
        labels = None
        if kind is not None and kind.lower() not in NORMAL_DIR_NAMES:
            labels = _mulsen_labels(os.path.join(cdir, "RGB", "GT", kind, "data.csv"), names)
        for name in sorted(names, key=_number_then_name):
            modal = labels[os.path.splitext(name)[0]] if labels else (0, 0, 0)
            masks = []
            for m, label in zip(MULSEN_MODALITIES, modal):
                mask = os.path.join(cdir, m, "GT", kind, name) if label else None
                if mask and not os.path.isfile(mask):
                    raise UserError(f"{os.path.join(cdir, m, 'test', kind, name)} is labelled anomalous in "
                                    f"{m} (RGB/GT/{kind}/data.csv) but its mask {mask} is missing; add the mask or "
                                    f"fix the label")
                masks.append(mask)
            rel = f"RGB/{phase}/{kind + '/' if kind else ''}{name}"
            samples.append(Sample(os.path.join(rgb_dir, name), max(modal), masks[0], class_name, rel_path=rel,
                                  pair_path=os.path.join(ir_dir, name), pair_kind="infrared",
                                  pair_mask_path=masks[1], modal_labels=tuple(modal)))
    if not samples:
        raise UserError(f"no samples in {rgb_root}; expected RGB and Infrared images of the same names")
    return samples


def _number_then_name(name: str):
    """Sort key: the number a file's stem holds (2 before 10), then the name."""
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _paired_names(rgb_dir: str, ir_dir: str) -> list[str]:
    """The image names present in both folders; an image in one only is a UserError naming it."""
    rgb = set(_list_images(rgb_dir)) if os.path.isdir(rgb_dir) else set()
    ir = set(_list_images(ir_dir)) if os.path.isdir(ir_dir) else set()
    for only, other in ((sorted(rgb - ir), ir_dir), (sorted(ir - rgb), rgb_dir)):
        if only:
            first = os.path.join(rgb_dir if other == ir_dir else ir_dir, only[0])
            raise UserError(f"{first} has no image of the same name in {other}"
                            f"{f' ({len(only) - 1} more unpaired)' if len(only) > 1 else ''}; every sample needs "
                            f"both its RGB and its infrared image")
    return sorted(rgb)


def _mulsen_labels(csv_path: str, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """{sample stem: (RGB, infrared, point-cloud label)} from a MulSen-AD data.csv, each sample once."""
    import csv
    if not os.path.isfile(csv_path):
        raise UserError(f"labels not found: {csv_path}; MulSen-AD lists each defect kind's labels there")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))[1:]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {csv_path} ({one_line(e)}); replace the file") from None
    labels = {}
    for i, row in enumerate(rows, start=2):
        if not row:
            continue
        key = os.path.splitext(os.path.basename(row[0].strip()))[0]
        values = [v.strip() for v in row[1:4]]
        if len(row) < 4 or any(v not in ("0", "1") for v in values):
            raise UserError(f"{csv_path}, line {i}: expected 'object,RGB label,infrared label,point-cloud label' "
                            f"with labels 0 or 1, got {','.join(row)}; fix the file")
        if key in labels:
            raise UserError(f"{csv_path} lists sample {key} twice (line {i}); keep one row per sample")
        labels[key] = tuple(int(v) for v in values)
    stems = {os.path.splitext(n)[0] for n in names}
    for missing, what in ((sorted(stems - set(labels)), "has no row for"), (sorted(set(labels) - stems), "lists")):
        if missing:
            more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
            tail = "; add its row" if what == "has no row for" else \
                ", which has no RGB and infrared image; fix the file"
            raise UserError(f"{csv_path} {what} sample {missing[0]}{more}{tail}")
    return labels


def _split_path(path: str) -> str:
    """A path from a split file, '/'-separated and relative (a leading '/' is dropped)."""
    return path.replace("\\", "/").lstrip("/")


def _inside(path: str, root: str) -> bool:
    """Whether `path` lies in the folder `root` once '..' are resolved (lexically: links are not followed)."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def _check_listed_once(data: dict, jpath: str, normal_class: str, fix: str):
    """Each image once in a split file, over its 'train' and 'test' lists (an image in both, twice in one, or
    once normal and once anomalous is a UserError naming both entries)."""
    seen: dict[str, tuple[str, int, bool]] = {}
    for phase in ("train", "test"):
        items = data.get(phase)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if _entry_problem(item):
                continue  # reported when its list is read
            key = os.path.normpath(_split_path(item["image_path"]))
            normal = item["anomaly_class"] == normal_class
            if key in seen:
                other_phase, j, other_normal = seen[key]
                how = "as normal and as anomalous" if normal != other_normal else "twice"
                raise UserError(f"split file {jpath} lists {key} {how}: entry {j} of '{other_phase}' and entry {i} "
                                f"of '{phase}'; keep one; {fix}")
            seen[key] = (phase, i, normal)


def _entry_problem(item) -> str | None:
    """What is wrong with one entry of a Real-IAD split list, or None."""
    if not isinstance(item, dict):
        return "is not an object"
    if not isinstance(item.get("image_path"), str) or not item["image_path"]:
        return "has no image_path"
    if "anomaly_class" not in item:
        return f"({item['image_path']}) has no anomaly_class"
    if not (item.get("mask_path") is None or isinstance(item["mask_path"], str)):
        return f"({item['image_path']}) has a mask_path that is neither a path nor null"
    return None


def class_names(dataset: str, classes: list[str] | None) -> list[str]:
    """--classes, or the dataset's standard class list."""
    return list(classes or DATASETS[dataset])


def realiad_folders(dataset: str, root: str, resolution: str | None = None,
                    json_dir: str | None = None) -> tuple[str, str]:
    """(image folder, split folder) of a dataset read through split JSONs: the given ones, else its defaults
    (REALIAD_FOLDERS: the first of its image folders that exists in `root`)."""
    images, jsons = REALIAD_FOLDERS[dataset]
    if resolution is None:
        resolution = next((f for f in images if os.path.isdir(os.path.join(root, f))), images[0])
    return resolution, json_dir or jsons


def class_samples(dataset: str, root: str, class_name: str, phase: str, resolution: str | None = None,
                  json_dir: str | None = None, multiview: bool = False,
                  allow_outside: bool = False) -> tuple[list[Sample], int]:
    """The samples of one class through the dataset's reader: (samples, anomalous samples without a mask).
    `resolution`, `json_dir`: Real-IAD's folders (None: the dataset's defaults, see realiad_folders).
    `multiview`: test views grouped into objects (Real-IAD, Real-IAD Variety, MANTA-Tiny). `allow_outside`: split
    files may name paths out of `root`."""
    if multiview and dataset not in (*REALIAD_FOLDERS, "manta"):
        raise UserError(f"--multiview on needs a multi-view dataset (realiad, realiad_variety or manta), not "
                        f"--dataset {dataset}")
    if dataset in REALIAD_FOLDERS:
        return realiad_samples(root, class_name, phase, *realiad_folders(dataset, root, resolution, json_dir),
                               multiview, allow_outside)
    if dataset == "manta":
        return manta_samples(root, class_name, phase, multiview), 0
    if dataset == "mvtec3d":
        return mvtec3d_samples(root, class_name, phase), 0
    if dataset == "mulsen":
        return mulsen_samples(root, class_name, phase), 0
    return mvtec_samples(root, class_name, phase), 0


def attach_foreground(samples: list[Sample], foreground_root: str | None = None) -> int:
    """Set each sample's `foreground_path` (CRR's object mask); returns how many samples got one.

    The mask of an image at `rel_path` under its class folder is
    `<foreground_root>/<class>/<rel_path with its OK folder named DISthresh>`, e.g.
    `<root>/<class>/DISthresh/S0001/x.jpg` for the Real-IAD image `OK/S0001/x.jpg`, and
    `<root>/<class>/train/good/x.png` for an MVTec-layout image (no OK folder there).

    foreground_root None (Real-IAD samples only): the released code's folder beside the images,
    `<data_path>/<resolution>_DISthresh` for images in `<data_path>/<resolution>/<class>/`. When that folder
    does not exist, a warning says so and every sample keeps foreground_path None (all-ones foreground), which
    deviates from the paper: its masks come from a salient-object model and are not released.
    A given foreground_root must exist (UserError). Where the folder exists, a missing mask file is a UserError
    naming it.
    """
    roots: dict[str, bool] = {}
    found = 0
    for s in samples:
        s.foreground_path = None
        rel = s.rel_path.split("/")
        root = foreground_root
        if root is None:
            class_dir = s.image_path[: len(s.image_path) - len(s.rel_path)].rstrip("/" + os.sep)
            root = os.path.dirname(class_dir) + "_DISthresh"
        if root not in roots:
            roots[root] = os.path.isdir(root)
            if not roots[root] and foreground_root is not None:
                raise UserError(f"foreground folder not found: {root}; check --foreground_path")
            if not roots[root]:
                logging.getLogger("anomaly").warning(
                    f"warning: no foreground masks ({root} does not exist): anomalies may cover the background, "
                    f"unlike the paper, whose object masks (from a salient-object model) are not released; "
                    f"pass --foreground_path DIR to use your own")
        if not roots[root]:
            continue
        path = os.path.join(root, s.class_name, *["DISthresh" if c == "OK" else c for c in rel])
        if not os.path.isfile(path):
            raise UserError(f"foreground mask not found: {path} (for {s.image_path}); every training image needs "
                            f"one in {root}")
        s.foreground_path = path
        found += 1
    return found
