"""One clear line for every bad input, found before any training starts: unreadable or missing images, masks of
the wrong size, wrong class names, malformed Real-IAD splits, checkpoints of the wrong kind, files that are not
checkpoints, crafted pickles, running out of GPU memory. Internal errors keep their traceback."""
import json
import os
import pickle
import shutil

import pytest
import torch
from PIL import Image
from test_end_to_end import RUN
from test_resume import dinomaly, error_line, exit_status, final_line, stage2
from torch._utils import ExceptionWrapper

from dinomaly import dataset as ds
from dinomaly import checkpoints, models, preflight, train
from dinomaly.errors import UserError, user_message
from dinomaly.models.vitill import ViTill
from dinomaly.options import DataOptions

from conftest import TINY
from prepare_data.make_demo_data import make_demo_data

IMAGE_EXTENSIONS = (".png", ".jpg")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), size=32, seed=0, n_train=3, n_test_good=1,
                          n_test_bad=2)


@pytest.fixture
def data(demo, tmp_path):
    """A private copy of the demo data (MVTec and Real-IAD layouts) to break."""
    shutil.copytree(os.path.dirname(demo["mvtec"]), tmp_path / "data")
    return {k: str(tmp_path / "data" / os.path.basename(v)) for k, v in demo.items() if k != "foreground"}


def args_for(root: str, dataset: str = "mvtec") -> DataOptions:
    return DataOptions(dataset=dataset, data_path=root, classes=("weave", "nut"), realiad_resolution="realiad_1024",
                     json_dir="realiad_jsons")


def files_under(root: str, folders: list[str]) -> list[str]:
    """Every image file under the given class folders, counted independently of the readers."""
    return [os.path.join(d, f) for c in folders for d, _, names in os.walk(os.path.join(root, c))
            for f in names if f.endswith(IMAGE_EXTENSIONS)]


def train_samples(args):
    return [s for c in args.classes for s in ds.class_samples(args.dataset, args.data_path, c, "train")[0]]


def test_an_unreadable_image_is_named_with_how_many_others_were_checked(data):
    root = data["mvtec"]
    args = args_for(root)
    every = files_under(root, args.classes)  # train, test and ground-truth images of the two classes
    bad = sorted(p for p in every if os.sep + "train" + os.sep in p)[0]
    with open(bad, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(UserError) as e:
        preflight.check_data(args, 1, train_samples(args))
    assert str(e.value).startswith(f"cannot read training image {bad} (cannot identify image file")
    assert f"the other {len(every) - 1} files checked are fine" in str(e.value)
    test_image = sorted(p for p in every if os.sep + "test" + os.sep in p)[-1]
    data = open(test_image, "rb").read()
    with open(test_image, "wb") as f:
        f.write(data[:len(data) // 2])  # a truncated PNG: its header still reads
    with pytest.raises(UserError, match=f"1 more of the {len(every)} files checked are missing or unreadable too"):
        preflight.check_data(args, 1, train_samples(args))


def test_masks_must_match_their_images(data):
    root = data["mvtec"]
    args = args_for(root)
    masks = sorted(files_under(root, ["nut"]))
    mask = next(p for p in masks if os.sep + "ground_truth" + os.sep in p)
    image = mask.replace("ground_truth", "test").replace("_mask.png", ".png")
    Image.open(mask).resize((40, 30)).save(mask)
    n_masks = sum(os.sep + "ground_truth" + os.sep in p for p in files_under(root, args.classes))
    with pytest.raises(UserError) as e:
        preflight.check_data(args, 1)
    assert str(e.value) == (f"mask {mask} is 40x30 px, but its image {image} is 32x32; the other {n_masks - 1} "
                            f"masks checked are fine; fix the masks")


def test_wrong_class_names_list_the_classes_there(data):
    with pytest.raises(UserError, match=r"class folder not found: .*nope; .*\(the classes there: nut, weave, "
                                        r"woodgrain\)"):
        ds.mvtec_samples(data["mvtec"], "nope", "train")
    with pytest.raises(UserError, match=r"split file not found: .*\(the classes there: nut, weave, woodgrain\)"):
        ds.realiad_samples(data["realiad"], "nope", "train")


def test_realiad_split_problems_name_the_split_file_and_the_field_or_file(data):
    root = data["realiad"]
    args = args_for(root, "realiad")
    json_path = ds.realiad_json_path(root, "nut")
    with open(json_path) as f:
        split = json.load(f)
    missing = os.path.join(root, "realiad_1024", "nut", split["test"][-1]["mask_path"])
    os.remove(missing)
    with pytest.raises(UserError) as e:
        preflight.check_data(args, 1)
    assert str(e.value).startswith(f"mask not found: {missing} (listed in {json_path}); the other ")
    del split["train"][1]["anomaly_class"]
    with open(json_path, "w") as f:
        json.dump(split, f)
    with pytest.raises(UserError) as e:
        ds.realiad_samples(root, "nut", "train")
    assert str(e.value).startswith(f"malformed split file {json_path}: entry 1 of 'train' "
                                   f"({split['train'][1]['image_path']}) has no anomaly_class;")


def test_a_bad_test_image_stops_the_run_before_training(data, tmp_path, capsys):
    bad = sorted(p for p in files_under(data["mvtec"], ["nut"]) if os.sep + "test" + os.sep in p)[-1]
    with open(bad, "wb") as f:
        f.write(b"")
    argv = ["--data_path", data["mvtec"], "--encoder", TINY, "--encoder_weights", "random", "--image_size", "32",
            "--crop_size", "28", "--batch_size", "2", "--total_iters", "2", "--save_dir", str(tmp_path),
            "--save_name", "run", *RUN]
    assert exit_status(dinomaly, argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot read test image {bad} (") and "replace the file" in line
    assert (tmp_path / "run" / "log.txt").read_text().rstrip().splitlines()[-1] == line
    assert not (tmp_path / "run" / "model.pth").exists()


def test_crr_stage2_checks_its_data_before_loading_the_stage1_model(data, tmp_path, capsys):
    """The Stage-I model (its sizes from its config.json) is loaded only once the training images open."""
    stage1 = tmp_path / "crr"
    stage1.mkdir()
    torch.save(ViTill(models.ENCODERS[TINY], mask_ratio=0.4).state_dict(), stage1 / "model.pth")
    (stage1 / "config.json").write_text(json.dumps({"model": dict(method="crr", encoder=TINY, image_size=32,
                                                                  crop_size=28, mask_ratio=0.4, test_mask="on")}))
    bad = sorted(p for p in files_under(os.path.join(data["realiad"], "realiad_1024"), ["nut"])
                 if "OK" in p.split(os.sep))[0]
    with open(bad, "wb") as f:
        f.write(b"")
    argv = ["--data_path", data["realiad"], "--classes", "weave", "nut", "--save_dir", str(tmp_path),
            "--save_name", "crr", "--anomaly_source_path", "none", "--batch_size", "2", "--total_iters", "2", *RUN]
    assert exit_status(stage2, argv) == 2
    out = capsys.readouterr()
    assert final_line(out.err).startswith(f"error: cannot read training image {bad} (")
    assert "loaded" not in out.out and not list(stage1.glob("Seg_model_*.pth"))


@pytest.mark.parametrize("error,status,expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."), 2,
     "error: the GPU ran out of memory (it asked for 2.00 GiB more); use a smaller --batch_size, or --precision bf16"),
    (RuntimeError("a bug"), 1, "internal error (please report it with this traceback):"),
])
def test_out_of_memory_is_a_user_error_and_a_bug_keeps_its_traceback(error, status, expected, demo, tmp_path,
                                                                     monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "global_cosine_hm", fail)
    argv = ["--data_path", demo["mvtec"], "--encoder", TINY, "--encoder_weights", "random", "--image_size", "32",
            "--crop_size", "28", "--batch_size", "2", "--total_iters", "2", "--save_dir", str(tmp_path), *RUN]
    assert exit_status(dinomaly, argv) == status
    err = capsys.readouterr().err
    assert expected in err and ("Traceback" in err) == (status == 1)


def test_a_user_error_from_a_loader_worker_is_one_line():
    try:
        raise UserError("cannot read image x.jpg (image file is truncated); replace the file")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UserError) as e:
        wrapped.reraise()  # what the DataLoader does in the main process
    assert "Traceback" in str(e.value)
    assert user_message(e.value) == "cannot read image x.jpg (image file is truncated); replace the file"


# ----------------------------------------------------------------------------------------------- checkpoints

class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(how, tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "model.pth"
    if how == "pickle":
        path.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"encoder.cls_token": torch.zeros(1), "x": Payload(marker)}, path)
    with pytest.raises(UserError) as e:
        checkpoints.load_model(str(path))
    message = str(e.value)
    assert "holds Python objects" in message and "can run code" in message and "\n" not in message
    assert "weights_only" not in message and not marker.exists()
    if how == "pickle":
        pickle.loads(path.read_bytes())  # the payload is real: unpickling it does create the marker
        assert marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "good.pth")
    whole = (tmp_path / "good.pth").read_bytes()
    for name, content, reason in [("text.pth", b"hello", "it is not a PyTorch file"), ("empty.pth", b"", "it is empty"),
                                  ("cut.pth", whole[:len(whole) // 2], "it is truncated or damaged")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError) as e:
            checkpoints.load_model(str(tmp_path / name))
        assert str(e.value).startswith(f"cannot read checkpoint {tmp_path / name}: {reason}")


def test_checkpoints_of_the_wrong_kind(tmp_path, tiny_encoder):
    cfg = models.encoder_config(TINY)
    torch.save(ViTill(cfg).state_dict(), tmp_path / "model.pth")
    seg = models.segmentation_net(cfg.embed_dim)
    torch.save(seg.state_dict(), tmp_path / "Seg_model_last.pth")
    torch.save(dict(format="dinomaly training state", iteration=3, optimizer={}, module={}),
               tmp_path / "train_state.pth")
    with pytest.raises(UserError, match="is a training state, not a checkpoint; continue its training with --resume"):
        checkpoints.load_model(str(tmp_path / "train_state.pth"))
    with pytest.raises(UserError, match="is a segmentation network .*; pass it as --seg_checkpoint"):
        checkpoints.build_model(TINY, str(tmp_path / "Seg_model_last.pth"))
    with pytest.raises(UserError, match="is a full reconstruction-model checkpoint, not an encoder"):
        checkpoints.build_model(TINY, str(tmp_path / "model.pth"))
    with pytest.raises(UserError, match="is a reconstruction model; pass it as --checkpoint"):
        checkpoints.load_segmentation_net(str(tmp_path / "model.pth"), cfg.embed_dim)
    with pytest.raises(UserError, match="is a segmentation network"):
        checkpoints.load_model(str(tmp_path / "Seg_model_last.pth"))


def test_a_cuda_device_by_index_is_checked_and_made_current(monkeypatch):
    """--device cuda:N must exist and becomes the current device (else pinned-memory threads open a context on
    cuda:0); plain cuda leaves the current device alone. CUDA is faked: only the bookkeeping is tested."""
    from dinomaly.run import resolve_device
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and len(made_current) == 1
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
