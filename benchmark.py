"""Speed at the scale users run, each subcommand printing a table and writing JSON (--json PATH):

    python benchmark.py train   [--encoder dinov2reg_vit_base_14 --batch_size 16 --crop_size 392 --data_path DIR]
    python benchmark.py infer   [--batch_size 32]
    python benchmark.py data    [--workers 0 1 2 4 8 16]
    python benchmark.py metrics [--maps 2000 --size 256]
    python benchmark.py serve   [--checkpoint RUN --clients 1 4 16 --requests 96]

`train` times the Dinomaly step, the CRR Stage I step (anomaly synthesis included, through the real loader)
and the CRR Stage II step, with train.py's losses and optimisers and each method's recipe (recipes.py); `infer`
times anomaly_map.AnomalyMapper (images/s, ms/image) for the Dinomaly map and CRR's fused map. Both run each in two modes in one process and
print the ratio fast / reference:
- reference: fp32, eager, every image decoded and resized by PIL at every step, no pinned memory, the reference
  code's training step (the loss read back every step), CRR Stage I in two forward passes, the frozen CRR
  model's masks drawn on the CPU: as the reference code runs, except in two ways that flatter it: Stage I's
  training masks are drawn on the device as in our training (the released code draws them on the CPU too), and
  the optimiser is ours (foreach operators; the released StableAdamW steps tensor by tensor and reads each
  tensor's clip factor back to the CPU);
- fast: --precision (bf16), --compile (inductor), --cache (memory: decoded images, CRR's too), pinned memory,
  cuDNN benchmark mode, the frozen CRR model's masks drawn on the device (--mask_rng device), and
  train.train_step, the step our training loop runs (its non-finite check reads one flag back per step).
Achieved TFLOP/s use the FLOPs of one step counted once per setting with torch.utils.flop_counter (the same in
both modes). Peak GPU memory is torch.cuda.max_memory_allocated per mode; peak host memory is the process's
(and the loader workers') maximum resident size so far.

`data` times the loader alone (images/s per worker count) for the plain transform and CRR synthesis, each
without and with the image cache. `metrics` times the seven metrics of one synthetic class of N maps
(utils.synthetic_class) fed batch by batch to utils.ClassAccumulator, and their peak memory. `serve` is a
loopback load test of serve.py (its own process) against predict.py's path in this process (bench_serve).

Without --data_path, a dataset is generated (prepare_data/make_demo_data.py, Real-IAD layout, JPEG images of
--source_size px) in a temporary folder. Weights are random: speed does not depend on them.
"""
import argparse
import collections
import contextlib
import gc
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from dinomaly import dataset as ds
from dinomaly import checkpoints, models, speed, utils
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly.recipes import CRR_STAGE2, PAPER
from dinomaly.train import reconstruction_optimizer, repair_loss, segmentation_loss, train_step
from dinomaly.encoders import check_sizes
from dinomaly.errors import UserError
from dinomaly.image_cache import ImageCache
from dinomaly.loss import global_cosine_hm
from dinomaly.synthesis import SyntheticAnomalyDataset, synthesis_caches

from prepare_data.make_demo_data import CLASSES as DEMO_CLASSES
from prepare_data.make_demo_data import make_demo_data



@dataclass(frozen=True)
class Mode:
    name: str
    precision: str = "fp32"
    compile: str = "none"  # a torch.compile backend, or "none"
    cache: str = "none"  # image cache: none, memory or disk
    pin_memory: bool = False
    engine_step: bool = False  # train.train_step, else the reference code's step (the loss read back each step)
    crr_one_pass: bool = False  # CRR Stage I: clean and synthetic images in one forward pass
    cudnn_benchmark: bool = False  # cuDNN picks its fastest convolutions (the scripts' --cudnn benchmark)
    mask_rng: str = "cpu"  # where the frozen CRR model's masks are drawn (the scripts' --mask_rng)


def modes(args) -> list[Mode]:
    cuda = args.device.type == "cuda"
    return [Mode("reference"),
            Mode("fast", args.precision, args.compile, args.cache, cuda, engine_step=True, crr_one_pass=True,
                 cudnn_benchmark=True, mask_rng="device")]


# ----------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device):
    """Start the peak GPU memory anew, after freeing what the previous setting left."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak GPU memory since reset_peak (None on the CPU) and the peak resident host memory so far (MB)."""
    return dict(peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
                peak_host_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                peak_host_workers_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def count_flops(fn) -> int:
    """FLOPs of one call of fn (matmuls, convolutions, attention), forward and backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def cycle(loader: DataLoader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def time_steps(step, batches, device: torch.device, warmup: int, iters: int) -> dict:
    """Run step(batch) `warmup` times, then time `iters` steps (wall time, the device synchronised at both
    ends); returns steps/s and the share of that time spent waiting for the loader."""
    wait = speed.DataWait()
    timed = wait.iterate(batches)
    for _ in range(warmup):
        step(next(timed))
    sync(device)
    wait.share()
    start = time.perf_counter()
    for _ in range(iters):
        step(next(timed))
    sync(device)
    seconds = time.perf_counter() - start
    return dict(iters_per_s=iters / seconds, ms_per_iter=1000 * seconds / iters, data_wait=wait.share())


def profile_ops(step, batches, device: torch.device, steps: int, top: int = 15) -> list[dict]:
    """torch.profiler over `steps` more steps: on a GPU the `top` kernels by time on the GPU (the kernels alone:
    an operator's self time on the device repeats its kernels' time), on the CPU the `top` operators by self
    time; with calls per step, ms per step and share of the profiled time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(next(batches))
        sync(device)
    if device.type == "cuda":
        attr, kind = "self_device_time_total", torch.autograd.DeviceType.CUDA
    else:
        attr, kind = "self_cpu_time_total", torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(op=e.key[:80], calls_per_step=e.count / steps, ms_per_step=getattr(e, attr) / 1000 / steps,
                 share=getattr(e, attr) / total) for e in events[:top]]


def print_profile(title: str, ops: list[dict]):
    print(f"profile, {title}:")
    print_table(ops, [("op", "operator", ""), ("calls_per_step", "calls", ".0f"), ("ms_per_step", "ms/step", ".3g"),
                      ("share", "share", ".1%")])


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]):
    """columns: (key, heading, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


# ----------------------------------------------------------------------------------------------- datasets and loaders

def training_samples(args) -> list[ds.Sample]:
    """The training images of --data_path (--dataset, --classes), or of a generated Real-IAD-layout dataset."""
    if args.data_path is None:
        folder = tempfile.mkdtemp(prefix="benchmark_data_")
        args.data_path = make_demo_data(folder, size=args.source_size, seed=0, n_train=args.n_train, n_test_good=1,
                                        n_test_bad=1)["realiad"]
        args.dataset, args.classes = "realiad", list(DEMO_CLASSES)
    dataset = args.dataset or ("realiad" if os.path.isdir(os.path.join(args.data_path, "realiad_jsons")) else "mvtec")
    return [s for c in ds.class_names(dataset, args.classes)
            for s in ds.class_samples(dataset, args.data_path, c, "train")[0]]


def image_cache(samples: list[ds.Sample], args, mode: str) -> ImageCache | None:
    """A filled cache of the training images ("none" -> None): the steady state of a run past its first epoch."""
    if mode == "none":
        return None
    return filled(ImageCache([s.image_path for s in samples], args.image_size, mode, args.cache_dir))


def synthetic_data(samples: list[ds.Sample], args, mode: str) -> SyntheticAnomalyDataset:
    """CRR's training data (no textures) with filled caches of --cache_images `mode`."""
    caches = synthesis_caches(mode, samples, None, args.image_size, args.cache_dir)
    for c in caches.values():
        filled(c)
    return SyntheticAnomalyDataset(samples, args.image_size, args.crop_size, None, seed=0, caches=caches)


def filled(cache: ImageCache) -> ImageCache:
    for p in cache.paths:
        cache.get(p)
    return cache


def loader(dataset, args, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0)


# ----------------------------------------------------------------------------------------------- train

def method_model(encoder: str, method: str) -> models.ViTill:
    """A random model of `method` ("dinomaly", "dinomaly2" or "crr") built as its recipe says (recipes.PAPER)."""
    return checkpoints.build_model(encoder, "random", **checkpoints.model_options(PAPER[method]))


def reconstruction_model(args, mode: Mode, method: str) -> models.ViTill:
    torch.manual_seed(0)
    model = method_model(args.encoder, method).to(args.device)
    return speed.maybe_compile(model, mode.compile != "none", mode.compile)


def step_and_loader(name: str, args, mode: Mode, samples: list[ds.Sample]):
    """(step function, loader) of the Dinomaly ("dinomaly"), Dinomaly2 ("dinomaly2"), CRR Stage I ("crr_stage1") or
    Stage II ("crr_stage2") step in `mode`, with train.py's losses and optimisers and the method's recipe, at the
    hard-mining share after the ramp (the steady state of a long run). The fast mode runs train.train_step, the
    training loop's step; the reference mode the reference code's (backward, clip, step, loss.item())."""
    device = args.device
    speed.configure(mode.precision)
    torch.backends.cudnn.benchmark = mode.cudnn_benchmark

    def to(x):
        return x.to(device, non_blocking=mode.pin_memory)

    method = {"dinomaly": "dinomaly", "dinomaly2": "dinomaly2"}.get(name, "crr")
    recipe = PAPER[method]
    hm_p, hm_factor = recipe.hm_max_p, recipe.hm_factor
    if method == "crr":
        data = synthetic_data(samples, args, mode.cache)
    else:
        data = ds.TrainDataset(samples, args.image_size, args.crop_size, image_cache(samples, args, mode.cache))
    model = reconstruction_model(args, mode, method).train()
    batches = loader(data, args, args.num_workers, mode.pin_memory)

    def dinomaly_loss(img, it):
        with speed.autocast(device, mode.precision):
            en, de = model(to(img))
            return global_cosine_hm(en, de, p=hm_p, factor=hm_factor)

    def crr_loss(batch, it):
        img, aug = to(batch[0]), to(batch[1])
        with speed.autocast(device, mode.precision):
            if mode.crr_one_pass:
                return repair_loss(model, img, aug, hm_p, hm_factor)
            en, de = model(img)
            _, de_aug = model(aug)
            return global_cosine_hm(en, de, p=hm_p, factor=hm_factor) + \
                global_cosine_hm(en, de_aug, p=hm_p, factor=hm_factor)

    def stage2_loss(batch, it):
        return segmentation_loss(model, segnet, to(batch[1]), to(batch[2]), mode.precision)

    loss_fn = {"dinomaly": dinomaly_loss, "dinomaly2": dinomaly_loss, "crr_stage1": crr_loss,
               "crr_stage2": stage2_loss}[name]
    if name == "crr_stage2":  # the frozen Stage-I model keeps its test-time masking, as CRR's code does
        model.eval().requires_grad_(False).mask_in_eval = True
        model.mask_rng = mode.mask_rng
        segnet = models.segmentation_net(model.encoder.cfg.embed_dim).to(device).train()
        speed.maybe_compile(segnet, mode.compile != "none", mode.compile)
        params, clip = list(segnet.parameters()), None
        optimizer = torch.optim.Adam(params, lr=CRR_STAGE2.lr)
    else:
        params, clip = model.trainable_parameters(), recipe.clip_norm
        optimizer = reconstruction_optimizer(model, recipe)

    def reference_step(batch):
        loss = loss_fn(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
        optimizer.step()
        loss.item()

    def engine_step(batch):
        train_step(batch, 0, loss_fn, params, optimizer, None, clip, False)

    return engine_step if mode.engine_step else reference_step, batches


def bench_train(args) -> dict:
    samples = training_samples(args)
    rows, flops = [], {}
    for mode in modes(args):
        for name in args.steps:
            step, batches = step_and_loader(name, args, mode, samples)
            batches = cycle(batches)
            if name not in flops:  # once per setting, eager fp32 (the reference mode comes first)
                batch = next(batches)
                flops[name] = count_flops(lambda: step(batch))
            reset_peak(args.device)
            r = time_steps(step, batches, args.device, args.warmup, args.iters)
            r.update(step=name, mode=mode.name, images_per_s=r["iters_per_s"] * args.batch_size,
                     tflop_per_step=flops[name] / 1e12, tflops=flops[name] * r["iters_per_s"] / 1e12,
                     **peak_memory(args.device))
            if args.profile:
                r["profile"] = profile_ops(step, batches, args.device, args.profile)
            rows.append(r)
            write_report(args, dict(results=rows, partial=True))
            print(f"{name} {mode.name}: {r['iters_per_s']:.3g} it/s", file=sys.stderr)
            step = batches = None  # the next setting's peak memory without this one's model
    return report(rows, "step", "iters_per_s",
                  [("step", "step", ""), ("mode", "mode", ""), ("iters_per_s", "it/s", ".3g"),
                   ("images_per_s", "img/s", ".4g"), ("ms_per_iter", "ms/it", ".4g"),
                   ("tflop_per_step", "TFLOP/it", ".3g"), ("tflops", "TFLOP/s", ".3g"),
                   ("data_wait", "data wait", ".1%"), ("peak_gpu_mb", "GPU MB", ".0f"),
                   ("peak_host_mb", "host MB", ".0f")])


def report(rows: list[dict], key: str, value: str, columns: list[tuple[str, str, str]]) -> dict:
    """Print the rows as a table (and their profiles) and the fast/reference ratios of `value` per `key`; the
    JSON result."""
    ratios = speed_ratios(rows, key, value)
    for r in rows:
        if "profile" in r:
            print_profile(f"{r[key]}, {r['mode']} mode", r["profile"])
    print_table(rows, columns)
    print_ratios(ratios)
    return dict(results=rows, ratios=ratios)


def speed_ratios(rows: list[dict], key: str, value: str) -> dict:
    """{key: fast value / reference value}."""
    by = {(r[key], r["mode"]): r[value] for r in rows}
    return {k: by[(k, "fast")] / by[(k, "reference")] for k, m in by if m == "reference" and (k, "fast") in by}


def print_ratios(ratios: dict):
    print("fast / reference: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


# ----------------------------------------------------------------------------------------------- infer

def bench_infer(args) -> dict:
    """The Dinomaly map ("dinomaly"), Dinomaly2's ("dinomaly2") and CRR's fused map with its test-time masking
    ("crr_test") of a fixed batch, the scores read back to the host as in evaluation."""
    x = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, device=args.device)
    seeds = list(range(args.batch_size))
    rows, flops = [], {}
    for mode in modes(args):
        for task in args.tasks:
            crr = task == "crr_test"
            torch.manual_seed(0)  # the same weights in both modes
            model = method_model(args.encoder, "crr" if crr else task)
            model.mask_rng = mode.mask_rng
            segnet = models.segmentation_net(model.encoder.cfg.embed_dim) if crr else None
            mapper = AnomalyMapper(model.to(args.device).eval(), segnet and segnet.to(args.device).eval(),
                                   precision=mode.precision)
            torch.backends.cudnn.benchmark = mode.cudnn_benchmark
            speed.maybe_compile(model, mode.compile != "none", mode.compile)
            speed.maybe_compile(segnet, mode.compile != "none", mode.compile)

            @torch.no_grad()
            def step(img):
                mapper(img, seeds)[1].cpu()

            if task not in flops:
                flops[task] = count_flops(lambda: step(x))
            reset_peak(args.device)
            r = time_steps(step, iter(lambda: x, None), args.device, args.warmup, args.iters)
            r.update(mode=mode.name, task=task, images_per_s=r["iters_per_s"] * args.batch_size,
                     ms_per_image=r["ms_per_iter"] / args.batch_size, tflop_per_batch=flops[task] / 1e12,
                     tflops=flops[task] * r["iters_per_s"] / 1e12, **peak_memory(args.device))
            if args.profile:
                r["profile"] = profile_ops(step, iter(lambda: x, None), args.device, args.profile)
            del r["data_wait"]
            print(f"{task} {mode.name}: {r['ms_per_image']:.3g} ms/img", file=sys.stderr)
            model = segnet = mapper = None  # the next setting's peak memory without this model
            rows.append(r)
            write_report(args, dict(results=rows, partial=True))
    return report(rows, "task", "images_per_s",
                  [("task", "task", ""), ("mode", "mode", ""), ("images_per_s", "img/s", ".4g"),
                   ("ms_per_image", "ms/img", ".3g"), ("tflops", "TFLOP/s", ".3g"), ("peak_gpu_mb", "GPU MB", ".0f"),
                   ("peak_host_mb", "host MB", ".0f")])


# ----------------------------------------------------------------------------------------------- data

def bench_data(args) -> dict:
    samples = training_samples(args)
    datasets = {"plain": ds.TrainDataset(samples, args.image_size, args.crop_size),
                "synthesis": synthetic_data(samples, args, "none")}
    if args.cache != "none":
        cache = image_cache(samples, args, args.cache)
        datasets[f"cache ({args.cache})"] = ds.TrainDataset(samples, args.image_size, args.crop_size, cache)
        datasets[f"synthesis, cache ({args.cache})"] = synthetic_data(samples, args, args.cache)
    rows = []
    for workers in args.workers:
        for name, data in datasets.items():
            batches = cycle(loader(data, args, workers))
            r = time_steps(lambda b: None, batches, torch.device("cpu"), args.warmup, args.iters)
            rows.append(dict(transform=name, workers=workers, images_per_s=r["iters_per_s"] * args.batch_size,
                             **peak_memory(torch.device("cpu"))))
            write_report(args, dict(results=rows, partial=True))
            print(f"{name} {workers} workers: {rows[-1]['images_per_s']:.4g} img/s", file=sys.stderr)
    print_table(rows, [("transform", "transform", ""), ("workers", "workers", "d"),
                       ("images_per_s", "img/s", ".4g"), ("peak_host_workers_mb", "worker MB", ".0f")])
    return dict(results=rows)


# ----------------------------------------------------------------------------------------------- metrics

def bench_metrics(args) -> dict:
    """The seven metrics of utils.synthetic_class(maps, size, seed) fed batch by batch to utils.ClassAccumulator,
    as a streaming evaluation does; the time and memory of generating the maps are not counted."""
    tracemalloc.start()
    acc = utils.ClassAccumulator(args.aupro)  # its tables count in the peak memory
    seconds, input_bytes = 0.0, 0
    for batch in utils.synthetic_class(args.maps, args.size, args.seed, batch_size=args.batch_size):
        tracemalloc.reset_peak()
        start = time.perf_counter()
        acc.add(*batch[:4], has_mask=batch[4])
        seconds += time.perf_counter() - start
        input_bytes += sum(a.nbytes for a in batch)
    start = time.perf_counter()
    metrics = acc.compute()
    seconds += time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]  # the tables, one batch of maps, and the largest add or compute
    tracemalloc.stop()
    row = dict(maps=args.maps, size=args.size, aupro=args.aupro, seconds=seconds, peak_traced_mb=peak / 2 ** 20,
               input_mb=input_bytes / 2 ** 20, **peak_memory(torch.device("cpu")), **metrics)
    print_table([row], [("maps", "maps", "d"), ("size", "size", "d"), ("aupro", "AUPRO", ""),
                        ("seconds", "seconds", ".3g"), ("input_mb", "maps MB", ".0f"),
                        ("peak_traced_mb", "peak MB (metrics)", ".0f"), ("peak_host_mb", "peak MB (process)", ".0f")])
    print(utils.format_metrics("synthetic class", metrics))
    return dict(results=[row])


# ----------------------------------------------------------------------------------------------- serve

def random_run(folder: str, args) -> str:
    """A run folder with a randomly initialised model of --encoder at --image_size / --crop_size (no thresholds:
    the service gets --threshold)."""
    torch.manual_seed(0)
    torch.save(method_model(args.encoder, "dinomaly").state_dict(), os.path.join(folder, "model.pth"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": dict(encoder=args.encoder, image_size=args.image_size, crop_size=args.crop_size)}, f)
    return folder


def test_images(n: int, side: int) -> list[bytes]:
    """n seeded noise-and-shapes PNG files of side x side pixels (speed does not depend on their content)."""
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_serve(args) -> dict:
    """A loopback load test of serve.py against predict.py's path in this process, on the same images: the
    service (its own process, --max_batch, --max_wait_ms) answers --requests requests from 1, 4 and 16
    concurrent clients, each checked (one answer per request, the score of its image); predict.py's path is
    Detector.predict_prepared on the decoded images, in batches of --batch_size and one at a time."""
    import subprocess
    import httpx
    import numpy as np
    from dinomaly import serve
    from dinomaly.predict import Detector
    images = test_images(args.images, args.source_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_serve_") as tmp:
        checkpoint = args.checkpoint or random_run(tmp, args)
        threshold = None if args.checkpoint else 1.0
        detector = Detector(checkpoint, device=str(args.device), threshold=threshold)

        def direct(batch_size: int) -> tuple[list[float], list[float]]:  # (scores, seconds per batch)
            scores, times = [], []
            for i in range(0, len(images), batch_size):
                start = time.perf_counter()
                crops = [detector.prepare(serve.open_image(b, "image", 10 ** 9)) for b in images[i:i + batch_size]]
                found = detector.predict_prepared(torch.stack([c[0] for c in crops]), [c[1] for c in crops])
                times.append(time.perf_counter() - start)
                scores += [p.score for p in found]
            return scores, times

        def baseline(clients: int):  # predict.py's path, measured just before each load (the same machine load)
            for size in (args.batch_size, 1):
                found, times = direct(size)
                if not np.allclose(found, scores, rtol=1e-5, atol=0):
                    raise UserError(f"predict.py's path gave other scores in batches of {size}")
                rows.append(dict(path=f"predict.py's, batch {size}", clients=clients, requests=len(images),
                                 requests_per_s=len(images) / sum(times),
                                 p50_ms=1000 * float(np.percentile(times, 50)) if size == 1 else None,
                                 p99_ms=1000 * float(np.percentile(times, 99)) if size == 1 else None))
                print(f"direct, batch {size}: {rows[-1]['requests_per_s']:.3g} img/s", file=sys.stderr)

        scores = direct(args.batch_size)[0]  # also the warm-up
        port = serve_port()
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"), "--checkpoint",
               checkpoint, "--port", str(port), "--device", str(args.device), "--max_batch", str(args.max_batch),
               "--max_wait_ms", str(args.max_wait_ms)] + (["--threshold", "1.0"] if threshold else [])
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server)
            load(url, images, scores, 2, len(images), args.seconds)  # warm-up
            memory = [rss_mb(server.pid)]
            for c in args.clients:
                baseline(c)
                r = load(url, images, scores, c, args.requests, args.seconds)
                memory.append(rss_mb(server.pid))
                rows.append(dict(r, server_rss_mb=memory[-1]))
                write_report(args, dict(results=rows, partial=True))
                print(f"served, {c} clients: {r['requests_per_s']:.3g} req/s, p50 {r['p50_ms']:.3g} ms",
                      file=sys.stderr)
            health = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(30)
    print_table(rows, [("path", "path", ""), ("clients", "clients", "d"), ("requests", "requests", "d"),
                       ("requests_per_s", "req/s", ".3g"), ("p50_ms", "p50 ms", ".3g"), ("p99_ms", "p99 ms", ".3g"),
                       ("server_rss_mb", "server MB", ".0f")])
    print(f"batches the service ran (size: count): {health['batches']}; server memory (MB) after the warm-up and "
          f"after each load: {', '.join(f'{m:.0f}' for m in memory)}")
    return dict(results=rows, batches=health["batches"], server_rss_mb=memory)


def serve_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server, timeout: float = 300):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"serve.py stopped: {server.stderr.read().strip()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise UserError(f"serve.py did not answer /health within {timeout:g} s")


def load(url: str, images: list[bytes], scores: list[float], clients: int, requests: int, seconds: float) -> dict:
    """`clients` threads posting images (request i: image i mod N) until `requests` are sent or `seconds` pass;
    every answer is checked: status 200 and the score of its own image (1e-5 relative: batch composition)."""
    import itertools
    import threading
    import httpx
    import numpy as np
    latencies, answered, wrong, lock = [], collections.Counter(), [], threading.Lock()
    numbers, deadline = itertools.count(), time.monotonic() + seconds

    def client():
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline and (i := next(numbers)) < requests:
                k = i % len(images)
                start = time.perf_counter()
                r = http.post(url + "/predict", content=images[k])
                took = time.perf_counter() - start
                ok = r.status_code == 200 and abs(r.json()["images"][0]["score"] - scores[k]) <= 1e-5 * abs(scores[k])
                with lock:
                    answered[i] += 1
                    latencies.append(took) if ok else wrong.append(f"request {i}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if wrong or any(v != 1 for v in answered.values()):
        raise UserError(f"{len(wrong)} wrong answers under {clients} clients, e.g. {wrong[:1]}")
    return dict(path="served", clients=clients, requests=len(latencies), requests_per_s=len(latencies) / elapsed,
                p50_ms=1000 * float(np.percentile(latencies, 50)), p99_ms=1000 * float(np.percentile(latencies, 99)))


# ----------------------------------------------------------------------------------------------- command line

COMMANDS = {"train": bench_train, "infer": bench_infer, "data": bench_data, "metrics": bench_metrics,
            "serve": bench_serve}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    cmds = {name: sub.add_parser(name, help=text) for name, text in [
        ("train", "iterations/s of the training steps, reference vs fast"),
        ("infer", "images/s of the anomaly map, reference vs fast"),
        ("data", "loader images/s per worker count"),
        ("metrics", "seconds and memory of the metrics of one synthetic class"),
        ("serve", "requests/s and latency of serve.py under 1, 4, 16 clients, against predict.py's path")]}
    for name, c in cmds.items():
        c.add_argument("--json", help="also write the results to this JSON file")
        if name == "metrics":
            c.add_argument("--maps", type=int, default=2000, help="anomaly maps in the class")
            c.add_argument("--size", type=int, default=256, help="map side")
            c.add_argument("--aupro", choices=["exact", "dinomaly"], default="dinomaly")
            c.add_argument("--seed", type=int, default=0)
            c.add_argument("--batch_size", type=int, default=32, help="maps per ClassAccumulator.add")
            continue
        if name == "serve":
            serve_flags(c)
            continue
        c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        c.add_argument("--batch_size", type=int, default=32 if name == "infer" else 16)
        c.add_argument("--image_size", type=int, default=448)
        c.add_argument("--crop_size", type=int, default=392)
        c.add_argument("--warmup", type=int, default=1 if name == "data" else 5, help="untimed steps first")
        c.add_argument("--iters", type=int, default=20 if name == "data" else 30, help="timed steps")
        c.add_argument("--cache", choices=["none", "memory", "disk"], default="memory",
                       help="fast mode's image cache (data: the cache measured)")
        c.add_argument("--cache_dir", help="folder of a disk cache (default: a temporary folder)")
        if name != "data":
            c.add_argument("--encoder", choices=list(models.ENCODERS), default=models.DEFAULT_ENCODER,
                           help="random weights of this encoder's architecture (a crop that is a multiple of its "
                                "patch size: 448 for the patch-16 encoders)")
            c.add_argument("--precision", choices=speed.PRECISIONS, default="bf16", help="fast mode's precision")
            c.add_argument("--compile", default="inductor",
                           help="fast mode's torch.compile backend (inductor, aot_eager, ...) or none")
        if name != "infer":
            c.add_argument("--data_path", help="a dataset (MVTec or Real-IAD layout); default: generated")
            c.add_argument("--dataset", choices=sorted(ds.DATASETS), help="its reader (default: from its layout)")
            c.add_argument("--classes", nargs="+", help="its classes (default: all folders)")
            c.add_argument("--source_size", type=int, default=1024, help="generated images' side (Real-IAD: 1024)")
            c.add_argument("--n_train", type=int, default=32, help="generated training images per class (3 classes)")
            c.add_argument("--num_workers", type=int, default=min(16, os.cpu_count() or 1))
        if name in ("train", "infer"):
            c.add_argument("--profile", type=int, default=0, metavar="N",
                           help="after the timing, profile N more steps of each setting (torch.profiler) and print "
                                "the operators that take the most time")
        if name == "infer":
            c.add_argument("--tasks", nargs="+", default=["dinomaly", "dinomaly2", "crr_test"],
                           choices=["dinomaly", "dinomaly2", "crr_test"])
        if name == "train":
            c.add_argument("--steps", nargs="+", default=["dinomaly", "dinomaly2", "crr_stage1", "crr_stage2"],
                           choices=["dinomaly", "dinomaly2", "crr_stage1", "crr_stage2"])
        if name == "data":
            c.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16])
    return p


def serve_flags(c):
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--checkpoint", help="a run folder to serve (default: random weights of --encoder)")
    c.add_argument("--encoder", choices=list(models.ENCODERS), default="dinov2reg_vit_small_14")
    c.add_argument("--image_size", type=int, default=128, help="without --checkpoint: the model's input size")
    c.add_argument("--crop_size", type=int, default=112)
    c.add_argument("--source_size", type=int, default=256, help="the images' side (PNG)")
    c.add_argument("--images", type=int, default=16, help="different images, sent in turn")
    c.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, in turn")
    c.add_argument("--requests", type=int, default=96, help="requests per client count at most")
    c.add_argument("--seconds", type=float, default=60, help="time per client count at most")
    c.add_argument("--batch_size", type=int, default=8, help="predict.py's batch (its --batch_size default)")
    c.add_argument("--max_batch", type=int, default=8, help="the service's --max_batch")
    c.add_argument("--max_wait_ms", type=float, default=5.0, help="the service's --max_wait_ms")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if hasattr(args, "device"):
        args.device = torch.device(args.device)
    if hasattr(args, "encoder"):
        cfg = models.encoder_config(args.encoder)
        check_sizes(args.image_size, args.crop_size, cfg.patch_size, cfg.fixed_grid)
    with contextlib.ExitStack() as stack:
        if getattr(args, "cache_dir", "") is None:
            args.cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="benchmark_cache_"))
        args.where = (torch.cuda.get_device_name(args.device) if getattr(args, "device", None) is not None
                      and args.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads")
        print(f"{args.command}: {args.where}, torch {torch.__version__}")
        return write_report(args, COMMANDS[args.command](args))


def write_report(args, result: dict) -> dict:
    """The report (command, device, settings, results) written to --json. The subcommands write it after each
    setting too, marked "partial", so a run cut short keeps what it measured."""
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items() if k != "where"}
    report = dict(command=args.command, device=args.where, torch=torch.__version__, settings=settings, **result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
