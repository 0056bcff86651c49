"""Nothing silent (issue 25): the Python API refuses what it cannot use (a run folder without its settings, image
arrays of the wrong shape, type, channels or range, non-finite values, an empty list) with one line naming the input
and the form expected; the last ways to lose results end in one line with the results so far kept; misleading
messages and silent omissions are warned about or fixed."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import common, demo, trained  # noqa: F401 - fixtures: a tiny demo and a finished run on it
from test_resume import dinomaly, error_line, exit_status

from dinomaly import checkpoints, cli, models, predict
from dinomaly.errors import InputError, UserError

from conftest import TINY, TINY_CFG
from prepare_data.make_demo_data import make_demo_data


@pytest.fixture(scope="module")
def detector(trained):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        return predict.Detector(str(trained), device="cpu")


def copy_run(run, tmp_path, name="copy"):
    shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("run.lock"))
    return tmp_path / name


# ----------------------------------------------------------------------------------------------- silent results

def test_a_run_folder_without_its_config_json_is_refused_unless_the_sizes_are_given(trained, demo, tmp_path,
                                                                                     capsys):
    """Before: rebuilt at the paper's 448 -> 392 px and decided with the run's thresholds, without a word."""
    run = copy_run(trained, tmp_path)
    (run / "config.json").unlink()
    with pytest.raises(UserError) as e:
        predict.Detector(str(run), device="cpu")
    assert str(e.value).startswith(f"{run} holds a run (thresholds.json") and "no config.json" in str(e.value)
    assert "448 -> 392 px" in str(e.value) and "--image_size and --crop_size" in str(e.value)
    image = os.path.join(demo["mvtec"], "nut", "test", "good", os.listdir(os.path.join(demo["mvtec"], "nut", "test",
                                                                                      "good"))[0])
    assert exit_status(cli.predict_main, ["--checkpoint", str(run), "--input", image, "--out", str(tmp_path / "p"),
                                          "--device", "cpu", "--num_workers", "0"]) == 2
    assert "no config.json" in error_line(capsys)
    given = predict.Detector(str(run), device="cpu", image_size=32, crop_size=28)(image)
    assert given.score == predict.Detector(str(trained), device="cpu")(image).score
    assert "has no config.json: the model is rebuilt with the sizes given" in capsys.readouterr().err
    # an official model.pth alone in its folder keeps its method's recipe, as before
    official = tmp_path / "official"
    official.mkdir()
    shutil.copy(run / "model.pth", official / "model.pth")
    assert checkpoints.load_trained(str(official), {}, "dinomaly")[1].image_size == 448


def test_an_official_model_evaluated_in_its_own_folder_keeps_the_evaluations_sizes(trained, tmp_path):
    """The settings file of such a folder is the evaluation's config_eval.json."""
    run = copy_run(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").unlink()
    (run / "config_eval.json").write_text(json.dumps({"model": config["model"]}))
    assert predict.Detector(str(run), device="cpu").image_size == 32


@pytest.mark.parametrize("array,problem", [
    (np.zeros((0, 0, 3), np.uint8), "it is empty"),
    (np.zeros(12288, np.uint8), "1 dimension)"),
    (np.zeros((2, 8, 8, 3), np.uint8), "4 dimensions"),
    (np.zeros((20, 20, 2), np.uint8), "2 channels"),
    (np.full((20, 20, 3), np.nan, np.float32), "1200 of its values are NaN or infinite"),
    (np.full((20, 20), np.inf), "400 of its values are NaN or infinite"),
    (np.full((20, 20, 3), 300.0), "values from 300 to 300, outside [0, 255]"),
    (np.full((20, 20, 3), -0.5, np.float32), "values from -0.5 to -0.5, outside [0, 255]"),
    (np.full((20, 20, 3), 1000, np.int32), "values from 1000 to 1000: integers other than uint16"),
    (np.full((20, 20, 3), 1 + 1j), "not a number type"),
])
def test_detector_refuses_arrays_it_cannot_read_as_images(detector, array, problem):
    """Before: an empty array answered "normal" with a 0 x 0 map, a 1-D one was read as a 12288 x 1 image, NaN was
    painted black, H x W x 2 read as grey + alpha, inf and values above 255 clipped."""
    with pytest.raises(InputError) as e:
        detector(array)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    message = str(e.value)
    assert message.startswith(f"cannot use an array of shape {array.shape} and type {array.dtype} as an image")
    assert problem in message and "pass H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA)" in message


def test_detector_reads_the_array_forms_it_promises_alike(detector):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    want = detector(rgb).score
    assert detector(rgb.astype(np.float64)).score == want  # 0..255 floats
    assert detector(rgb.astype(np.float32) / 255).score == want  # [0, 1] floats
    assert detector(rgb.astype(np.int64)).score == want
    assert detector(rgb.astype(np.uint16) * 257).score == want  # 16 bits
    assert detector(np.dstack([rgb, np.full((40, 30), 7, np.uint8)])).score == want  # alpha dropped
    grey = rgb[..., 0]
    assert detector(grey).score == detector(grey[..., None]).score == detector(np.dstack([grey] * 3)).score
    assert detector(grey > 127).score == detector(np.where(grey > 127, 255, 0).astype(np.uint8)).score


def test_detector_predict_refuses_an_empty_list_and_a_single_image(detector):
    """Before: RuntimeError: stack expects a non-empty TensorList."""
    with pytest.raises(InputError, match=r"predict\(\) was given an empty list; pass a list of one image or more"):
        detector.predict([])
    with pytest.raises(InputError, match=r"predict\(\) takes a list of images, not a str; .*detector\(image\)"):
        detector.predict("image.png")
    with pytest.raises(InputError, match="cannot use a Tensor as an image; pass a path, a PIL image or a numpy"):
        detector(torch.zeros(3, 8, 8))


def test_exif_orientation_is_applied_to_the_images_predicted(detector, trained, tmp_path):
    """Before: the map and mask of an image stored 80 x 64 and shown (EXIF orientation 6) as 64 x 80 were 80 x 64."""
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    stored.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    shown = Image.open(tmp_path / "turned.jpg").transpose(Image.Transpose.ROTATE_270)
    assert shown.size == (64, 80)
    for image in (str(tmp_path / "turned.jpg"), Image.open(tmp_path / "turned.jpg")):
        r = detector(image)
        assert r.anomaly_map.shape == r.mask.shape == (80, 64)
        assert r.score == detector(np.asarray(shown)).score
    cli.predict_main(["--checkpoint", str(trained), "--input", str(tmp_path / "turned.jpg"), "--out",
                      str(tmp_path / "p"), "--device", "cpu", "--num_workers", "0"])
    with Image.open(tmp_path / "p" / "masks" / "turned.png") as mask:
        assert mask.size == (64, 80)


# ----------------------------------------------------------------------------------------------- lost results

def test_a_false_alarm_rate_of_zero_is_refused_before_anything_runs(demo, tmp_path, capsys):
    """Before: accepted; the evaluation then ended in ZeroDivisionError without thresholds.json, metrics or scores."""
    assert exit_status(dinomaly, [*common(demo, tmp_path, "zero"), "--false_alarm_rate", "0"]) == 2
    assert "--false_alarm_rate: 0.0 is not in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()
    from dinomaly import samples, thresholds as th
    with pytest.raises(UserError, match=r"false-alarm rate 0 is not in \(0, 1\)"):
        th.Calibration({}, false_alarm_rate=0)
    with pytest.raises(UserError, match=r"false-alarm rate 0 is not in \(0, 1\)"):
        th.images_needed(0)
    entry = th.Calibration({}, 0.01).add("c", np.zeros(5), np.arange(5.0), *th.PixelSample(1).arrays())
    assert "fewer than the 99 a false-alarm rate of 0.01 needs" in samples.too_few_warning("c", entry)


def test_nan_encoder_weights_are_refused_and_a_run_of_skipped_steps_saves_no_model(demo, tmp_path, capsys,
                                                                                  monkeypatch):
    """Before: every step was skipped as non-finite, model.pth was saved anyway, then the evaluation crashed."""
    model = models.ViTill(TINY_CFG)
    weights = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    weights["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    argv = [*common(demo, tmp_path, "nan"), "--encoder_weights", str(tmp_path / "nan.pth")]
    assert exit_status(dinomaly, argv) == 2
    line = error_line(capsys)
    assert f"encoder weight file {tmp_path / 'nan.pth'} holds NaN or infinite values (1 tensor, e.g. " \
           f"blocks.0.attn.qkv.weight)" in line
    # a loss that is never finite (whatever the cause): no model.pth, one line
    from dinomaly import train
    monkeypatch.setattr(train, "global_cosine_hm", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    assert exit_status(dinomaly, common(demo, tmp_path, "never", iters=3)) == 2
    assert "the loss was not finite in any of the 3 iterations: every step was skipped, so no model is saved" in \
        error_line(capsys)
    assert not (tmp_path / "never" / "model.pth").exists()


def test_a_training_state_missing_a_tensor_is_one_line(demo, trained, tmp_path, capsys):
    """Before: RuntimeError from load_state_dict, with its traceback."""
    run = copy_run(trained, tmp_path)
    state = torch.load(run / "train_state.pth", weights_only=True)
    removed = sorted(state["module"])[-1]
    del state["module"][removed]
    torch.save(state, run / "train_state.pth")
    assert exit_status(dinomaly, [*common(demo, tmp_path, "copy"), "--resume"]) == 2
    line = error_line(capsys)
    assert line == (f"error: the training state {run / 'train_state.pth'} does not match the model: 1 missing (e.g. "
                    f"{removed}); remove it, or pass --overwrite instead of --resume to start afresh")
    state = torch.load(trained / "train_state.pth", weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][1:]
    torch.save(state, run / "train_state.pth")
    assert exit_status(dinomaly, [*common(demo, tmp_path, "copy"), "--resume"]) == 2
    assert f"cannot restore the optimiser from the training state {run / 'train_state.pth'} (" in error_line(capsys)


def test_export_to_a_folder_where_no_file_can_be_created_stops_before_the_model_loads(trained, tmp_path, capsys,
                                                                                      monkeypatch):
    """Before: export.py --out /proc/model.onnx loaded the model, then FileNotFoundError."""
    from dinomaly import export
    loaded = []
    monkeypatch.setattr(export, "load_mapper", lambda *a, **k: loaded.append(1))
    assert exit_status(cli.export_main, ["--checkpoint", str(trained), "--out", "/proc/model.onnx"]) == 2
    assert "cannot create a file in /proc (" in error_line(capsys) and not loaded


def test_sigterm_during_evaluation_says_so_and_releases_the_run_folder(trained, demo, tmp_path):
    """Before: the process ended with no message and left run.lock behind."""
    import subprocess
    import sys
    from conftest import ROOT
    code = f"""
import os, signal, sys
sys.path[:0] = [{ROOT!r}, os.path.join({ROOT!r}, "tests")]
from dinomaly import cli, evaluate, models
from conftest import TINY, TINY_CFG
models.ENCODERS[TINY] = TINY_CFG
real = evaluate.evaluate_shard
def hooked(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
evaluate.evaluate_shard = hooked
import dinomaly_mvtec_uni
cli.run_script(dinomaly_mvtec_uni, sys.argv[1:])
"""
    argv = [*common(demo, tmp_path, "eval"), "--eval_only", "--checkpoint", str(trained)]
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    assert "interrupted; SIGTERM received: stopped (files written before it are kept)" in r.stderr
    assert not (tmp_path / "eval" / "run.lock").exists()


# ----------------------------------------------------------------------------------------------- misleading

def test_predict_skips_and_reports_links_that_lead_nowhere(trained, demo, tmp_path, capsys):
    """Before: one self-looping link stopped the whole run; a dangling .png link was neither counted nor reported."""
    folder = tmp_path / "in"
    shutil.copytree(os.path.join(demo["mvtec"], "nut", "test"), folder)
    good = sorted(str(p) for p in folder.rglob("*.png"))
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("gone.png", folder / "dangling.png")
    os.symlink("loop_dir", folder / "loop_dir")
    cli.predict_main(["--checkpoint", str(trained), "--input", str(folder), "--out", str(tmp_path / "p"), "--device",
                      "cpu", "--num_workers", "0"])
    out = capsys.readouterr()
    with open(tmp_path / "p" / "predictions.csv") as f:
        assert sorted(line.split(",")[0] for line in f.read().splitlines()[1:]) == good
    assert f"skipped {folder / 'loop.png'}: cannot read image {folder / 'loop.png'} (" in out.err
    assert f"skipped {folder / 'dangling.png'}: cannot read image {folder / 'dangling.png'} (a symbolic link to " \
           f"gone.png, which does not exist)" in out.err
    assert f"warning: skipped {folder / 'loop_dir'} (Too many levels of symbolic links" in out.err
    assert f"predicted {len(good)} images" in out.out and "skipped 2 unreadable" in out.out


def test_a_dangling_link_in_a_test_folder_is_one_line(demo, tmp_path, capsys):
    """Before: left out of the test set without a word."""
    data = tmp_path / "data"
    shutil.copytree(demo["mvtec"], data)
    link = data / "nut" / "test" / "good" / "gone.png"
    os.symlink("nothing_here.png", link)
    assert exit_status(dinomaly, [*common(demo, tmp_path, "run"), "--data_path", str(data)]) == 2
    assert f"cannot read {link} (No such file or directory: a symbolic link to nothing_here.png); remove or fix it" \
        in error_line(capsys)


def test_an_empty_class_folder_is_warned_about(demo, tmp_path, capsys):
    """Before: silently left out of the class list."""
    from dinomaly import samples
    from dinomaly.options import DataOptions
    data = tmp_path / "data"
    shutil.copytree(demo["mvtec"], data)
    (data / "bracket").mkdir()
    assert samples.find_classes(DataOptions(dataset="mvtec", data_path=str(data))) == ["nut", "weave", "woodgrain"]
    assert f"warning: {data / 'bracket'} not used as a class: no images in it" in capsys.readouterr().err


def test_a_size_from_the_runs_settings_is_named_as_such_not_as_a_flag(trained, tmp_path):
    """Before: "--crop_size 113 is not a multiple ..." for a value the user never gave."""
    run = copy_run(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model"]["crop_size"] = 113
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        predict.Detector(str(run), device="cpu")
    assert str(e.value).startswith(f"crop_size 113 (from the run's settings {run / 'config.json'}) is not a multiple "
                                   f"of the encoder's patch size 14; use 112 or 126")
    with pytest.raises(UserError, match=r"^--crop_size 29 is not a multiple"):
        predict.Detector(str(run), device="cpu", crop_size=29)


@pytest.mark.parametrize("missing,expected", [(("settings",), "no 'settings' entry"),
                                              (("all", "classes"), "no 'all' and 'classes' entries")])
def test_a_thresholds_file_names_the_entries_it_lacks(missing, expected, trained, tmp_path):
    """Before: a file without "settings" was said to lack "all" and "classes"."""
    data = json.loads((trained / "thresholds.json").read_text())
    for key in missing:
        del data[key]
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        predict.Detector(str(trained), thresholds=str(tmp_path / "t.json"), device="cpu")
    assert str(e.value) == (f"{tmp_path / 't.json'} is not a complete thresholds file ({expected}, which evaluation "
                            f"writes); evaluate the model again or pass --threshold")


# ----------------------------------------------------------------------------------------------- frictions

def test_a_weight_file_of_another_encoder_names_the_encoder_it_looks_like_and_the_flag(demo, tmp_path, capsys):
    """Before: "does not match the model: 176 wrong shape (e.g. cls_token)", naming the file but not the fix."""
    torch.save(models.ViTill(TINY_CFG).encoder.state_dict(), tmp_path / "tiny.pth")
    argv = [*common(demo, tmp_path, "run"), "--encoder", "dinov2reg_vit_small_14", "--encoder_weights",
            str(tmp_path / "tiny.pth")]
    assert exit_status(dinomaly, argv) == 2
    line = error_line(capsys)
    assert f"encoder weight file {tmp_path / 'tiny.pth'} does not match the model: " in line
    assert line.endswith(f"; it looks like the weights of {TINY} (pass --encoder {TINY}), or pass the weight file "
                         f"of dinov2reg_vit_small_14 as --encoder_weights")


def test_cheap_checks_answer_before_pytorch_is_imported(tmp_path):
    """Before: an encoder typo, a bad --crop_size and predict.py on an empty folder each cost PyTorch's import."""
    import subprocess
    import sys
    from conftest import ROOT
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code = """
import sys
from dinomaly import cli
import dinomaly_mvtec_uni
argv = sys.argv[1:]
try:
    cli.predict_main(argv[1:]) if argv[0] == "predict" else cli.run_script(dinomaly_mvtec_uni, argv[1:])
except SystemExit as e:
    print(e.code, "torch" in sys.modules)
"""
    cases = [(["predict", "--checkpoint", "run", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "p")],
              f"error: no images (png/jpg/jpeg/bmp/tif/tiff) in {tmp_path / 'empty'}; check --input"),
             (["train", "--crop_size", "113"], "error: --crop_size 113 is not a multiple of the encoder's patch size "
                                               "14; use 112 or 126"),
             (["train", "--encoder", "dinov2reg_vit_bsae_14"], "unknown encoder dinov2reg_vit_bsae_14")]
    for argv, expected in cases:
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.split() == ["2", "False"] and expected in r.stderr, (argv, r.stdout, r.stderr[-2000:])


def test_relative_folders_are_said_to_be_relative_to_the_current_folder(demo, tmp_path, monkeypatch, capsys):
    """Before: backbones/weights/ and saved_results/ were named as if they were the clone's; a run stopped by its
    checks left a run folder holding only log.txt without a word."""
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", demo["mvtec"], "--classes", "nope", "--device", "cpu", "--save_dir", "runs",
            "--save_name", "bad"]
    assert exit_status(dinomaly, argv) == 2
    out = capsys.readouterr()
    assert f"run folder: runs/bad ({tmp_path / 'runs' / 'bad'}: --save_dir is relative to the current folder)" \
        in out.out
    assert f"nothing was run: {tmp_path / 'runs' / 'bad'} holds only the log of this error (log.txt)" in out.out
    assert os.listdir(tmp_path / "runs" / "bad") == ["log.txt"]
    assert exit_status(dinomaly, [*common(demo, tmp_path, "run"), "--encoder_weights",
                                  os.path.join("backbones", "weights", "x.pth")]) == 2
    assert f"encoder weight file not found: {tmp_path / 'backbones' / 'weights' / 'x.pth'} " \
           f"(backbones/weights/x.pth, relative to the current folder); download" in error_line(capsys)
    assert exit_status(cli.predict_main, ["--checkpoint", "saved_results/x", "--input", demo["mvtec"], "--out", "p",
                                          "--device", "cpu"]) == 2
    assert f"checkpoint not found: saved_results/x (relative to the current folder, {tmp_path}); " in \
        error_line(capsys)


def test_an_unfinished_per_class_run_says_resume_finishes_it(demo, tmp_path, capsys):
    """Before: each message was right, but none said the run was unfinished or that --resume finishes it."""
    dinomaly([*common(demo, tmp_path, "sep"), "--per_class"])
    run = tmp_path / "sep"
    for name in ("metrics.csv", "class_prototypes.pt"):  # as when the training of the second class is under way
        (run / name).unlink()
    shutil.rmtree(run / "nut")
    capsys.readouterr()
    with pytest.raises(UserError, match=r"\(the run is unfinished: --resume finishes it\); pass --class_name"):
        predict.Detector(str(run), device="cpu")
    assert f"warning: {run} is an unfinished run (1 class trained so far: weave); its training command with " \
           f"--resume finishes it" in capsys.readouterr().err
    assert predict.Detector(str(run), device="cpu", class_name="weave").class_name == "weave"


def test_demo_data_of_another_setting_is_not_deleted(tmp_path):
    """Before: every make_demo_data call deleted the MANTA copy of another demo."""
    make_demo_data(str(tmp_path), size=32, n_train=1, n_test_good=1, n_test_bad=1, manta=True)
    kept = sorted(str(p) for p in (tmp_path / "manta_demo").rglob("*.png"))
    make_demo_data(str(tmp_path), size=32, n_train=1, n_test_good=1, n_test_bad=1)
    assert kept and sorted(str(p) for p in (tmp_path / "manta_demo").rglob("*.png")) == kept


def test_the_package_asks_for_no_major_version_the_tests_never_ran_with():
    """Before: `pip install .` resolved to OpenCV 5 and NumPy 3-to-be: no upper bounds. Each range stops below the
    next major version, and the pinned versions lie inside it."""
    import tomllib
    from packaging.requirements import Requirement
    from conftest import ROOT
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    asked = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    pins = {}
    for name in ("requirements.txt", "requirements-export.txt", "requirements-serve.txt"):
        with open(os.path.join(ROOT, name)) as f:
            for line in f:
                if "==" in line:
                    package, version = line.split("#")[0].strip().split("==")
                    pins[package.lower()] = version
    for r in asked:
        uppers = [s for s in r.specifier if s.operator == "<"]
        assert len(uppers) == 1, r
        pinned = pins[r.name.lower()]
        assert r.specifier.contains(pinned), (r, pinned)
        assert int(uppers[0].version.split(".")[0]) == int(pinned.split(".")[0]) + 1, (r, pinned)  # the next major


def test_predict_help_says_the_class_is_found_by_default():
    """Before: --class_name "instead of all classes'", although each image's class is found by default."""
    text = " ".join(cli.predict_parser().format_help().split())
    assert "instead of all classes'" not in text
    assert "instead of those of the class found for each image" in text
