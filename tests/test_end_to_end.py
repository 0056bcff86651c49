"""Tiny end-to-end runs of the user scripts on generated data: run-folder files, reloading, CRR's three stages,
and the exit status of user errors."""
import csv
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dinomaly import dataset as ds
from dinomaly import checkpoints, cli, evaluate
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly.options import DataOptions, EvalOptions, RunOptions

import crr_realiad_stage1
import crr_realiad_stage2
import crr_realiad_test
import dinomaly_mvtec_uni
from conftest import ROOT, TINY

CLASSES = ["weave", "nut"]
RUN = ["--num_workers", "0", "--device", "cpu", "--classes", *CLASSES]  # what every job takes
SMALL = ["--encoder_weights", "random", "--image_size", "64", "--crop_size", "56", "--log_every", "1", *RUN]
METRICS_HEADER = ["class", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD"]


@pytest.fixture(scope="module")
def demo(demo64):
    return demo64


def run_script(module, argv):
    cli.run_script(module, argv)


def read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def dinomaly_run(tiny_run):
    """conftest's tiny run: dinomaly_mvtec_uni.py, 3 iterations at 64 -> 56 px on weave and nut, a heatmap a class."""
    return tiny_run


def test_dinomaly_run_folder(dinomaly_run):
    files = set(os.listdir(dinomaly_run))
    assert {"model.pth", "config.json", "log.txt", "metrics.csv", "scores.csv", "heatmaps"} <= files
    log_text = (dinomaly_run / "log.txt").read_text()
    assert "iter [3/3]" in log_text and "Mean: I-AUROC" in log_text
    rows = read_csv(dinomaly_run / "metrics.csv")
    assert rows[0] == METRICS_HEADER and [r[0] for r in rows[1:]] == [*CLASSES, "mean"]
    scores = read_csv(dinomaly_run / "scores.csv")
    assert scores[0] == ["class", "image_path", "label", "score"] and len(scores) == 1 + 2 * 7
    # the metrics follow from the scores (scikit-learn as the reference)
    for row in rows[1:3]:
        lab = [int(r[2]) for r in scores[1:] if r[0] == row[0]]
        sc = [float(r[3]) for r in scores[1:] if r[0] == row[0]]
        assert float(row[1]) == pytest.approx(roc_auc_score(lab, sc), abs=1e-12)
        assert all(0 <= float(c) <= 1 for c in row[1:8]) and row[8] != ""
    assert float(rows[3][1]) == pytest.approx((float(rows[1][1]) + float(rows[2][1])) / 2, abs=1e-12)
    assert len(os.listdir(dinomaly_run / "heatmaps" / "nut")) == 1
    # the checkpoint is in the official key layout and loads strictly
    sd = torch.load(dinomaly_run / "model.pth", weights_only=True)
    assert {k.split(".")[0] for k in sd} == {"encoder", "bottleneck", "decoder"}
    assert "bottleneck.0.fc1.weight" in sd and "encoder.register_tokens" in sd


def test_eval_only_reproduces_scores_and_handles_missing_ground_truth(dinomaly_run, demo, tmp_path):
    # The run folder alone: the sizes (64 -> 56, not the default 448 -> 392) and the encoder come from config.json.
    run_script(dinomaly_mvtec_uni, ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(dinomaly_run),
                                    "--save_dir", str(tmp_path), "--save_name", "again", *RUN])
    first, again = read_csv(dinomaly_run / "scores.csv"), read_csv(tmp_path / "again" / "scores.csv")
    np.testing.assert_allclose([float(r[3]) for r in again[1:]], [float(r[3]) for r in first[1:]], rtol=1e-6)
    assert "64 -> 56 px" in (tmp_path / "again" / "log.txt").read_text()
    # An explicit flag overrides the run's setting, and the log says so.
    run_script(dinomaly_mvtec_uni,
               ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(dinomaly_run / "model.pth"),
                "--crop_size", "42", "--save_dir", str(tmp_path), "--save_name", "other", *RUN, "--classes", "nut"])
    log_text = (tmp_path / "other" / "log.txt").read_text()
    assert "--crop_size 42 given; the model was trained with 56" in log_text and "64 -> 42 px" in log_text
    # a class without ground_truth: image metrics, empty pixel cells
    data = tmp_path / "no_gt"
    shutil.copytree(os.path.join(demo["mvtec"], "nut"), data / "nut")
    shutil.rmtree(data / "nut" / "ground_truth")
    run_script(dinomaly_mvtec_uni,
               ["--data_path", str(data), "--eval_only", "--checkpoint", str(dinomaly_run / "model.pth"),
                "--save_dir", str(tmp_path), "--save_name", "nogt", *SMALL[:-3], "--classes", "nut"])
    row = read_csv(tmp_path / "nogt" / "metrics.csv")[1]
    assert row[1] != "" and row[4:] == ["", "", "", "", ""]


def test_crr_three_stages(demo, dinomaly_run, tmp_path, capsys):
    common = ["--data_path", demo["realiad"], "--save_dir", str(tmp_path), "--save_name", "crr", *SMALL]
    run_script(crr_realiad_stage1,
               [*common, "--encoder", TINY, "--total_iters", "2", "--batch_size", "4", "--mask_ratio", "0.25",
                "--attn_eps", "1e-6", "--save_heatmaps", "1", "--anomaly_source_path", "none"])
    run = tmp_path / "crr"
    assert "\r" not in capsys.readouterr().err  # training and evaluation: no progress bars, not a terminal
    assert {"model.pth", "config.json", "metrics_recon.csv", "scores_recon.csv"} <= set(os.listdir(run))
    assert "foreground masks found for 16 of 16 training images" in (run / "log.txt").read_text()  # default path
    stage1 = file_hash(run / "model.pth")
    later = common[:6] + RUN  # Stage II and test take sizes, mask ratio and attention epsilon from Stage I
    run_script(crr_realiad_stage2, [*later, "--total_iters", "2", "--batch_size", "2",
                                    "--anomaly_source_path", "none",
                                    "--cache_images", "disk"])
    assert (run / "Seg_model_last.pth").exists() and file_hash(run / "model.pth") == stage1
    assert sorted(f.rsplit("_", 2)[0] for f in os.listdir(tmp_path / "image_cache")) == \
        ["foreground", "images", "images_cv2"]  # the clean and the synthesis' images, the object masks
    run_script(crr_realiad_test, [*later, "--save_heatmaps", "1"])
    for name in ("config_stage2.json", "config_test.json"):
        config = json.loads((run / name).read_text())["model"]
        assert (config["mask_ratio"], config["attn_eps"], config["image_size"], config["crop_size"]) == \
            (0.25, 1e-6, 64, 56), name
    # Stage I's heatmaps and the test's are kept apart
    recon_maps, test_maps = os.listdir(run / "heatmaps_recon" / "nut"), os.listdir(run / "heatmaps" / "nut")
    assert len(recon_maps) == len(test_maps) == 1
    seg = torch.load(run / "Seg_model_last.pth", weights_only=True)
    assert seg["up1.1.weight"].shape[0] == 2 * 32  # 8w with w = 2D/8, D = 32
    runs = [("t1", "on", "cpu"), ("t2", "on", "cpu"), ("t3", "off", "cpu"), ("t4", "off", "cpu"),
            ("t5", "on", "device")]
    one = [*later, "--classes", "nut"]  # its 7 test images: a batch of 5 splits them otherwise than one of 2
    for name, mask, rng in runs:  # t2: the run folder alone, its segmentation network found beside model.pth
        files = ["--checkpoint", str(run)] if name == "t2" else \
            ["--checkpoint", str(run / "model.pth"), "--seg_checkpoint", str(run / "Seg_model_last.pth")]
        run_script(crr_realiad_test, [*one, "--save_name", name, *files, "--test_mask", mask, "--mask_rng", rng,
                                      *(["--batch_size", "5"] if name == "t5" else [])])
    scores = {n: [float(r[3]) for r in read_csv(tmp_path / n / "scores.csv")[1:]] for n, _, _ in runs}
    assert len(scores["t1"]) == 7  # nut's test images
    assert scores["t1"] == scores["t2"] and scores["t3"] == scores["t4"]  # seeded, and deterministic without masking
    assert f"loaded {run / 'Seg_model_last.pth'}" in (tmp_path / "t2" / "log.txt").read_text()
    assert scores["t1"] != scores["t3"] and scores["t5"] not in (scores["t1"], scores["t3"])
    # per-image seeds: an image's score does not depend on its batch
    run_script(crr_realiad_test,
               [*one, "--save_name", "t5", "--checkpoint", str(run / "model.pth"), "--seg_checkpoint",
                str(run / "Seg_model_last.pth"), "--mask_rng", "device", "--batch_size", "2"])
    assert [float(r[3]) for r in read_csv(tmp_path / "t5" / "scores.csv")[1:]] == scores["t5"]
    assert read_csv(tmp_path / "t1" / "metrics.csv")[0] == METRICS_HEADER
    assert file_hash(run / "model.pth") == stage1
    # a Dinomaly model (no bottleneck masking, no segmentation network beside it) given to the CRR test
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_script(crr_realiad_test, [*later, "--save_name", "dino", "--checkpoint",
                                      str(dinomaly_run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert f"no segmentation network (Seg_model_7999.pth or Seg_model_last.pth) in {dinomaly_run} or " in err[0]
    assert "a Dinomaly model, not CRR's Stage I?" in err[0] and "run crr_realiad_stage2.py" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_the_fast_options(demo, dinomaly_run, tmp_path):
    """The paths only a GPU takes: bf16 autocast on CUDA, inductor-compiled blocks, loader processes into pinned
    memory, memory caches, CRR masks drawn on the GPU; and a CPU-trained run evaluated on the GPU."""
    gpu = ["--device", "cuda", "--num_workers", "2"]
    fast = [*gpu, "--precision", "bf16", "--compile", "--cache_images", "memory", "--mask_rng", "device"]
    common = ["--data_path", demo["realiad"], "--save_dir", str(tmp_path), "--save_name", "crr", *SMALL]
    run_script(crr_realiad_stage1, [*common, *fast, "--encoder", TINY, "--total_iters", "2", "--batch_size", "4",
                                    "--anomaly_source_path", "none"])
    run_script(crr_realiad_stage2,
               [*common[:6], *RUN, *fast, "--total_iters", "2", "--batch_size", "2", "--anomaly_source_path", "none"])
    scores = {}
    for batch in ("5", "2"):  # fp32: an image's mask and score do not depend on its batch on the GPU either
        run_script(crr_realiad_test,
                   [*common[:4], "--save_name", f"test{batch}", *RUN, *gpu, "--checkpoint", str(tmp_path / "crr"),
                    "--mask_rng", "device", "--batch_size", batch])
        scores[batch] = [float(r[3]) for r in read_csv(tmp_path / f"test{batch}" / "scores.csv")[1:]]
    assert len(scores["5"]) == 14 and scores["5"] == pytest.approx(scores["2"], rel=1e-4)
    assert "Mean: I-AUROC" in (tmp_path / "crr" / "log.txt").read_text()
    # the CPU-trained Dinomaly run on the GPU (fp32; cuDNN's default TF32 convolutions: close, not equal)
    run_script(dinomaly_mvtec_uni,
               ["--data_path", demo["mvtec"], "--eval_only", "--checkpoint", str(dinomaly_run), "--save_dir",
                str(tmp_path), "--save_name", "dinomaly", *RUN, *gpu])
    on_cpu, on_gpu = (read_csv(folder / "scores.csv")[1:] for folder in (dinomaly_run, tmp_path / "dinomaly"))
    assert [float(r[3]) for r in on_gpu] == pytest.approx([float(r[3]) for r in on_cpu], abs=5e-3)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv,expected", [
    (["dinomaly_mvtec_uni.py", "--data_path", "/nonexistent/mvtec", "--encoder_weights", "random", "--device", "cpu"],
     "/nonexistent/mvtec"),
    (["dinomaly_mvtec_uni.py", "--data_path", "{mvtec}", "--classes", "nut", "--device", "cpu"],
     "backbones/weights/dinov2_vitb14_reg4_pretrain.pth"),
    (["crr_realiad_test.py", "--data_path", "{realiad}", "--classes", "nut", "--save_dir", "{tmp}", "--device",
      "cpu"], "model.pth"),  # the data are checked first
    (["dinomaly_mvtec_uni.py", "--data_path", "{mvtec}", "--eval_only", "--checkpoint", "{tmp}/nope",
      "--device", "cpu"],
     "checkpoint not found: {tmp}/nope; pass a run folder or a model.pth as --checkpoint"),
    (["dinomaly_mvtec_uni.py", "--data_path", "{mvtec}", "--classes", "nut", "--crop_size", "100",
      "--encoder_weights", "random", "--device", "cpu"], "multiple of the encoder's patch size 14; use 98 or 112"),
    (["dinomaly_mvtec_uni.py", "--data_path", "{mvtec}", "--total_iters", "0"], "--total_iters: 0 is less than 1"),
    (["dinomaly_mvtec_uni.py", "--data_path", "{mvtec}", "--batch_size", "-2"], "--batch_size: -2 is less than 1"),
    (["crr_realiad_stage1.py", "--mask_ratio", "1"], "--mask_ratio: 1.0 is not in [0, 1)"),
    (["crr_realiad_test.py", "--total_iters", "5"], "unrecognized arguments: --total_iters"),
    (["crr_realiad_stage1.py", "--data_path", "{realiad}", "--encoder_weights", "random", "--device", "cpu"],
     "--anomaly_source_path none"),
])
def test_user_errors_exit_2_with_one_line(argv, expected, demo, tmp_path):
    argv = [a.format(mvtec=demo["mvtec"], realiad=demo["realiad"], tmp=tmp_path) for a in argv]
    expected = expected.format(tmp=tmp_path)
    if "--save_dir" not in argv:
        argv += ["--save_dir", str(tmp_path)]
    r = run_cli(*argv)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("script,data,tag", [("dinomaly_mvtec_uni.py", "mvtec", ""),
                                             ("dinomaly2_fewshot.py", "mvtec", ""),
                                             ("crr_realiad_stage1.py", "realiad", "_recon")])
def test_torchrun_two_processes_on_cpu(script, data, tag, demo, tmp_path):
    # CRR evaluates with test-time masking; --mask_rng device seeds each image's mask, so sharding changes nothing
    crr = ["--mask_rng", "device"] if script.startswith("crr") else []
    # torchrun runs the script through tests/signal_run.py (no signal): the tiny encoder in each process
    r = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join("tests", "signal_run.py"),
                "none", "0", script, "--data_path", demo[data], "--encoder", TINY, "--total_iters", "2",
                "--batch_size", "4", "--save_dir", str(tmp_path), "--save_name", "ddp", *SMALL, *crr,
                *(["--anomaly_source_path", "none"] if crr else []))
    assert r.returncode == 0, r.stderr[-2000:]
    log_text = (tmp_path / "ddp" / "log.txt").read_text()
    assert {"model.pth", f"metrics{tag}.csv"} <= set(os.listdir(tmp_path / "ddp")) and "processes: 2" in log_text
    # the evaluation was sharded over the two processes: one process (this one, another batch size) gives the
    # same results
    assert "evaluation shared by 2 processes" in log_text
    run_script(importlib.import_module(script[:-3]),
               ["--data_path", demo[data], "--eval_only", "--checkpoint", str(tmp_path / "ddp"), "--save_dir",
                str(tmp_path), "--save_name", "single", *RUN, "--batch_size", "3", *crr])
    for name in (f"scores{tag}.csv", f"metrics{tag}.csv"):
        scores = name.startswith("scores")
        sharded, single = read_csv(tmp_path / "ddp" / name), read_csv(tmp_path / "single" / name)
        assert [row[:-1] if scores else row[0] for row in sharded] == [row[:-1] if scores else row[0] for row in single]
        cells = lambda rows: [float(c) for row in rows[1:] for c in row[-1 if scores else 1:]]
        np.testing.assert_allclose(cells(sharded), cells(single), atol=1e-6)


def test_crr_stage1_on_mvtec_layout(demo, tmp_path):
    run_script(crr_realiad_stage1,
               ["--dataset", "mvtec", "--data_path", demo["mvtec"], "--encoder", TINY, "--total_iters", "2",
                "--batch_size", "4", "--save_dir", str(tmp_path), "--save_name", "crr_mvtec", *SMALL,
                "--anomaly_source_path", "none"])
    rows = read_csv(tmp_path / "crr_mvtec" / "metrics_recon.csv")
    assert [r[0] for r in rows[1:]] == [*CLASSES, "mean"]
    assert len(read_csv(tmp_path / "crr_mvtec" / "scores_recon.csv")) == 1 + 2 * 7


def test_help_shows_defaults_and_only_the_flags_a_job_uses():
    text = run_cli("dinomaly_mvtec_uni.py", "--help").stdout
    flat = " ".join(text.split())
    for flag, default in [("--total_iters", "10000"), ("--batch_size", "16"), ("--image_size", "448"),
                          ("--crop_size", "392"), ("--seed", "1"), ("--save_dir", "./saved_results")]:
        assert re.search(re.escape(flag) + r" [A-Z_]+ (?:(?! --).)*\(default: " + re.escape(default) + r"\)", flat), flag
    assert "(default: None)" not in text and "--mask_ratio" not in text
    test_help = run_cli("crr_realiad_test.py", "--help").stdout
    assert "--total_iters" not in test_help and "--seg_checkpoint" in test_help and "Stage-I run's" in test_help
    stage2_help = run_cli("crr_realiad_stage2.py", "--help").stdout
    assert "--aupro" not in stage2_help and "--save_heatmaps" not in stage2_help and "--total_iters" in stage2_help


def test_log_file_keeps_warnings_and_the_error_line(demo, tmp_path):
    r = run_cli("dinomaly_mvtec_uni.py", "--data_path", demo["mvtec"], "--classes", "nope", "--encoder_weights",
                "random", "--device", "cpu", "--save_dir", str(tmp_path), "--save_name", "bad")
    assert r.returncode == 2
    log_text = (tmp_path / "bad" / "log.txt").read_text()
    assert "class folder not found" in log_text and log_text.rstrip().splitlines()[-1] == r.stderr.strip()


@pytest.mark.parametrize("module,mode", [(dinomaly_mvtec_uni, "deterministic"), (crr_realiad_stage1, "benchmark"),
                                         (crr_realiad_stage2, "benchmark"), (crr_realiad_test, "deterministic")])
def test_cudnn_mode_of_each_reference_script(module, mode, tmp_path):
    """The released scripts set cudnn deterministic (MVTec AD, VisA, CRR test) or benchmark (CRR training)."""
    from dinomaly.run import Run
    settings = cli.parse("", module.RECIPE, module.DEFAULTS, argv=["--save_dir", str(tmp_path), "--device", "cpu"])
    Run(settings.run, "config.json")
    assert torch.backends.cudnn.deterministic == (mode == "deterministic")
    assert torch.backends.cudnn.benchmark == (mode == "benchmark")


def test_each_process_samples_pixels_at_the_rate_of_the_whole_class(demo, monkeypatch, tmp_path):
    """evaluate_shard as process 1 of 2 (faked): it maps images 1, 3, 5, ... and draws its share of the
    calibration's pixel sample at the rate of the whole class, so the merged sample is one process's."""
    totals = []

    class Recorded(evaluate.PixelSample):
        def __init__(self, total_pixels, *rest, **kw):
            totals.append(total_pixels)
            super().__init__(total_pixels, *rest, **kw)

    monkeypatch.setattr(evaluate, "PixelSample", Recorded)
    samples = ds.mvtec_samples(demo["mvtec"], "nut", "test")
    data = DataOptions(num_workers=0, cache_dir=str(tmp_path))
    evaluation = EvalOptions(batch_size=3, save_heatmaps=0, aupro="dinomaly", gt_binarize="dinomaly")
    run = types.SimpleNamespace(options=RunOptions(seed=1), rank=1, world_size=2, device=torch.device("cpu"),
                                is_main=False)
    mapper = AnomalyMapper(checkpoints.build_model(TINY, "random").eval())
    _, rows, *_ = evaluate.evaluate_shard(run, mapper, samples, "nut", data, evaluation, 64, 56)
    assert [i for i, _ in rows] == list(range(1, len(samples), 2)) and len(samples) > 2
    assert totals == [len(samples) * 256 ** 2]
