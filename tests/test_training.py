"""Loss, optimiser and schedule against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinomaly import models
from dinomaly.loss import focal_loss, global_cosine_hm, hard_mining_factor
from dinomaly.models.vitill import ViTill
from dinomaly.optimizers import StableAdamW, WarmCosineSchedule

from conftest import TINY


def test_hard_mining_gradient_down_weights_easy_positions():
    torch.manual_seed(0)
    en = [torch.randn(2, 8, 5, 5)]
    de = [torch.randn(2, 8, 5, 5, requires_grad=True)]
    p = 0.9
    loss = global_cosine_hm(en, [d * 1 for d in de], p=p, factor=0.1)
    loss.backward()
    g_mined = de[0].grad.clone()
    de[0].grad = None
    plain = torch.mean(1 - F.cosine_similarity(en[0].reshape(2, -1), de[0].reshape(2, -1)))
    plain.backward()
    g_plain = de[0].grad
    torch.testing.assert_close(loss, plain)
    dist = (1 - F.cosine_similarity(en[0], de[0], dim=1)).flatten()
    k = int(dist.numel() * (1 - p))  # int(50 * 0.1) is 4 in floating point, as in the official code
    hard = torch.zeros_like(dist, dtype=torch.bool)
    hard[dist.argsort(descending=True)[:k]] = True
    ratio = (g_mined / g_plain).permute(0, 2, 3, 1).reshape(-1, 8)
    assert k == 4 and hard.sum() == 4
    torch.testing.assert_close(ratio[hard], torch.ones_like(ratio[hard]))
    torch.testing.assert_close(ratio[~hard], torch.full_like(ratio[~hard], 0.1))


def test_hard_mining_ramp_and_full_batch_count():
    assert hard_mining_factor(0) == 0 and hard_mining_factor(500) == pytest.approx(0.45)
    assert hard_mining_factor(1000) == pytest.approx(0.9) and hard_mining_factor(5000) == pytest.approx(0.9)
    assert int(16 * 28 * 28 * (1 - 0.9)) == 1254
    # p = 0: nothing is down-weighted
    en, de = [torch.randn(2, 4, 3, 3)], [torch.randn(2, 4, 3, 3, requires_grad=True)]
    global_cosine_hm(en, [d * 1 for d in de], p=0.0).backward()
    g = de[0].grad.clone()
    de[0].grad = None
    torch.mean(1 - F.cosine_similarity(en[0].reshape(2, -1), de[0].reshape(2, -1))).backward()
    torch.testing.assert_close(g, de[0].grad)


def test_loss_is_the_mean_over_groups():
    # two groups: the loss is the mean of the groups' float64 batch-mean global cosine distances, and each
    # group's gradient is half of its own loss's
    g = torch.Generator().manual_seed(3)
    en = [torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    de = [torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def distance(e, d):
        e, d = e.reshape(3, -1), d.reshape(3, -1)
        return (1 - (e * d).sum(1) / (e.norm(dim=1) * d.norm(dim=1))).mean()

    loss = global_cosine_hm(en, [d * 1 for d in de], p=0.0)
    assert loss.item() == pytest.approx((distance(en[0], de[0]) + distance(en[1], de[1])).item() / 2, rel=1e-12)
    loss.backward()
    for e, d in zip(en, de):
        want, = torch.autograd.grad(distance(e, d) / 2, d)
        torch.testing.assert_close(d.grad, want)


def test_stable_adamw_steps_by_hand():
    """Three steps in float64 against the StableAdamW formulas: step 1 plain, step 2 clipped by the RMS (a 10x larger
    gradient), step 3 with AMSGrad's running maximum above the current second moment (a tiny gradient)."""
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g1 = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    p = torch.nn.Parameter(w.clone())
    lr, b1, b2, eps, wd = 2e-3, 0.9, 0.5, 1e-10, 1e-4  # a short beta2 memory makes AMSGrad's maximum matter
    opt = StableAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    vhat = torch.zeros(3, dtype=torch.float64)
    for step, g in enumerate([g1, 10 * g1, 0.01 * g1], start=1):
        p.grad = g.clone()
        opt.step()
        w = w * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        vhat = torch.maximum(vhat, v)
        denom = vhat.sqrt() / math.sqrt(1 - b2 ** step) + eps
        rms = float(((g / denom) ** 2).mean().sqrt())
        w = w - lr / (1 - b1 ** step) / max(1.0, rms) * m / denom
        torch.testing.assert_close(p.data, w, rtol=1e-12, atol=1e-15)
        if step == 2:
            assert rms > 1.1  # the update is scaled down
        if step == 3:
            assert torch.all(vhat > v * 1.5)  # the maximum, not the current moment, is used


def test_stable_adamw_rounds_as_the_reference_in_float32():
    """In float32 a step is rounded as the reference's per-tensor loop rounds it: the rate lr / (1 - beta1^t) as a
    float32 number, times 1 / max(1, RMS) when the clip acts, times m, then divided by denom, then added; bit for
    bit (another order parts by an ulp, which Adam's early steps amplify: the float32 conformance with the preview
    code needs this), over steps with and without the RMS clip."""
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    lr, b1, b2, eps, wd = 2e-3, 0.9, 0.999, 1e-10, 1e-4
    opt = StableAdamW(ours, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=False)
    m = [torch.zeros(s) for s in shapes]
    v = [torch.zeros(s) for s in shapes]
    clipped = 0
    for step in range(1, 5):
        grads = [torch.randn(s) * (30 if step == 3 else 1) for s in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for w, g, m_i, v_i in zip(ref, grads, m, v):
            w *= 1 - lr * wd
            m_i.mul_(b1).add_(g, alpha=1 - b1)
            v_i.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v_i.sqrt() / math.sqrt(1 - b2 ** step) + eps
            rms = (g / denom).norm() / math.sqrt(g.numel())
            rate = torch.tensor(-lr / (1 - b1 ** step), dtype=torch.float32)
            if rms > 1:
                rate = 1 / rms * rate
                clipped += 1
            w += rate * m_i / denom
        for a, b in zip(ours, ref):
            assert torch.equal(a.detach(), b)
    assert clipped >= 3


def test_warm_cosine_schedule_values():
    s = WarmCosineSchedule(2e-3, 2e-4, 10_000, warmup_iters=100)
    assert s(0) == 0.0
    assert s(1) == pytest.approx(2e-3 / 99, rel=1e-12) and s(1) == pytest.approx(2.0202e-5, rel=1e-4)
    assert s(99) == pytest.approx(2e-3, rel=1e-12)
    assert s(100) == pytest.approx(2e-3, rel=1e-12)
    assert s(5050) == pytest.approx(1.1e-3, rel=1e-12)
    assert s(9999) == pytest.approx(2e-4 + 0.9e-3 * (1 + math.cos(math.pi * 9899 / 9900)), rel=1e-12)
    assert s(10_000) == 2e-4 and s(20_000) == 2e-4


def test_focal_loss_by_hand():
    probs = torch.tensor([0.9, 0.2]).view(1, 1, 1, 2)
    probs = torch.cat([1 - probs, probs], dim=1)  # [1, 2, 1, 2]: pixel 0 p1 = 0.9, pixel 1 p1 = 0.2
    target = torch.tensor([1, 1]).view(1, 1, 1, 2)
    loss = focal_loss(probs, target)
    def fl(p_true, p_false):
        pt = (1 - 1e-5) * p_true + 1e-5 * p_false + 1e-5
        return -(1 - pt) ** 2 * math.log(pt)
    expected = (fl(0.9, 0.1) + fl(0.2, 0.8)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_repair_loss_gradients_reach_decoder_only(tiny_encoder):
    torch.manual_seed(0)
    model = ViTill(models.encoder_config(TINY), dropout=0.4, mask_ratio=0.4).train()
    img, aug = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 56)
    en, de = model(img)
    _, de_aug = model(aug)
    loss = global_cosine_hm(en, de_aug, p=0.9)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    assert all(p.grad is not None for p in model.bottleneck.parameters())
    assert not en[0].requires_grad


def test_repair_loss_in_one_pass_equals_two_passes(tiny_encoder):
    from dinomaly.train import repair_loss
    torch.manual_seed(0)
    model = ViTill(models.encoder_config(TINY), dropout=0.0).train()
    img, aug = torch.randn(3, 3, 56, 56), torch.randn(3, 3, 56, 56)
    loss = repair_loss(model, img, aug, p=0.9, factor=0.1)
    loss.backward()
    one_pass = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()
    en, de = model(img)
    _, de_aug = model(aug)
    ref = global_cosine_hm(en, de, p=0.9) + global_cosine_hm(en, de_aug, p=0.9)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(one_pass, model.trainable_parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_stage2_batchnorm_synced_under_torchrun_on_gpus():
    """Several GPU processes: SyncBatchNorm (the batch statistics of the whole batch, as on one GPU) under the
    same state-dict names; one process, or CPU processes (SyncBatchNorm needs CUDA): BatchNorm as it is."""
    from types import SimpleNamespace

    from dinomaly import train
    net = models.segmentation_net(32)
    names = list(net.state_dict())
    kinds = {}
    for world, device in ((1, "cuda"), (2, "cpu"), (2, "cuda")):
        run = SimpleNamespace(world_size=world, device=torch.device(device))
        converted = train.synced_batchnorm(run, models.segmentation_net(32))
        assert list(converted.state_dict()) == names
        norms = (m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        kinds[world, device] = {type(m) for m in norms}
    assert kinds[1, "cuda"] == kinds[2, "cpu"] == {torch.nn.BatchNorm2d}
    assert kinds[2, "cuda"] == {torch.nn.SyncBatchNorm}
