"""benchmark.py's subcommands at tiny settings on the CPU: they run and write their JSON fields (no timings are
checked)."""
import json

import numpy as np
import pytest
import torch

from dinomaly import speed, utils

import benchmark
from conftest import DEVICES, TINY

DATA = ["--source_size", "64", "--n_train", "2", "--num_workers", "0"]
SMALL = ["--batch_size", "2", "--image_size", "64", "--crop_size", "56", "--warmup", "0", "--iters", "1"]


@pytest.fixture(autouse=True)
def default_backends():
    """The benchmark sets process-wide TF32 and cuDNN modes for its fast mode; later tests get the defaults."""
    yield
    speed.configure("fp32")
    torch.backends.cudnn.benchmark = False


def model_flags(device: str) -> list[str]:
    """The tiny encoder on `device`; compiled by inductor on a GPU only (its codegen is slow on a CPU)."""
    return ["--encoder", TINY, "--device", device, "--compile", "inductor" if device == "cuda" else "none"]


def run(tmp_path, *argv) -> dict:
    path = tmp_path / "out.json"
    benchmark.main([*argv, "--json", str(path)])
    return json.loads(path.read_text())


def positive(row: dict, keys: list[str]):
    for k in keys:
        assert row[k] > 0, k


@pytest.mark.parametrize("device", DEVICES)
def test_train(tmp_path, device):
    out = run(tmp_path, "train", *SMALL, *model_flags(device), *DATA, "--profile", "1")
    rows = out["results"]
    assert [(r["step"], r["mode"]) for r in rows] == [(s, m) for m in ("reference", "fast")
                                                      for s in ("dinomaly", "dinomaly2", "crr_stage1", "crr_stage2")]
    for r in rows:
        positive(r, ["iters_per_s", "images_per_s", "ms_per_iter", "tflop_per_step", "tflops", "peak_host_mb"])
        assert 0 <= r["data_wait"] <= 1 and (r["peak_gpu_mb"] is None) == (device == "cpu")
    assert set(out["ratios"]) == {"dinomaly", "dinomaly2", "crr_stage1", "crr_stage2"}
    assert min(out["ratios"].values()) > 0
    by = {(r["step"], r["mode"]): r for r in rows}
    assert by["crr_stage1", "fast"]["tflop_per_step"] == by["crr_stage1", "reference"]["tflop_per_step"]
    assert by["crr_stage1", "fast"]["tflop_per_step"] == pytest.approx(2 * by["dinomaly", "fast"]["tflop_per_step"])
    assert out["settings"]["precision"] == "bf16"
    # --profile: the operators (GPU: kernels) taking the most time; on the CPU the step's own heavy operator
    # family leads (the ViT's matrix products, Stage II's convolutions), whatever the timing noise
    matmul = ("aten::mm", "aten::addmm", "aten::bmm")
    conv = ("aten::mkldnn_convolution", "aten::convolution_backward",  # which kernels depends on the CPU
            "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")
    heavy = {"dinomaly": matmul, "dinomaly2": matmul, "crr_stage1": matmul, "crr_stage2": conv}
    for r in rows:
        ops = r["profile"]
        assert 0 < len(ops) <= 15
        assert device == "cuda" or {o["op"] for o in ops} & set(heavy[r["step"]]), (r["step"], ops)
        shares = [o["share"] for o in ops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_infer(tmp_path, device):
    tasks = ["dinomaly", "dinomaly2", "crr_test", "dinomaly2_rgbd", "dinomaly2_rgbir"]
    out = run(tmp_path, "infer", *SMALL, *model_flags(device), "--tasks", *tasks)
    assert [(r["task"], r["mode"]) for r in out["results"]] == [(t, m) for m in ("reference", "fast") for t in tasks]
    for r in out["results"]:
        positive(r, ["images_per_s", "ms_per_image", "tflops", "peak_host_mb"])
    by = {(r["task"], r["mode"]): r for r in out["results"]}
    assert by["crr_test", "fast"]["tflop_per_batch"] > by["dinomaly", "fast"]["tflop_per_batch"]  # + segmentation
    assert set(out["ratios"]) == set(tasks) and min(out["ratios"].values()) > 0
    # Dinomaly2 on pairs: an RGB + infrared pair costs two images, an RGB + depth pair two encoder passes and one
    # decoding
    rgbd, rgbir = by["dinomaly2_rgbd", "fast"]["tflop_per_batch"], by["dinomaly2_rgbir", "fast"]["tflop_per_batch"]
    assert rgbir == pytest.approx(2 * by["dinomaly2", "fast"]["tflop_per_batch"], rel=1e-9) and rgbd < rgbir < 2 * rgbd


def test_data(tmp_path):
    out = run(tmp_path, "data", *SMALL, *DATA, "--workers", "0", "1")
    rows = out["results"]
    assert {(r["transform"], r["workers"]) for r in rows} == \
        {(t, w) for t in ("plain", "cache (memory)", "synthesis", "synthesis, cache (memory)") for w in (0, 1)}
    for r in rows:
        positive(r, ["images_per_s", "peak_host_mb"])


def test_metrics(tmp_path):
    out = run(tmp_path, "metrics", "--maps", "6", "--size", "32", "--batch_size", "4")
    row = out["results"][0]
    positive(row, ["seconds", "peak_traced_mb", "input_mb", "peak_host_mb"])
    # every batch reached the accumulator: the metrics of the whole class computed at once
    labels, scores, maps, masks, _ = (np.concatenate(a) for a in zip(*utils.synthetic_class(6, 32, 0)))
    expected = utils.class_metrics(labels, scores, masks, maps)
    assert {k: row[k] for k in utils.METRIC_NAMES} == pytest.approx(expected, abs=0, nan_ok=True)


def test_a_run_cut_short_keeps_the_settings_measured(tmp_path, monkeypatch):
    timed = benchmark.time_steps

    def stopped_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return timed(*args, **kwargs)

    calls = []
    monkeypatch.setattr(benchmark, "time_steps", stopped_in_the_second)
    path = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["data", *SMALL, *DATA, "--workers", "0", "--cache", "none", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["partial"] and [r["transform"] for r in out["results"]] == ["plain"]
    assert out["command"] == "data" and out["settings"]["workers"] == [0]
    assert "partial" not in run(tmp_path, "data", *SMALL, *DATA, "--workers", "0", "--cache", "none")


def test_serve(tmp_path):
    # serve.py in its own process (a random ViT-S at 28 px), 1 and 2 clients; each answer is checked inside
    out = run(tmp_path, "serve", "--encoder", "dinov2reg_vit_small_14", "--image_size", "28", "--crop_size", "28",
              "--source_size", "32", "--images", "3", "--clients", "1", "2", "--requests", "4", "--device", "cpu")
    served = [r for r in out["results"] if r["path"] == "served"]
    assert [(r["clients"], r["requests"]) for r in served] == [(1, 4), (2, 4)]
    direct = [r for r in out["results"] if r["path"] != "served"]
    assert [(r["path"], r["clients"]) for r in direct] == [("predict.py's, batch 8", 1), ("predict.py's, batch 1", 1),
                                                           ("predict.py's, batch 8", 2), ("predict.py's, batch 1", 2)]
    for r in served:
        positive(r, ["requests_per_s", "p50_ms", "p99_ms", "server_rss_mb"])
        assert r["p99_ms"] >= r["p50_ms"]
    # warm-up 3 + 4 + 4 images answered, in batches
    assert sum(int(k) * v for k, v in out["batches"].items()) == 11 and len(out["server_rss_mb"]) == 3


def test_pairs_train(tmp_path):
    """Dinomaly2's training step on RGB + depth and RGB + infrared pairs (generated, the depth prepared as for
    MVTec 3D-AD, cached with both images): the engine's step with each setting's recipe; an RGB + infrared pair's
    step costs more than an RGB + depth pair's (the decoder runs on both images, not on one fused input), less
    than twice."""
    steps = ["dinomaly2_rgbd", "dinomaly2_rgbir"]
    out = run(tmp_path, "train", *SMALL, *model_flags("cpu"), *DATA, "--steps", *steps)
    by = {(r["step"], r["mode"]): r for r in out["results"]}
    assert set(by) == {(s, m) for s in steps for m in ("reference", "fast")} and set(out["ratios"]) == set(steps)
    for r in out["results"]:
        positive(r, ["iters_per_s", "images_per_s", "tflop_per_step", "peak_host_mb"])
    rgbd, rgbir = by["dinomaly2_rgbd", "fast"]["tflop_per_step"], by["dinomaly2_rgbir", "fast"]["tflop_per_step"]
    assert rgbd < rgbir < 2 * rgbd
    with pytest.raises(benchmark.UserError, match="--dataset mvtec3d"):
        benchmark.main(["train", "--steps", "dinomaly2_rgbd", "--data_path", str(tmp_path), *model_flags("cpu")])
