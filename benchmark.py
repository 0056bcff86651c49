"""Speed of one training step and of inference, on random weights and random images.

    python benchmark.py --encoder dinov2reg_vit_base_14 --batch_size 16 --device cuda

Prints the mean time of a Dinomaly training step (forward, hard-mined loss, backward, clipping, StableAdamW) and
the inference time per image (reconstruction map, smoothing, score), after warm-up iterations.
"""
import argparse
import time

import torch

import models
from loss import global_cosine_hm
from optimizers import StableAdamW
from anomaly_map import AnomalyMapper


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Mean seconds per call of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="dinov2reg_vit_base_14", choices=list(models.ENCODERS))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--crop_size", type=int, default=392)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.build_model(args.encoder, "random", dropout=0.2).to(device)
    x = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=device)
    mapper = AnomalyMapper(model)
    params = model.trainable_parameters()
    optimizer = StableAdamW(params)

    def train_step():
        en, de = model(x)
        loss = global_cosine_hm(en, de, p=0.9)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()

    @torch.no_grad()
    def infer():
        mapper(x)[1].cpu()

    model.train()
    t_train = timed(train_step, device, args.warmup, args.iters)
    model.eval()
    t_infer = timed(infer, device, args.warmup, args.iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.encoder}, batch {args.batch_size}, {args.crop_size} px, {name}, torch {torch.__version__}")
    print(f"training step: {t_train * 1000:.0f} ms ({t_train * 10000 / 3600:.2f} h per 10,000 iterations)")
    print(f"inference: {t_infer * 1000 / args.batch_size:.1f} ms per image")


if __name__ == "__main__":
    main()
