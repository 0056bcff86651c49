"""TensorBoard event files (dinomaly/events.py): a tiny run's training and evaluation write events into the run
folder that tensorboard's own reader reads back with the values of log.txt and metrics.csv; --tensorboard off
writes none, and --tensorboard on without the package is a one-line error."""
import csv
import importlib.util
import re

import pytest

from dinomaly import cli, events, models, runlock
from dinomaly.errors import UserError
from dinomaly.options import RunOptions
from dinomaly.run import Run

import dinomaly_mvtec_uni
from conftest import TINY, TINY_CFG
from prepare_data.make_demo_data import make_demo_data

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("data")), size=64, seed=0, n_train=8, n_test_good=2,
                          n_test_bad=2)


def train(demo, save_dir, *flags):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        cli.run_script(dinomaly_mvtec_uni, [
            "--data_path", demo["mvtec"], "--encoder", TINY, "--encoder_weights", "random", "--total_iters", "3",
            "--log_every", "1", "--batch_size", "4", "--image_size", "64", "--crop_size", "56", "--num_workers", "0",
            "--device", "cpu", "--classes", "weave", "nut", "--save_dir", str(save_dir), "--save_name", "run",
            *flags])
    return save_dir / "run"


def test_training_and_evaluation_write_events_tensorboard_reads_back(demo, tmp_path):
    run = train(demo, tmp_path)
    events = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    # the log lines: iter [i/3], loss: L, lr: R, data wait W%
    lines = re.findall(r"iter \[(\d+)/3\], loss: ([\d.]+), lr: ([\d.e+-]+), data wait (\d+)%",
                       (run / "log.txt").read_text())
    assert [int(i) for i, *_ in lines] == [1, 2, 3]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    for e, (_, logged, lr, wait) in zip(loss, lines):
        assert e.value == pytest.approx(float(logged), abs=5e-5)
    for e, (_, _, lr, wait) in zip(events.Scalars("train/lr"), lines):
        assert e.value == pytest.approx(float(lr), rel=5e-3)
    for e, (_, _, _, wait) in zip(events.Scalars("train/data_wait"), lines):
        assert 100 * e.value == pytest.approx(float(wait), abs=0.5)
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(norms) == 3 and all(n > 0 for n in norms)  # before clipping (0.1): the model's real gradient
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["weave", "nut", "mean"]
    for r in rows:
        for metric in ("I-AUROC", "P-AUROC", "AUPRO", "mAD"):
            (e,) = events.Scalars(f"eval/{metric}/{r['class']}")
            assert e.step == 3 and e.value == pytest.approx(float(r[metric]), rel=1e-6)
    assert all(t.startswith(("train/", "eval/")) for t in tags)


@pytest.mark.parametrize("mode, written", [("auto", True), ("on", True), ("off", False)])
def test_the_flag_decides_whether_events_are_written(tmp_path, mode, written):
    try:
        run = Run(RunOptions(save_dir=str(tmp_path), save_name="run", device="cpu", tensorboard=mode), "config.json")
        run.events.scalars(1, {"train/loss": 0.5, "train/grad_norm": None})
    finally:
        runlock.release_all()
    assert bool(list((tmp_path / "run").glob("events.out.tfevents.*"))) == written
    assert cli.parse(dinomaly_mvtec_uni.__doc__, dinomaly_mvtec_uni.RECIPE, dinomaly_mvtec_uni.DEFAULTS,
                     argv=["--tensorboard", mode]).run.tensorboard == mode


def test_on_without_the_package_is_a_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert not events.wanted("auto")
    with pytest.raises(UserError, match="--tensorboard on needs the tensorboard package"):
        events.wanted("on")
