"""The speed options: precision, compilation, the foreach optimiser, the data-wait meter, and a training run with
them (speed.py)."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinomaly import checkpoints, models, speed
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly import cli
from dinomaly.loss import global_cosine_hm
from dinomaly.optimizers import StableAdamW

import dinomaly_mvtec_uni
from conftest import DEVICES, TINY
from prepare_data.make_demo_data import make_demo_data

# bf16 against fp32 on random weights (3 seeds, batch 4, 56 px): measured at most 6e-3 on the smoothed maps (values
# 0.2..1.4) and 2.4e-3 on the scores with the tiny encoder (1.1e-3 and 6e-4 with ViT-S); asserted with a margin.
MAP_BOUND, SCORE_BOUND = 2e-2, 1e-2


@pytest.fixture(autouse=True)
def fp32_afterwards():
    yield
    speed.configure("fp32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_maps_stay_close_to_fp32(precision, device):
    for seed in range(3):
        torch.manual_seed(seed)
        model = checkpoints.build_model(TINY, "random").to(device).eval()
        x = torch.randn(4, 3, 56, 56, device=device)
        with torch.no_grad():
            ref_map, ref_score = AnomalyMapper(model)(x)
            amap, score = AnomalyMapper(model, precision=precision)(x)
        assert amap.dtype == score.dtype == torch.float32
        assert (amap - ref_map).abs().max() < MAP_BOUND and (score - ref_score).abs().max() < SCORE_BOUND
        if precision == "bf16":
            assert not torch.equal(amap, ref_map)  # bf16 did run


def test_configure_sets_tf32_and_restores_the_defaults():
    speed.configure("tf32")
    assert torch.backends.cuda.matmul.allow_tf32
    speed.configure("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(ValueError):
        speed.configure("fp16")


def train_step(model: models.ViTill, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    with speed.autocast(x.device, precision):
        en, de = model(x)
        loss = global_cosine_hm(en, de, p=0.9, factor=0.1)
    loss.backward()
    return loss


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_blocks_keep_hard_mining_gradients_and_state_dict_names(device):
    torch.manual_seed(0)
    eager = checkpoints.build_model(TINY, "random", dropout=0.0).to(device).train()
    compiled = checkpoints.build_model(TINY, "random", dropout=0.0).to(device)
    compiled.load_state_dict(eager.state_dict())
    backend = "inductor" if device == "cuda" else "aot_eager"  # inductor's codegen is slow on a CPU
    speed.maybe_compile(compiled.train(), True, backend=backend)
    blocks = [*compiled.decoder, *compiled.encoder.blocks, compiled.bottleneck]
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 3, 56, 56, device=device)
    torch.testing.assert_close(train_step(compiled, x), train_step(eager, x))
    for a, b in zip(compiled.trainable_parameters(), eager.trainable_parameters()):
        # gradients up to ~25: compiled-vs-eager rounding reaches 9e-6 here, and 4x rtol 1e-4 with other seeds
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6)
    # without the hard-mining hook the gradients differ beyond that tolerance, so the comparison above sees it
    eager.zero_grad()
    en, de = eager(x)
    torch.mean(torch.stack([1 - torch.nn.functional.cosine_similarity(e.flatten(1), d.flatten(1)).mean()
                            for e, d in zip(en, de)])).backward()
    assert not torch.allclose(eager.decoder[0].mlp.fc2.weight.grad, compiled.decoder[0].mlp.fc2.weight.grad,
                              rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_keeps_float32_parameters_and_gradients(device):
    torch.manual_seed(0)
    model = checkpoints.build_model(TINY, "random").to(device).train()
    loss = train_step(model, torch.randn(2, 3, 56, 56, device=device), "bf16")
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.trainable_parameters())


def test_stable_adamw_per_tensor_steps_in_one_group():
    """Tensors of one group that have taken different numbers of steps (a gradient missing once) step exactly as
    each would alone."""
    torch.manual_seed(0)
    shapes = [(5, 3), (3,), (4, 4, 2)]
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    opt = StableAdamW(together, lr=1e-2, betas=(0.9, 0.5))
    opts = [StableAdamW([p], lr=1e-2, betas=(0.9, 0.5)) for p in alone]
    for it in range(4):
        for i, (a, b) in enumerate(zip(together, alone)):
            g = None if (it == 1 and i == 1) else torch.randn_like(a) * (10 if it == 2 else 1)
            a.grad, b.grad = g, None if g is None else g.clone()
        opt.step()
        for o in opts:
            o.step()
    assert opt.state[together[1]]["step"] == 3 and opt.state[together[0]]["step"] == 4
    for a, b in zip(together, alone):
        assert torch.equal(a, b)


def optimizer_ops(n_tensors: int) -> int:
    """PyTorch operators StableAdamW's second step calls for `n_tensors` parameters (each one a kernel launch or a
    few on a GPU; a foreach operator covers all tensors)."""
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(n_tensors)]
    opt = StableAdamW(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * 100  # large enough that the RMS clip acts
        if opt.state:
            with OpCounter() as ops:
                opt.step()
        else:
            opt.step()
    return ops.count


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_stable_adamw_step_does_not_launch_per_tensor_operators():
    """The per-tensor RMS clip runs as foreach operators: a step calls as many PyTorch operators for 40 tensors as
    for 4 (a Python loop over the tensors adds four per tensor: mean, sqrt, clamp, multiply)."""
    assert optimizer_ops(40) == optimizer_ops(4) < 30


def test_data_wait_share_counts_the_time_in_next(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def slow_loader():
        for i in range(3):
            clock[0] += 1.0  # 1 s to produce each batch
            yield i

    wait = speed.DataWait()
    seen = []
    for batch in wait.iterate(slow_loader()):
        clock[0] += 3.0  # a 3 s step
        seen.append(batch)
    assert seen == [0, 1, 2] and wait.share() == pytest.approx(3 / 12)
    clock[0] += 2.0
    assert wait.share() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_the_speed_options_logs_the_data_wait(tmp_path, device):
    data = make_demo_data(str(tmp_path / "data"), size=64, seed=0, n_train=4, n_test_good=1, n_test_bad=2)
    cache_dir = tmp_path / "cache"
    # on a GPU also compiled, with loader processes feeding pinned memory
    gpu = ["--compile", "--num_workers", "2"] if device == "cuda" else ["--num_workers", "0"]
    cli.run_script(dinomaly_mvtec_uni, [
        "--data_path", data["mvtec"], "--classes", "nut", "--encoder", TINY, "--encoder_weights", "random",
        "--image_size", "64", "--crop_size", "56", "--total_iters", "2", "--batch_size", "2", "--log_every", "1",
        "--device", device, "--save_dir", str(tmp_path), "--save_name", "run", "--precision", "bf16",
        "--cache_images", "disk", "--cache_dir", str(cache_dir), *gpu])
    log_text = (tmp_path / "run" / "log.txt").read_text()
    assert "iter [2/2]" in log_text and "data wait " in log_text and "\nnut: I-AUROC" in log_text
    assert len(os.listdir(cache_dir)) == 2  # the training images and the test images of "nut"
