"""Never lose a run: a killed or interrupted training resumes to exactly the weights of an uninterrupted one;
a run folder with results is not overwritten silently; non-finite losses are skipped, then stop the run."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from test_end_to_end import RUN, run_script

from dinomaly import models, train

import crr_realiad_stage1
import crr_realiad_stage2
import dinomaly_mvtec_uni
from conftest import ROOT, TINY
from prepare_data.make_demo_data import make_demo_data

# 16 training images (8 per class), batch 4: 4 iterations per epoch
SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "32", "--crop_size", "28",
         "--batch_size", "4", "--log_every", "1", *RUN]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, here and in the subprocesses: every process then sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), size=32, seed=0, n_train=8, n_test_good=1,
                          n_test_bad=1)


def dinomaly(argv):
    run_script(dinomaly_mvtec_uni, argv)


def stage1(argv):
    run_script(crr_realiad_stage1, argv)


def stage2(argv):
    run_script(crr_realiad_stage2, argv)


def signal_run(sig: str, at: int, script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """The script in a fresh process (tiny encoder) that gets `sig` when iteration `at` starts."""
    return subprocess.run([sys.executable, os.path.join("tests", "signal_run.py"), sig, str(at), script, *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def exit_status(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


def final_line(stderr: str) -> str:
    """The one error (or interruption) line on stderr; the rest are warnings and progress bars."""
    lines = [line for line in stderr.splitlines() if line.startswith(("error", "interrupted", "Traceback"))]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def error_line(capsys) -> str:
    return final_line(capsys.readouterr().err)


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_run_resumes_bit_exactly_and_is_never_overwritten_silently(demo, tmp_path, capsys):
    common = ["--data_path", demo["mvtec"], "--save_dir", str(tmp_path), "--total_iters", "10",
              "--save_every", "3", *SMALL]
    dinomaly([*common, "--save_name", "whole"])
    assert "input check: " in (tmp_path / "whole" / "log.txt").read_text()

    # SIGKILL while iteration 7 runs: the state saved after iteration 6 (epoch 1, 2 batches in) is what is left
    r = signal_run("SIGKILL", 7, "dinomaly_mvtec_uni.py", [*common, "--save_name", "killed"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run = tmp_path / "killed"
    assert load(run / "train_state.pth")["iteration"] == 6
    assert not any(name.endswith(".tmp") for name in os.listdir(run))
    capsys.readouterr()

    # the same command again refuses, naming what is there and the two ways on
    assert exit_status(dinomaly, [*common, "--save_name", "killed"]) == 2
    line = error_line(capsys)
    assert "already holds model.pth, train_state.pth" in line and "--resume" in line and "--overwrite" in line
    # a resume must keep what shapes the run
    assert exit_status(dinomaly, [*common, "--save_name", "killed", "--resume", "--seed", "2"]) == 2
    assert "cannot resume with --seed 2: the saved training state was made with --seed 1" in error_line(capsys)

    dinomaly([*common, "--save_name", "killed", "--resume"])
    assert "resuming at iteration 6 of 10" in (run / "log.txt").read_text()
    assert_same_weights(load(run / "model.pth"), load(tmp_path / "whole" / "model.pth"))

    # --overwrite starts afresh; --resume without a state refuses
    dinomaly([*common, "--save_name", "killed", "--overwrite", "--total_iters", "1"])
    assert load(run / "train_state.pth")["iteration"] == 1
    assert exit_status(dinomaly, [*common, "--save_name", "new", "--resume"]) == 2
    assert "nothing to resume" in error_line(capsys)


@pytest.fixture(scope="module")
def crr_whole(demo, tmp_path_factory):
    """An uninterrupted CRR Stage I run (8 iterations), then Stage II (6 iterations) in a copy of its folder."""
    save_dir = tmp_path_factory.mktemp("crr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, __import__("conftest").TINY_CFG)
        stage1(crr_args(demo, save_dir, "whole"))
        shutil.copytree(save_dir / "whole", save_dir / "stage1", ignore=shutil.ignore_patterns("train_state*"))
        stage2([*stage2_args(demo, save_dir, "whole")])
    return save_dir


def crr_args(demo, save_dir, name):
    return ["--data_path", demo["realiad"], "--save_dir", str(save_dir), "--save_name", name, "--total_iters", "8",
            "--mask_ratio", "0.4", "--anomaly_source_path", "none", *SMALL]


def stage2_args(demo, save_dir, name):
    return ["--data_path", demo["realiad"], "--save_dir", str(save_dir), "--save_name", name, "--total_iters", "6",
            "--batch_size", "4", "--log_every", "1", "--anomaly_source_path", "none", *RUN]


def test_ctrl_c_saves_the_state_and_resume_continues(demo, crr_whole, tmp_path):
    """CRR Stage I (synthetic anomalies per epoch, training masks, dropout) interrupted by SIGINT mid-epoch."""
    argv = crr_args(demo, tmp_path, "interrupted")
    r = signal_run("SIGINT", 5, "crr_realiad_stage1.py", argv)
    assert r.returncode == 130, r.stderr[-2000:]
    line = final_line(r.stderr)
    assert line.startswith("interrupted; the training state at iteration") and line.endswith("--resume")
    done = load(tmp_path / "interrupted" / "train_state.pth")["iteration"]
    assert 5 < done < 8  # the step under way when the signal came ends first
    stage1([*argv, "--resume"])
    assert_same_weights(load(tmp_path / "interrupted" / "model.pth"), load(crr_whole / "whole" / "model.pth"))


def test_stage2_resumes_after_ctrl_c(demo, crr_whole, tmp_path, monkeypatch, capsys):
    shutil.copytree(crr_whole / "stage1", tmp_path / "run")
    argv = stage2_args(demo, tmp_path, "run")
    step = train.train_step

    def interrupted(batch, it, *args):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(batch, it, *args)

    monkeypatch.setattr(train, "train_step", interrupted)
    assert exit_status(stage2, argv) == 130
    assert load(tmp_path / "run" / "train_state_stage2.pth")["iteration"] == 5  # mid-epoch
    monkeypatch.setattr(train, "train_step", step)
    capsys.readouterr()
    assert exit_status(stage2, argv) == 2
    assert "already holds train_state_stage2.pth; pass --resume" in error_line(capsys)
    stage2([*argv, "--resume"])
    assert_same_weights(load(tmp_path / "run" / "Seg_model_last.pth"), load(crr_whole / "whole" / "Seg_model_last.pth"))
    assert_same_weights(load(tmp_path / "run" / "model.pth"), load(crr_whole / "stage1" / "model.pth"))


def test_non_finite_losses_are_skipped_then_stop_the_run(demo, tmp_path, monkeypatch, capsys):
    bad = {1, *range(4, 14)}  # one alone (skipped), then ten in a row (the run stops after iteration 14)
    calls = []
    loss = train.global_cosine_hm

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) - 1 in bad else value

    monkeypatch.setattr(train, "global_cosine_hm", sometimes_nan)
    argv = ["--data_path", demo["mvtec"], "--save_dir", str(tmp_path), "--save_name", "nan", "--total_iters", "20",
            *SMALL]
    assert exit_status(dinomaly, argv) == 2
    line = error_line(capsys)
    assert "not finite in 10 iterations in a row (up to iteration 14)" in line and "--attn_eps 1e-6" in line
    state = load(tmp_path / "nan" / "train_state.pth")
    assert state["iteration"] == 14
    steps = {s["step"] for s in state["optimizer"]["state"].values()}
    assert steps == {14 - 11}  # no optimiser step for any of the 11 skipped iterations
    assert all(torch.isfinite(v).all() for v in state["module"].values() if v.is_floating_point())
    log_text = (tmp_path / "nan" / "log.txt").read_text()
    assert "iter [2/20], loss: " in log_text and "skipped (non-finite loss): 1\n" in log_text
    assert "iter [5/20], loss: n/a" in log_text


class MachinesRun:
    """A Run of two processes on two machines with their own disks: this process (the main one or not) sees
    `folder`, the other process's view of the same question is other(this process's answer)."""

    def __init__(self, folder, other, resume=False, overwrite=False, is_main=True):
        from dinomaly.options import RunOptions
        self.options, self.dir, self.other = RunOptions(resume=resume, overwrite=overwrite), str(folder), other
        self.is_main, self.barriers = is_main, 0

    def path(self, name):
        return os.path.join(self.dir, name)

    def gather(self, obj):
        return [obj, self.other(obj)] if self.is_main else [self.other(obj), obj]

    def barrier(self):
        self.barriers += 1


def test_resume_and_overwrite_decide_alike_on_every_machine(tmp_path):
    from dinomaly import train_state
    from dinomaly.errors import UserError
    (tmp_path / "model.pth").write_bytes(b"x")
    # the other machine's folder has no state: every process is told, none waits for the others
    (tmp_path / train_state.RECONSTRUCTION).write_bytes(b"x")
    with pytest.raises(UserError, match="missing for 1 of 2 processes; --resume on several machines needs a"):
        train_state.start(MachinesRun(tmp_path, lambda visible: False, resume=True), train_state.RECONSTRUCTION,
                          ["model.pth"])
    # --overwrite: the main process's folder decides (the other sees nothing), both take part in the barrier
    run = MachinesRun(tmp_path, lambda found: [], overwrite=True)
    assert train_state.start(run, train_state.RECONSTRUCTION, ["model.pth"]) is None
    assert run.barriers == 1 and not os.listdir(tmp_path)
    # the other machine's process, its own folder empty, joins that barrier too (and deletes nothing)
    run = MachinesRun(tmp_path, lambda found: ["model.pth"], overwrite=True, is_main=False)
    assert train_state.start(run, train_state.RECONSTRUCTION, ["model.pth"]) is None and run.barriers == 1
