"""StableAdamW and the warm-up cosine learning-rate schedule."""
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
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                p.mul_(1 - lr * wd)
                state["step"] += 1
                step = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                    v = state["max_exp_avg_sq"]
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                rms = (g / denom).pow(2).mean().sqrt()
                scale = torch.clamp(rms, min=1.0)
                p.addcdiv_(m, denom * scale, value=-lr / (1 - beta1 ** step))
        return loss


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
