"""Nothing lost under faults: SIGTERM and SIGHUP save like Ctrl-C (also under torchrun), a run folder is written
by one job at a time, evaluation never replaces another run's results silently, CRR's segmentation network
belongs to its model, Real-IAD splits list each image once inside the dataset, files we wrote are checked when
read, file names of any bytes, a full disk, a crash during prediction and huge pictures cost no results, and
each of the remaining faults is one line with exit status 2."""
import builtins
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_end_to_end import RUN, read_csv, run_cli
from test_resume import (SMALL, crr_args, dinomaly, error_line, exit_status, final_line, load, signal_run, stage1,
                         stage2, stage2_args)

from dinomaly import checkpoint_detector, checkpoints, cli, export, image_files, models, predict, runlock
from dinomaly import dataset as ds
from dinomaly import run as run_module
from dinomaly.errors import UserError

from conftest import ROOT
from prepare_data.make_demo_data import make_demo_data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), size=32, seed=0, n_train=4, n_test_good=1,
                          n_test_bad=1)


def common(demo, save_dir, name, iters=2):
    return ["--data_path", demo["mvtec"], "--save_dir", str(save_dir), "--save_name", name, "--total_iters",
            str(iters), *SMALL]


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """A finished tiny Dinomaly run (2 iterations) with its thresholds.json."""
    save_dir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, __import__("conftest").TINY, __import__("conftest").TINY_CFG)
        dinomaly(common(demo, save_dir, "run"))
    return save_dir / "run"


def copy_run(run, tmp_path, name="copy"):
    shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("run.lock"))
    return tmp_path / name


# ----------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_save_and_exit_like_ctrl_c(sig, demo, tmp_path):
    argv = common(demo, tmp_path, "run", iters=8)
    r = signal_run(sig, 3, "dinomaly_mvtec_uni.py", argv)
    assert r.returncode == 128 + signal.Signals[sig], r.stderr[-2000:]
    line = final_line(r.stderr)
    assert line.startswith("interrupted; the training state at iteration") and line.endswith("--resume")
    assert f"{sig} received: saving the training state after this step" in r.stderr
    assert 3 < load(tmp_path / "run" / "train_state.pth")["iteration"] < 8  # the step under way ends first
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert log_text.rstrip().splitlines()[-1] == line
    assert not (tmp_path / "run" / runlock.NAME).exists()  # the lock goes with the job


def test_sigterm_to_torchrun_saves_on_every_process(demo, tmp_path):
    """The launcher (as SLURM or Kubernetes would) gets SIGTERM and passes it to both processes, which stop at
    the same step and save one state holding both processes' random-number states."""
    argv = common(demo, tmp_path, "ddp", iters=12)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        os.path.join("tests", "signal_run.py"), "SIGTERM", "3", "dinomaly_mvtec_uni.py", *argv],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert r.stderr.count("SIGTERM received: saving the training state after this step") == 2, r.stderr[-3000:]
    state = load(tmp_path / "ddp" / "train_state.pth")
    assert 3 < state["iteration"] < 12 and len(state["rng"]) == 2 and state["settings"]["processes"] == 2
    assert f"interrupted; the training state at iteration {state['iteration']} is saved" in \
        (tmp_path / "ddp" / "log.txt").read_text()
    assert "internal error" not in r.stderr


# ----------------------------------------------------------------------------------------------- the run lock

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder, pid, host=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, runlock.NAME), "w") as f:
        json.dump(dict(host=host or socket.gethostname(), pid=pid, since="2026-01-01 00:00:00", command="x"), f)


def test_a_second_job_into_a_held_run_folder_stops_naming_the_holder(demo, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "run", holder.pid)
        assert exit_status(dinomaly, common(demo, tmp_path, "run")) == 2
        line = error_line(capsys)
        assert f"is in use by another job (pid {holder.pid} on host {socket.gethostname()}" in line
        assert "--save_name" in line and "delete" in line
        assert sorted(os.listdir(tmp_path / "run")) == [runlock.NAME]  # nothing written, not even log.txt
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    runlock.acquire(str(tmp_path))
    try:
        with open(tmp_path / runlock.NAME) as f:
            assert json.load(f)["pid"] == os.getpid()
        assert f"took over {tmp_path / runlock.NAME} from pid {pid}" in caplog.text
        runlock.acquire(str(tmp_path))  # this process again: it holds it
    finally:
        runlock.release_all()
    assert not (tmp_path / runlock.NAME).exists()
    # a live process on another host cannot be checked: refused
    write_lock(tmp_path, pid, host="elsewhere")
    with pytest.raises(UserError, match=f"in use by another job \\(pid {pid} on host elsewhere"):
        runlock.acquire(str(tmp_path))


# ----------------------------------------------------------------------------------------------- full disk

class FullDisk:
    """open() whose files for *.tmp paths take `room` bytes, then fail as a full disk does."""

    def __init__(self, room: int):
        self.room, self.names = room, []

    def __call__(self, path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if not str(path).endswith(".tmp"):
            return f
        self.names.append(os.path.basename(path))
        return Limited(f, self.room)


class Limited:
    """A file that takes `room` bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_leaves_no_temporary_file_and_one_line(demo, tmp_path, monkeypatch, capsys):
    disk = FullDisk(room=5000)
    monkeypatch.setattr(run_module, "open", disk, raising=False)
    assert exit_status(dinomaly, common(demo, tmp_path, "run")) == 2
    line = error_line(capsys)
    folder = tmp_path / "run"
    assert line.startswith(f"error: no space left in {folder} to write model.pth (it needs about ")
    assert "MB are free); free some space or pass another --save_dir" in line
    written = sorted(n for n in os.listdir(folder) if not n.startswith("events.out.tfevents."))  # TensorBoard's
    assert written == ["config.json", "log.txt"]  # no model.pth.*.tmp left
    assert disk.names == [f"model.pth.{os.getpid()}.tmp"]  # each process its own temporary file


# ----------------------------------------------------------------------------------------------- evaluation

def test_evaluation_of_another_run_never_replaces_a_trained_runs_results(demo, trained, tmp_path, capsys):
    other = copy_run(trained, tmp_path, "other")  # another trained run, with its own thresholds
    before = (other / "thresholds.json").read_bytes()
    evaluate = ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(trained), "--save_dir",
                str(tmp_path), *RUN]
    assert exit_status(dinomaly, [*evaluate, "--save_name", "other"]) == 2
    line = error_line(capsys)
    assert f"{other} holds another trained model; evaluating {trained} there would replace" in line
    assert "--replace_results" in line and "--save_name" in line
    assert (other / "thresholds.json").read_bytes() == before
    # without --save_name: the default training run's folder, and the line says so
    default = copy_run(trained, tmp_path, dinomaly_defaults()["save_name"])
    assert exit_status(dinomaly, evaluate) == 2
    assert "without --save_name the evaluation goes into the default training run's folder" in error_line(capsys)
    assert not (default / "config_eval.json").exists()
    # its own model, or asked for: evaluated
    dinomaly([*evaluate[:4], str(other), *evaluate[5:], "--save_name", "other"])
    dinomaly([*evaluate, "--save_name", "other", "--replace_results"])
    with open(other / "config_eval.json") as f:
        assert json.load(f)["checkpoint"] == str(trained)


def dinomaly_defaults():
    import dinomaly_mvtec_uni
    return dinomaly_mvtec_uni.DEFAULTS


# ----------------------------------------------------------------------------------------------- CRR stages

@pytest.fixture(scope="module")
def crr(demo, tmp_path_factory):
    """CRR Stage I (8 iterations) then Stage II (6) in one run folder."""
    save_dir = tmp_path_factory.mktemp("crr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, __import__("conftest").TINY, __import__("conftest").TINY_CFG)
        stage1(crr_args(demo, save_dir, "run"))
        stage2(stage2_args(demo, save_dir, "run"))
    return save_dir / "run"


def test_stage1_overwrite_removes_stage2_and_a_stale_segmentation_network_is_refused(demo, crr, tmp_path, capsys):
    from test_end_to_end import run_script

    import crr_realiad_test
    run = copy_run(crr, tmp_path, "run")
    with open(run / "config_stage2.json") as f:
        assert json.load(f)["stage1_model"] == checkpoints.fingerprint(checkpoints.load_model(str(run / "model.pth")))
    assert predict.Detector(str(run), threshold=1.0, device="cpu").mapper.segnet is not None
    # Stage I trained again (its model.pth replaced): test, predict and a resumed Stage II refuse the old network
    stale = load(run / "model.pth")
    stale[next(k for k in stale if k.startswith("decoder."))] += 1
    torch.save(stale, run / "model.pth")
    with pytest.raises(UserError, match=f"{run / 'Seg_model_last.pth'} was trained on another reconstruction model"):
        predict.Detector(str(run), threshold=1.0, device="cpu")
    test_argv = ["--data_path", demo["realiad"], "--save_dir", str(tmp_path), "--save_name", "run", *RUN]
    with pytest.raises(SystemExit):
        run_script(crr_realiad_test, test_argv)
    assert "was trained on another reconstruction model" in error_line(capsys)
    # --overwrite of Stage I deletes what Stage II made from the old model
    stage1([*crr_args(demo, tmp_path, "run"), "--total_iters", "2", "--overwrite"])
    assert not any(n.startswith("Seg_model") or n == "train_state_stage2.pth" for n in os.listdir(run))
    assert "Seg_model_last.pth" in (run / "log.txt").read_text().split("--overwrite: deleted")[-1]


# ----------------------------------------------------------------------------------------------- Real-IAD splits

@pytest.fixture
def split(demo, tmp_path):
    root = tmp_path / "realiad"
    shutil.copytree(demo["realiad"], root)
    path = ds.realiad_json_path(str(root), "nut")
    with open(path) as f:
        return str(root), path, json.load(f)


def rewrite(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def test_a_realiad_split_lists_each_image_once(split):
    root, path, data = split
    again = dict(data["train"][0])
    rewrite(path, {**data, "test": [*data["test"], again]})
    with pytest.raises(UserError, match=f"split file {path} lists {again['image_path']} twice: entry 0 of 'train' "
                                        f"and entry {len(data['test'])} of 'test'"):
        ds.realiad_samples(root, "nut", "test")
    bad = [e for e in data["test"] if e["anomaly_class"] != "OK"][0]
    contradiction = dict(bad, anomaly_class="OK", mask_path=None)
    rewrite(path, {**data, "test": [*data["test"], contradiction]})
    with pytest.raises(UserError, match=f"lists {bad['image_path']} as normal and as anomalous: entry "
                                        f"{data['test'].index(bad)} of 'test' and entry {len(data['test'])}"):
        ds.realiad_samples(root, "nut", "train")


def test_realiad_split_paths_stay_inside_the_dataset_unless_allowed(split, tmp_path):
    root, path, data = split
    outside = tmp_path / "outside.png"
    shutil.copy(os.path.join(root, "realiad_1024", "nut", data["train"][0]["image_path"]), outside)
    escaping = dict(data["train"][0], image_path="../../../outside.png")
    rewrite(path, {**data, "train": [*data["train"][1:], escaping]})
    with pytest.raises(UserError, match=f"entry {len(data['train']) - 1} of 'train' leads out of the dataset folder "
                                        f".*--allow_outside_paths"):
        ds.realiad_samples(root, "nut", "train")
    samples, _ = ds.realiad_samples(root, "nut", "train", allow_outside=True)
    assert os.path.samefile(samples[-1].image_path, outside)
    inside = dict(data["train"][0], image_path="../nut/" + data["train"][0]["image_path"])  # '..' that stays inside
    rewrite(path, {**data, "train": [inside, *data["train"][1:]]})
    assert len(ds.realiad_samples(root, "nut", "train")[0]) == len(data["train"])


# ----------------------------------------------------------------------------------------------- files we wrote

@pytest.mark.parametrize("change,expected", [
    (lambda t: t["all"]["image"].update(threshold=float("nan")),
     " (entry 'all'): image.threshold is nan, expected a finite number > 0 or null"),
    (lambda t: t["classes"]["nut"]["image"].update(threshold=-0.5),
     " (entry 'nut'): image.threshold is -0.5, expected a finite number > 0 or null"),
    (lambda t: t["all"]["pixel"].update(threshold=float("inf")),
     " (entry 'all'): pixel.threshold is inf, expected a finite number > 0 or null"),
    (lambda t: t["all"]["image"].update(threshold="0.3"),
     " (entry 'all'): image.threshold is '0.3', expected a finite number > 0 or null"),
    (lambda t: t["all"]["pixel"].pop("normal_values"),
     " (entry 'all') has no pixel.normal_values.p50 (a finite number or null)"),
    (lambda t: t["settings"].update(max_ratio=5), ": settings.max_ratio is 5, expected a finite number in [0, 1]"),
    (lambda t: t["all"].update(color_range=[1, 0]),
     " (entry 'all'): color_range is [1, 0], expected null or [low, high] with low < high"),
])
def test_a_damaged_thresholds_file_is_one_line_naming_the_file_and_the_key(change, expected, trained, tmp_path):
    with open(trained / "thresholds.json") as f:
        data = json.load(f)
    change(data)
    path = tmp_path / "thresholds.json"
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(UserError) as e:
        predict.Detector(str(trained), thresholds=str(path), device="cpu")
    assert str(e.value) == f"the thresholds file {path}{expected}; evaluate the model again or pass --threshold"


def test_thresholds_checked_by_the_predict_and_export_commands(trained, tmp_path):
    with open(trained / "thresholds.json") as f:
        data = json.load(f)
    data["all"]["image"]["threshold"] = float("nan")
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(data))
    image = tmp_path / "image.png"  # a valid input (predict.py checks its inputs first): the thresholds are wrong
    Image.new("RGB", (64, 64)).save(image)
    for argv in (["predict.py", "--input", str(image), "--out", str(tmp_path / "p")],
                 ["export.py", "--out", str(tmp_path / "m.onnx")]):
        r = run_cli(*argv, "--checkpoint", str(trained), "--thresholds", str(path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"the thresholds file {path} (entry 'all'): image.threshold is nan" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("key,value,expected", [
    ("mask_ratio", 5, "mask_ratio is 5, expected a finite number in [0, 1)"),
    ("image_size", "448", "image_size is '448', expected an integer >= 14"),
    ("test_mask", True, "test_mask is True, expected one of 'on', 'off'"),
    ("crop_size", 39.2, "crop_size is 39.2, expected an integer >= 14"),
])
def test_config_json_model_settings_are_checked(key, value, expected, trained, tmp_path):
    run = copy_run(trained, tmp_path)
    with open(run / "config.json") as f:
        config = json.load(f)
    config["model"][key] = value
    config["model"]["a_key_of_a_newer_version"] = {"anything": 1}  # unknown keys are left alone
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        predict.Detector(str(run), device="cpu", threshold=1.0)
    assert str(e.value) == (f"the run's settings {run / 'config.json'} (\"model\" entry): {expected}; fix or remove "
                            f"that file, or train the model again")


@pytest.mark.parametrize("damage,expected", [
    (lambda s: s.pop("settings"), "has no settings (a mapping of the run's settings)"),
    (lambda s: s.update(iteration=-3), "iteration is -3, expected an integer >= 0"),
    (lambda s: s.update(rng=s["rng"] * 2), "rng holds 2 states for 1 processes"),
])
def test_a_damaged_training_state_is_one_line(damage, expected, demo, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    state = load(run / "train_state.pth")
    damage(state)
    torch.save(state, run / "train_state.pth")
    assert exit_status(dinomaly, [*common(demo, tmp_path, "copy"), "--resume"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: the training state {run / 'train_state.pth'}") and expected in line


# ----------------------------------------------------------------------------------------------- names, pictures

BAD_NAME = b"caf\xe9 \xff.png"  # not valid UTF-8


def test_file_names_of_any_bytes_never_crash(demo, tmp_path):
    """In a subprocess: OpenCV's text drawing crashed the process (segfault) on such names."""
    data = tmp_path / "data"
    shutil.copytree(demo["mvtec"], data)
    for folder in (data / "nut" / "train" / "good", data / "nut" / "test" / "good"):
        first = sorted(os.listdir(folder))[0]
        os.rename(folder / first, os.path.join(os.fsencode(folder), BAD_NAME))
    r = run_cli("dinomaly_mvtec_uni.py", "--data_path", str(data), "--encoder", "dinov2reg_vit_small_14",
                "--encoder_weights", "random", "--image_size", "32", "--crop_size", "28", "--total_iters", "1",
                "--batch_size", "2", "--save_heatmaps", "1", "--save_dir", str(tmp_path), "--save_name", "run", *RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    rows = read_csv(run / "scores.csv")
    assert any(row[1].endswith(r"caf\udce9 \udcff.png") for row in rows)
    assert {"metrics.csv", "thresholds.json", "gallery"} <= set(os.listdir(run))
    assert os.path.isfile(run / "gallery" / "nut.png")
    r = run_cli("predict.py", "--checkpoint", str(run), "--input", str(data / "nut" / "test" / "good"),
                "--out", str(tmp_path / "p"), "--num_workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    overlays = os.listdir(os.fsencode(tmp_path / "p" / "overlays"))
    assert os.path.splitext(BAD_NAME)[0] + b".png" in overlays
    assert len(read_csv(tmp_path / "p" / "predictions.csv")) == 1 + len(overlays)


def test_the_log_gets_every_line(tmp_path):
    run_module.setup_logging(str(tmp_path / "log.txt"))
    try:
        run_module.log.info("file " + os.fsdecode(BAD_NAME))
        run_module.log.info("next")
    finally:
        run_module.setup_logging(None)
    assert (tmp_path / "log.txt").read_text().splitlines() == ["file caf\\udce9 \\udcff.png", "next"]


def test_predictions_csv_keeps_the_rows_of_a_run_that_crashes(trained, demo, tmp_path, monkeypatch):
    images = sorted(os.path.join(d, n) for d, _, names in os.walk(os.path.join(demo["mvtec"], "weave", "test"))
                    for n in names)
    calls = []
    real = checkpoint_detector.ModelDetector.predict_prepared

    def crash_on_the_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(self, *args)

    monkeypatch.setattr(checkpoint_detector.ModelDetector, "predict_prepared", crash_on_the_second_batch)
    with pytest.raises(SystemExit):
        cli.predict_main(["--checkpoint", str(trained), "--input", *images, "--out", str(tmp_path), "--batch_size", "1",
                      "--num_workers", "0", "--device", "cpu"])
    rows = read_csv(tmp_path / "predictions.csv")
    assert rows[0][0] == "image_path" and [r[0] for r in rows[1:]] == images[:1]


def test_an_overlay_asks_for_no_more_memory_than_its_image_needs_several_times_over():
    """A 2 x 3000 px image next to 3000 x 2: the old colour bar asked for 179 GiB. Run with the address space
    limited to what the process has plus 512 MB."""
    code = """
import resource, sys
import numpy as np
from dinomaly.visualize import overlay_picture
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
for h, w in [(2, 3000), (3000, 2), (1, 1), (5000, 7)]:
    a = np.random.default_rng(0).random((h, w), dtype=np.float32)
    pic = overlay_picture(np.zeros((h, w, 3), np.uint8), a, np.ones((h, w), bool), a > 0.5, (0.1, 0.9), "x", True,
                          {"threshold": 0.5})
    assert pic.size <= 10 * max(h * w * 3, 256 * 256 * 3) + 3_000_000, (h, w, pic.shape)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- one line, exit 2

def test_a_symbolic_link_that_loops_is_one_line(demo, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo["mvtec"], data)
    loop = data / "nut" / "train" / "good" / "loop.png"
    os.symlink("loop.png", loop)
    assert exit_status(dinomaly, [*common(demo, tmp_path, "run")[2:], "--data_path", str(data)]) == 2
    assert f"cannot read {loop} (Too many levels of symbolic links" in error_line(capsys)
    assert str(loop) in image_files.find_images([str(data / "nut")])  # predict.py reports and skips it (test_silent.py)


def refuse_writes_under(monkeypatch, folder):
    """A read-only folder (chmod does not stop root): opening a file there for writing fails."""
    def read_only(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.abspath(path).startswith(str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)
    def file_handler(path, *args, **kwargs):
        read_only(path, "a").close()
        return real_handler(path, *args, **kwargs)

    real_handler = run_module.logging.FileHandler
    for module in (run_module, runlock):
        monkeypatch.setattr(module, "open", read_only, raising=False)
    monkeypatch.setattr(run_module.logging, "FileHandler", file_handler)


@pytest.mark.parametrize("how", ["--eval_only", "--resume"])
def test_a_read_only_run_folder_is_one_line(how, demo, trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path)
    refuse_writes_under(monkeypatch, run)
    argv = [*common(demo, tmp_path, "copy"), how] + (["--checkpoint", str(run)] if how == "--eval_only" else [])
    assert exit_status(dinomaly, argv) == 2
    assert f"cannot write into the run folder {run} (Permission denied); make it writable" in error_line(capsys)


def test_export_out_must_be_a_writable_file(trained, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.export_main(["--checkpoint", str(trained), "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a folder; pass a file name" in error_line(capsys)
    monkeypatch.setattr(export.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit):
        cli.export_main(["--checkpoint", str(trained), "--out", str(tmp_path / "m.onnx")])
    assert f"cannot write {tmp_path / 'm.onnx'} (permission denied)" in error_line(capsys)


def test_a_negative_seed_is_one_line(demo, tmp_path, capsys):
    assert exit_status(dinomaly, [*common(demo, tmp_path, "run"), "--seed", "-1"]) == 2
    assert "--seed: -1 is less than 0" in capsys.readouterr().err
