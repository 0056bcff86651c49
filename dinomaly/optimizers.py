"""StableAdamW and the warm-up cosine learning-rate schedules (Dinomaly's and Dinomaly2's)."""
import math

import numpy as np
import torch


class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping by the RMS of g / denom (StableAdamW).

    Per parameter tensor: decoupled weight decay first, then the moments, then the step scaled down by
    max(1, RMS(g / denom)).
    """

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, list[torch.Tensor]] = {}  # tensors that have taken the same number of steps
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                            state[key] = torch.zeros_like(p)
                    state["step"] += 1
                    by_step.setdefault(state["step"], []).append(p)
            for step, params in by_step.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], step: int):
        """One step of `params` (all at step `step`): the per-tensor arithmetic of StableAdamW, batched over
        tensors with torch._foreach_* ops (on a GPU a few kernels for all tensors instead of some per tensor)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        if group["amsgrad"]:
            v_max = [self.state[p]["max_exp_avg_sq"] for p in params]
            torch._foreach_maximum_(v_max, v)
            v = v_max
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        # the step scaled down by max(1, RMS(g / denom)) per tensor, the RMS as ||g / denom||_2 / sqrt(numel);
        # read on the device (no sync). Rounded as the reference: the per-tensor rate (1 / RMS) * (-lr / (1 -
        # beta1^step)) times m, then divided by denom (in float32 any other order parts from it by an ulp, which
        # Adam's normalised early steps amplify)
        rms = torch._foreach_norm(torch._foreach_div(grads, denom))
        torch._foreach_div_(rms, [g.numel() ** 0.5 for g in grads])
        torch._foreach_clamp_min_(rms, 1.0)
        torch._foreach_reciprocal_(rms)
        torch._foreach_mul_(rms, -lr / (1 - beta1 ** step))
        torch._foreach_addcdiv_(params, torch._foreach_mul(m, rms), denom)


class WarmCosineSchedule:
    """One learning rate per iteration: linspace(start, base, warmup) then a cosine from base to final."""

    def __init__(self, base: float, final: float, total_iters: int, warmup_iters: int = 0, start: float = 0.0):
        warm = np.linspace(start, base, warmup_iters)
        j = np.arange(total_iters - warmup_iters)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * j / len(j)))
        self.values = np.concatenate([warm, cosine])
        self.final = final

    def __call__(self, it: int) -> float:
        return float(self.values[it]) if it < len(self.values) else self.final

    def apply(self, optimizer: torch.optim.Optimizer, it: int):
        for group in optimizer.param_groups:
            group["lr"] = self(it)


class WarmupRatioSchedule:
    """Dinomaly2's schedule, per parameter group from its initial rate lr0: lr0 * it / warmup for it < warmup, then
    lr0 * (r + (1 - r) * (1 + cos(pi * (it - warmup) / (total - warmup))) / 2), r = final_ratio (1: constant).
    Iteration 0 has rate 0. A group's lr0 is its rate when the schedule first sees it (kept in "initial_lr", which
    the optimiser's state dict saves)."""

    def __init__(self, total_iters: int, warmup_iters: int = 100, final_ratio: float = 1.0):
        self.total, self.warmup, self.final_ratio = total_iters, warmup_iters, final_ratio

    def __call__(self, it: int) -> float:
        """The factor applied to each group's lr0 at iteration `it`."""
        if it < self.warmup:
            return it / self.warmup
        progress = (it - self.warmup) / (self.total - self.warmup)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_ratio + (1.0 - self.final_ratio) * coeff

    def apply(self, optimizer: torch.optim.Optimizer, it: int):
        factor = self(it)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
