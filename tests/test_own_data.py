"""Your own images: plain class folders of good images, thresholds from good images alone (a false-alarm rate),
the classes found in the data folder, class finding for prediction, and masks that always show where."""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinomaly import class_finder, cli, samples
from dinomaly import dataset as ds
from dinomaly import thresholds as th
from dinomaly.options import DataOptions
from dinomaly.errors import UserError

import crr_realiad_test
import dinomaly_mvtec_uni
from conftest import TINY, exit_status_of
from prepare_data.make_demo_data import make_demo_data

SMALL = ["--encoder", TINY, "--encoder_weights", "random", "--image_size", "64", "--crop_size", "56",
         "--num_workers", "0", "--device", "cpu", "--total_iters", "2", "--batch_size", "4"]
N_GOOD = 11  # good images per class: 2 held out (round(0.2 * 11)), 9 trained on


def call(module, argv):
    return exit_status_of(lambda a: cli.run_script(module, a), argv)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("data")), size=64, seed=0, n_train=N_GOOD, n_test_good=2,
                          n_test_bad=2)


@pytest.fixture(scope="module")
def parts(demo, tmp_path_factory):
    """Plain folders of good images, <root>/<class>/*.png, for two classes."""
    root = tmp_path_factory.mktemp("parts")
    for c in ("weave", "nut"):
        shutil.copytree(os.path.join(demo["mvtec"], c, "train", "good"), root / c)
    return root


@pytest.fixture(scope="module")
def good_only_run(parts, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        from dinomaly import models

        from conftest import TINY_CFG
        mp.setitem(models.ENCODERS, TINY, TINY_CFG)
        assert call(dinomaly_mvtec_uni, ["--data_path", parts, *SMALL, "--save_dir",
                                                                       save_dir, "--save_name", "run"]) == 0
    return save_dir / "run"


# ----------------------------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("n,rate", [(99, 0.01), (200, 0.01), (19, 0.05), (50, 0.1), (7, 0.2)])
def test_false_alarm_threshold_is_the_conformal_quantile(n, rate):
    scores = np.random.default_rng(n).normal(size=n)
    threshold, enough = th.false_alarm_threshold(scores, rate)
    k = math.ceil((n + 1) * (1 - rate) - 1e-9)
    assert enough and threshold == np.quantile(scores, k / n, method="inverted_cdf") == np.sort(scores)[k - 1]
    assert th.images_needed(rate) <= n


def test_false_alarm_rate_holds_for_new_good_images():
    """Over many calibration sets, new good images (same distribution) reach the threshold at most `rate` of the
    time on average; with too few images the highest score is taken, flagged as not enough."""
    rng, rate, n = np.random.default_rng(0), 0.05, 39
    exceed = [np.mean(rng.normal(size=2000) >= th.false_alarm_threshold(rng.normal(size=n), rate)[0])
              for _ in range(400)]
    assert rate - 0.015 < np.mean(exceed) <= rate + 0.005  # (n + 1 - k) / (n + 1) = 2 / 40: exactly rate here
    scores = rng.normal(size=8)
    assert th.false_alarm_threshold(scores, 0.01) == (scores.max(), False) and th.images_needed(0.01) == 99
    assert th.false_alarm_threshold(np.zeros(0), 0.01) == (None, False)


def test_calibration_without_anomalies_uses_the_false_alarm_rate_and_keeps_f1_with_them():
    values, flags, normal = np.zeros(0, np.float32), np.zeros(0, bool), np.zeros(0, bool)
    scores = np.arange(1.0, 21.0)
    good = th.Calibration({}, false_alarm_rate=0.1).add("c", np.zeros(20), scores, values, flags, normal)
    assert good["image"]["threshold"] == 19.0  # k = ceil(21 * 0.9) = 19
    assert good["image"]["method"] == "false_alarm_rate" and good["image"]["enough_images"]
    mixed = th.Calibration({}, false_alarm_rate=0.1).add("c", np.array([0, 0, 1, 1]), np.array([1.0, 2, 3, 4]),
                                                          values, flags, normal)
    assert mixed["image"]["method"] == "f1max" and mixed["image"]["threshold"] == th.f1max_threshold(
        np.array([0, 0, 1, 1]), np.array([1.0, 2, 3, 4]))[0]


def test_mask_level_is_the_pixel_threshold_capped_by_the_image_threshold():
    assert th.mask_level(0.43, 0.11) == 0.11 and th.mask_level(0.05, 0.11) == 0.05 and th.mask_level(None, 0.2) == 0.2


# ----------------------------------------------------------------------------------------------- folders

def test_plain_class_folders_train_with_held_out_thresholds(good_only_run, parts, capsys):
    run = good_only_run
    log = (run / "log.txt").read_text()
    assert "classes: nut, weave (the class folders in" in log
    assert "nan" not in log and "Warning" not in log  # one line per class, and no matplotlib warning
    assert "weave: no metrics (no defect images); image threshold" in log and "Mean: no metrics" in log
    assert "warning: weave: only 2 good images set the threshold, fewer than the 99" in log
    scores = rows(run / "scores.csv")
    data = json.loads((run / "thresholds.json").read_text())
    for c in ("weave", "nut"):
        held = [r for r in scores if r["class"] == c]
        assert len(held) == 2 and all(r["label"] == "0" for r in held)
        assert {os.path.dirname(r["image_path"]) for r in held} == {str(parts / c)}
        # the same images, again: held out with the seed, not among the training images
        options = DataOptions(dataset="mvtec", data_path=str(parts), val=None, val_share=0.2,
                              realiad_resolution="realiad_1024", json_dir="realiad_jsons")
        kept, out = samples.split_training(options, 1, c)
        assert [s.image_path for s in out] == [r["image_path"] for r in held]
        assert len(kept) == N_GOOD - 2 and not {s.image_path for s in kept} & {s.image_path for s in out}
        entry = data["classes"][c]["image"]
        want = th.false_alarm_threshold([float(r["score"]) for r in held], 0.01)[0]
        assert entry["threshold"] == want and entry["method"] == "false_alarm_rate" and entry["n_normal"] == 2
    metrics = rows(run / "metrics.csv")
    assert [m["class"] for m in metrics] == ["nut", "weave", "mean"] and all(m["I-AUROC"] == "" for m in metrics)
    assert (run / "curves" / "weave.png").is_file() and (run / class_finder.FILE).is_file()
    # predict.py needs no --threshold: the thresholds rest on the good images
    out = run.parent / "pred"
    cli.predict_main(["--checkpoint", str(run), "--input", str(parts / "nut"), "--out", str(out), "--device", "cpu",
                  "--num_workers", "0"])
    assert {r["class"] for r in rows(out / "predictions.csv")} == {"nut"}


def test_val_folder_sets_the_threshold_instead_of_held_out_images(parts, tmp_path):
    val = tmp_path / "val"
    shutil.copytree(parts / "nut", val / "nut")
    data = DataOptions(dataset="mvtec", data_path=str(parts), val=str(val), val_share=0.2,
                       realiad_resolution="realiad_1024", json_dir="realiad_jsons", classes=("nut",))
    assert len(samples.split_training(data, 1, "nut")[0]) == N_GOOD  # nothing held out
    found, missing = samples.test_samples(data, 1, "nut")
    assert len(found) == N_GOOD and missing == 0 and {s.label for s in found} == {0}
    with pytest.raises(UserError, match="--val folder of class weave not found"):
        samples.test_samples(data, 1, "weave")


def test_classes_are_found_in_the_data_folder(parts, demo, tmp_path):
    def classes(root, given=None, dataset="mvtec"):
        return samples.find_classes(DataOptions(dataset=dataset, data_path=str(root), classes=given))
    assert classes(parts) == ["nut", "weave"]  # none of MVTec AD's classes there: the class folders
    assert classes(demo["mvtec"]) == ["nut", "weave", "woodgrain"]  # MVTec layout
    assert classes(parts, ["weave"]) == ["weave"]
    os.makedirs(tmp_path / "bottle")
    assert classes(tmp_path) == ds.MVTEC_CLASSES  # a standard class: the standard list, as before
    flat = tmp_path / "flat"
    shutil.copytree(parts / "nut", flat)
    with pytest.raises(UserError, match=f"{flat} holds images but no class folders: move them into {flat}/<class>/"):
        classes(flat)


def test_a_data_path_one_level_too_high_names_the_folder_it_skipped(parts, tmp_path, capsys):
    """<root>/parts/<class>/ and <root>/new_images/*.png: new_images is a class folder, parts one level up from
    its classes; the run says so and which --data_path was meant."""
    from dinomaly.run import setup_logging
    setup_logging(None)
    shutil.copytree(parts, tmp_path / "parts")
    shutil.copytree(parts / "nut", tmp_path / "new_images")
    assert samples.find_classes(DataOptions(dataset="mvtec", data_path=str(tmp_path))) == ["new_images"]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {tmp_path / 'parts'} not used: it holds class folders of its own; for those classes pass "
        f"--data_path {tmp_path / 'parts'}"]


def test_mvtec_layout_given_to_a_real_iad_job_suggests_dataset_mvtec(demo, tmp_path, capsys):
    code = call(crr_realiad_test, ["--data_path", demo["mvtec"], "--classes", "nut",
                                                              "--save_dir", tmp_path, "--device", "cpu"])
    assert code == 2 and "pass --dataset mvtec" in capsys.readouterr().err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- class finding

class MeanColour:
    """A stand-in for an AnomalyMapper whose pooled features are the image's mean colour, normalised."""

    def features(self, x):
        return F.normalize(x.mean(dim=(2, 3)), dim=1)

    def __call__(self, x, mask_seeds=None, features=False):
        return None, None, self.features(x)


def coloured_images(folder, colour, n, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(np.array(colour) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return [ds.Sample(os.path.join(folder, f"{i}.png"), 0, None, "") for i in range(n)]


def test_class_finder_on_generated_classes(tmp_path):
    colours = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 210)}
    train = {c: coloured_images(tmp_path / "train" / c, rgb, 12, i) for i, (c, rgb) in enumerate(colours.items())}
    data = class_finder.build(MeanColour(), train, 16, 14, torch.device("cpu"), batch_size=5)
    torch.save(data, tmp_path / class_finder.FILE)
    data = class_finder.load(str(tmp_path / class_finder.FILE))  # weights_only
    assert data["classes"] == list(colours) and data["prototypes"].shape == (3, 3)
    mapper = MeanColour()
    for c, rgb in colours.items():
        test = coloured_images(tmp_path / "test" / c, rgb, 6, 100)
        x = torch.stack([ds.load_tensor(s.image_path, 16, 14) for s in test])
        matches = class_finder.classify(data, mapper(x, features=True)[2])
        assert [m.class_name for m in matches] == [c] * 6 and all(m.well for m in matches)
        d = (1 - mapper(x, features=True)[2] @ data["prototypes"].T).sort(dim=1).values  # distances, nearest first
        for m, (d1, d2, _) in zip(matches, d.tolist()):
            assert m.distance == pytest.approx(d1, abs=1e-6) and m.distance <= class_finder.FAR * m.radius
            assert 0 < m.confidence < 1 and m.confidence == pytest.approx(1 - d1 / d2, abs=1e-6)
    grey = coloured_images(tmp_path / "grey", (128, 128, 128), 1, 7)
    x = ds.load_tensor(grey[0].image_path, 16, 14)[None]
    (odd,) = class_finder.classify(data, mapper(x, features=True)[2])
    assert not odd.well  # far from every class: prediction warns
    with pytest.raises(UserError, match="another model"):
        class_finder.classify(data, torch.ones(1, 5))
    torch.save({"classes": ["a"], "prototypes": torch.ones(2, 3), "radius": torch.ones(2)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="is not a class prototypes file"):
        class_finder.load(str(tmp_path / "bad.pt"))


# ----------------------------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("script, expect", [("dinomaly_mvtec_uni.py", "--false_alarm_rate"),
                                             ("predict.py", "--class_name"), ("export.py", "--check_batch")])
def test_scripts_parse_before_importing_torch(script, expect):
    """--help and argument errors answer without PyTorch (cli.main and cli.launch import the jobs, predict or
    export after parsing)."""
    import subprocess
    import sys

    from conftest import ROOT
    code = (f"import sys, runpy; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and expect in r.stdout


def test_flag_names_match_the_modules_they_name():
    from dinomaly import arguments
    assert set(arguments.DATASET_NAMES) == set(ds.DATASETS)
    from dinomaly.models.vitill import GROUPINGS
    assert arguments.LC_CHOICES == tuple(sorted(GROUPINGS))


def test_metrics_line_names_what_cannot_be_computed():
    from dinomaly.utils import METRIC_NAMES
    nan = float("nan")
    partial = dict(zip(METRIC_NAMES, [0.9, 0.8, 0.7, nan, nan, nan, nan]))
    entry = {"image": {"n_anomalous": 4, "n_normal": 3, "threshold": 0.5}}
    assert samples.metrics_line("nut", partial, entry) == (
        "nut: I-AUROC 0.9000, I-AP 0.8000, I-F1max 0.7000; not computable: P-AUROC, P-AP, P-F1max, AUPRO "
        "(no ground-truth masks)")
    full = dict(zip(METRIC_NAMES, [0.5] * 7))
    assert samples.metrics_line("nut", full, entry).endswith("AUPRO 0.5000, mAD 0.5000")
    assert samples.metrics_line("Mean", dict.fromkeys(METRIC_NAMES, nan)) == \
        "Mean: no metrics (no class has defect images)"


def test_the_histogram_of_one_kind_of_image_names_it_and_counts_whole_images(tmp_path):
    """Without defect images the curves are a histogram: its title says which images (good ones, e.g. held out of
    training, not "test images") and its count axis has whole numbers only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinomaly import report
    figures = []

    class Keep:  # pyplot, keeping the figure to look at
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            figures.append(fig)

    entry = {"image": {"threshold": 0.556, "method": "false_alarm_rate"}}
    scores = np.array([0.27, 0.34, 0.35, 0.36, 0.42, 0.47, 0.52, 0.556])  # the smoke run's: 2 images at most a bin
    report.plot_scores(str(tmp_path / "nut.png"), "nut", scores, entry, Keep(), "good")
    ax = figures[0].axes[0]
    try:
        assert ax.get_title() == "nut: scores of good images (no curves: one kind)"
        ticks = ax.get_yticks()
        assert len(ticks) >= 2 and np.all(ticks == np.round(ticks)), ticks
        assert (tmp_path / "nut.png").is_file()
    finally:
        plt.close(figures[0])
