"""Speed options: numeric precision, torch.compile, and the data-wait meter of the training loop.

Precision (`--precision`):
- fp32 (default): float32 everywhere with PyTorch's default settings, as the reference code runs (these let
  cuDNN convolutions use TF32 on NVIDIA Ampere and later: the patch embedding, the smoothing, CRR's
  segmentation network).
- tf32: float32 matmuls and convolutions on TF32 tensor cores (NVIDIA Ampere and later; no effect on a CPU).
- bf16: torch.autocast to bfloat16 around the forward pass and the loss, plus TF32 for what autocast keeps
  in float32. Parameters, gradients, optimiser state, anomaly maps and scores stay float32.

Compilation (`--compile`): torch.compile of the model's blocks in place (each encoder and decoder block, the
bottleneck, the segmentation network), so the state dict keeps its names, the model's Python-level forward
(taps, group means, CRR's seeded test-time masks) stays eager, and the loss's gradient hooks act on eager
tensors.
"""
import contextlib
import time

import torch

from .arguments import PRECISIONS


def configure(precision: str):
    """Set the process-wide float32 matmul/convolution mode for `precision` (fp32 restores PyTorch's defaults:
    TF32 off for matmuls, on for cuDNN convolutions)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """The context for a forward pass and its loss: bfloat16 autocast for bf16, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules to compile: the blocks of a ViTill (the encoder's, the bottleneck, the decoder's), or
    the whole module otherwise (the segmentation network)."""
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return [*model.encoder.blocks, model.bottleneck, *model.decoder]
    return [model]


def maybe_compile(model: torch.nn.Module | None, enabled: bool, backend: str = "inductor"):
    """With `enabled`, torch.compile the model's parts in place (see compiled_parts); parts already compiled
    are left alone. Returns the model (None stays None)."""
    if enabled and model is not None:
        # The encoder's and the decoder's blocks share timm's Block.forward; training, evaluation, grad modes and
        # batch sizes each add a compiled version of it: more than dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for part in compiled_parts(model):
            if getattr(part, "_compiled_call_impl", None) is None:
                part.compile(backend=backend)
    return model


class DataWait:
    """How much of the training loop's wall time goes into waiting for the next batch.

    `iterate(loader)` yields the loader's batches and adds the time spent in iter() and next() to `waited`;
    `share()` returns waited / elapsed since the previous share() (or since construction) and starts anew.
    On a GPU the step is asynchronous, so a GPU-bound loop shows a small share and a loader-bound one a large
    share, which is what matters.
    """

    def __init__(self):
        self.waited, self.start = 0.0, time.perf_counter()

    def iterate(self, loader):
        t = time.perf_counter()
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - t
            yield batch
            t = time.perf_counter()

    def share(self) -> float:
        now = time.perf_counter()
        share = self.waited / max(now - self.start, 1e-9)
        self.waited, self.start = 0.0, now
        return share
