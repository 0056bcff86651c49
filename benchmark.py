"""Speed at the scale users run, each subcommand printing a table and writing JSON (--json PATH):

    python benchmark.py train   [--encoder dinov2reg_vit_base_14 --batch_size 16 --crop_size 392 --data_path DIR]
    python benchmark.py infer   [--batch_size 32]
    python benchmark.py data    [--workers 0 1 2 4 8 16]
    python benchmark.py metrics [--maps 2000 --size 256]
    python benchmark.py serve   [--checkpoint RUN --clients 1 4 16 --requests 96]
    python benchmark.py deploy  [--models dinov2reg_vit_small_14:224 --batch_sizes 1 8 --threads 2 --profile 5]

`train` times the Dinomaly step, the CRR Stage I step (anomaly synthesis included, through the real loader)
and the CRR Stage II step, with train.py's losses and optimisers and each method's recipe (recipes.py); `infer`
times anomaly_map.AnomalyMapper (images/s, ms/image) for the Dinomaly map and CRR's fused map. The steps and tasks
`dinomaly2_rgbd` and `dinomaly2_rgbir` (not run by default) are Dinomaly2 on pairs, with the recipes of
dinomaly2_mvtec3d.py and dinomaly2_mulsen.py (but --encoder): there img/s counts samples, a pair as one. Both
run each in two modes in one process and print the ratio fast / reference:
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

`deploy` times one exported Dinomaly map (export.py's graph, random weights) in PyTorch eager, torch.compile,
ONNX Runtime (fp32, dynamic INT8) and OpenVINO (fp32, NNCF INT8; fp16 or bf16 where the processor computes in
them; on a GPU ONNX Runtime's CUDA and TensorRT providers where installed), interleaved call by call in one
process, with the processor's name, instruction sets, its measured float32 and int8 matmul rates (the roofline)
and, with --profile, each runtime's own per-node timing.

`data` times the loader alone (images/s per worker count) for the plain transform and CRR synthesis, each
without and with the image cache. `metrics` times the seven metrics of one synthetic class of N maps
(utils.synthetic_class) fed batch by batch to utils.ClassAccumulator, and their peak memory. `serve` is a
loopback load test of serve.py (its own process) against predict.py's path in this process (bench_serve).

Without --data_path, a dataset is generated (prepare_data/make_demo_data.py, Real-IAD layout, JPEG images of
--source_size px) in a temporary folder; for the pair steps, pairs (prepare_data/make_demo_pairs.py, the depth
prepared by prepare_data/prepare_mvtec3d.py as a user prepares MVTec 3D-AD once). With --data_path, the steps
run on that dataset: an image dataset for the image steps, --dataset mvtec3d or mulsen for its pair step.
Weights are random: speed does not depend on them.
"""
import argparse
import collections
import contextlib
import gc
import itertools
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from dinomaly import dataset as ds
from dinomaly import checkpoints, modalities, models, speed, utils
from dinomaly.anomaly_map import AnomalyMapper
from dinomaly.recipes import CRR_STAGE2, PAPER
from dinomaly.train import reconstruction_optimizer, repair_loss, segmentation_loss, train_step
from dinomaly.encoders import check_sizes
from dinomaly.errors import UserError
from dinomaly.image_cache import ImageCache
from dinomaly.options import MAX_SCORE_CHANGE
from dinomaly.loss import global_cosine_hm
from dinomaly.synthesis import SyntheticAnomalyDataset, synthesis_caches

from prepare_data import prepare_mvtec3d
from prepare_data.make_demo_data import CLASSES as DEMO_CLASSES
from prepare_data.make_demo_data import make_demo_data
from prepare_data.make_demo_pairs import CLASSES as PAIR_CLASSES
from prepare_data.make_demo_pairs import make_demo_pairs

import dinomaly2_mulsen
import dinomaly2_mvtec3d

# the methods' recipes, and Dinomaly2's on pairs (a step or task of that name): the settings' training recipes
RECIPES = {**PAPER, "dinomaly2_rgbd": dinomaly2_mvtec3d.RECIPE, "dinomaly2_rgbir": dinomaly2_mulsen.RECIPE}
PAIR_DATASETS = {"dinomaly2_rgbd": "mvtec3d", "dinomaly2_rgbir": "mulsen"}  # a pair setting -> its dataset
TRAIN_STEPS = ["dinomaly", "dinomaly2", "crr_stage1", "crr_stage2", *PAIR_DATASETS]
INFER_TASKS = ["dinomaly", "dinomaly2", "crr_test", *PAIR_DATASETS]



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

def training_samples(args, step: str = "dinomaly") -> list[ds.Sample]:
    """The training samples of a step: of --data_path (--dataset, --classes), or of a generated dataset (Real-IAD
    layout; the pair steps: pairs of MVTec 3D-AD's or MulSen-AD's layout)."""
    pairs = PAIR_DATASETS.get(step)
    if args.data_path is None:
        return [s for c in (PAIR_CLASSES if pairs else DEMO_CLASSES)
                for s in ds.class_samples(pairs or "realiad", generated(args, pairs), c, "train")[0]]
    dataset = args.dataset or ("realiad" if os.path.isdir(os.path.join(args.data_path, "realiad_jsons")) else "mvtec")
    if (dataset in PAIR_DATASETS.values() or pairs) and dataset != pairs:
        raise UserError(f"--data_path {args.data_path} (--dataset {dataset}) is not the dataset of the {step} step: "
                        + (f"pass --dataset {pairs}, or no --data_path for generated pairs" if pairs else
                           f"time its pair step ({', '.join(PAIR_DATASETS)}), or pass an image dataset"))
    return [s for c in ds.class_names(dataset, args.classes)
            for s in ds.class_samples(dataset, args.data_path, c, "train")[0]]


GENERATED: dict[tuple, str] = {}  # the datasets generated in this process: (layout, size, n_train) -> folder


def generated(args, pairs: str | None) -> str:
    """A generated dataset's folder, written on first use: Real-IAD's layout (pairs None), or pairs of MVTec
    3D-AD's ("mvtec3d", the depth prepared once, as users prepare the dataset) or MulSen-AD's ("mulsen")."""
    key = (pairs or "realiad", args.source_size, args.n_train)
    if key not in GENERATED:
        folder = tempfile.mkdtemp(prefix="benchmark_data_")
        counts = dict(size=args.source_size, seed=0, n_train=args.n_train, n_test_good=1, n_test_bad=1)
        if pairs is None:
            GENERATED[key] = make_demo_data(folder, **counts)["realiad"]
        else:
            made = make_demo_pairs(folder, **counts)
            prepared = os.path.join(folder, "mvtec3d_prepared")
            if prepare_mvtec3d.main(["--data_path", made["mvtec3d"], "--out", prepared, "--workers", "1"]) != 0:
                raise UserError("the generated point clouds could not be prepared (see above)")
            GENERATED[("mvtec3d", *key[1:])], GENERATED[("mulsen", *key[1:])] = prepared, made["mulsen"]
    return GENERATED[key]


def image_cache(samples: list[ds.Sample], args, mode: str) -> ImageCache | None:
    """A filled cache of the training images (both of a pair; "none" -> None): the steady state of a run past its
    first epoch."""
    if mode == "none":
        return None
    kind = samples[0].pair_kind
    if kind is None:
        return filled(ImageCache([s.image_path for s in samples], args.image_size, mode, args.cache_dir))
    return filled(ImageCache([s.image_path for s in samples] + [s.pair_path for s in samples], args.image_size, mode,
                             args.cache_dir, modalities.pair_reader(kind)))


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
    """A random model of `method` ("dinomaly", "dinomaly2", "crr", or Dinomaly2 on pairs: "dinomaly2_rgbd",
    "dinomaly2_rgbir") built as its recipe says (RECIPES)."""
    return checkpoints.build_model(encoder, "random", **checkpoints.model_options(RECIPES[method]))


def reconstruction_model(args, mode: Mode, method: str) -> models.ViTill:
    torch.manual_seed(0)
    model = method_model(args.encoder, method).to(args.device)
    return speed.maybe_compile(model, mode.compile != "none", mode.compile)


def step_and_loader(name: str, args, mode: Mode, samples: list[ds.Sample]):
    """(step function, loader) of the Dinomaly ("dinomaly"), Dinomaly2 ("dinomaly2", on pairs "dinomaly2_rgbd",
    "dinomaly2_rgbir"), CRR Stage I ("crr_stage1") or Stage II ("crr_stage2") step in `mode`, with train.py's
    losses and optimisers and the method's recipe, at the hard-mining share after the ramp (the steady state of a
    long run). The fast mode runs train.train_step, the training loop's step; the reference mode the reference
    code's (backward, clip, step, loss.item())."""
    device = args.device
    speed.configure(mode.precision)
    torch.backends.cudnn.benchmark = mode.cudnn_benchmark

    def to(x):
        return x.to(device, non_blocking=mode.pin_memory)

    method = "crr" if name.startswith("crr") else name
    recipe = RECIPES[method]
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

    loss_fn = {"crr_stage1": crr_loss, "crr_stage2": stage2_loss}.get(name, dinomaly_loss)
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
    samples = {name: training_samples(args, name) for name in args.steps}
    rows, flops = [], {}
    for mode in modes(args):
        for name in args.steps:
            step, batches = step_and_loader(name, args, mode, samples[name])
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
    """The Dinomaly map ("dinomaly"), Dinomaly2's ("dinomaly2"; of pairs: "dinomaly2_rgbd", "dinomaly2_rgbir") and
    CRR's fused map with its test-time masking ("crr_test") of a fixed batch, the scores read back to the host as
    in evaluation."""
    inputs = {c: torch.randn(args.batch_size, c, args.crop_size, args.crop_size, device=args.device) for c in (3, 6)}
    seeds = list(range(args.batch_size))
    rows, flops = [], {}
    for mode in modes(args):
        for task in args.tasks:
            crr = task == "crr_test"
            torch.manual_seed(0)  # the same weights in both modes
            model = method_model(args.encoder, "crr" if crr else task)
            model.mask_rng = mode.mask_rng
            x = inputs[models.MODALITIES[model.modality]]
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
                found = detector.predict_prepared(np.stack([c[0] for c in crops]), [c[1] for c in crops])
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


# ----------------------------------------------------------------------------------------------- deploy

ISA_FLAGS = {"AVX2": "avx2", "FMA": "fma", "AVX-512": "avx512f", "AVX512-VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni",
             "AVX512-BF16": "avx512_bf16", "AVX512-FP16": "avx512_fp16", "AMX-INT8": "amx_int8",
             "AMX-BF16": "amx_bf16", "AMX-FP16": "amx_fp16"}


def cpu_info() -> dict:
    """The processor's name and which of the instruction sets that matter for inference it has (/proc/cpuinfo)."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return dict(processor=name, logical_cpus=os.cpu_count(),
                instruction_sets={k: v in flags for k, v in ISA_FLAGS.items()})


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def roofline(threads: int, size: int, repeats: int = 5) -> dict:
    """The processor's measured matrix-multiply rate at `threads`: float32 (PyTorch's torch.mm, size x size) and
    int8 (ONNX Runtime's MatMulInteger, uint8 x int8 -> int32, the kernel of its dynamic INT8), in GOP/s."""
    import onnxruntime
    from onnx import TensorProto, helper
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = 2 * size ** 3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("B", TensorProto.INT8, [size, size],
                                rng.integers(-127, 128, (size, size), dtype=np.int8).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mm",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.integers(0, 256, (size, size), dtype=np.uint8)
    int8 = 2 * size ** 3 / best_seconds(lambda: session.run(None, {"A": x}), repeats) / 1e9
    return dict(fp32_gflops=fp32, int8_gops=int8, matrix=size)


def deploy_files(model, crop: int, work: str, runtimes: list[str], int8) -> dict:
    """The exported files the runtimes need, written by export.py's own code: {runtime: path}."""
    from dinomaly import export, exported
    meta = {exported.MARK: 1, "image_size": crop, "crop_size": crop, "mean": list(ds.IMAGENET_MEAN),
            "std": list(ds.IMAGENET_STD)}
    precisions = {"ort": ("onnx", "fp32"), "ort_int8": ("onnx", "int8"), "ort_cuda": ("onnx", "fp32"), "ort_tensorrt": ("onnx", "fp32"), "ov": ("openvino", "fp32"),
                  "ov_fp16": ("openvino", "fp32"), "ov_bf16": ("openvino", "fp32"), "ov_int8": ("openvino", "int8")}
    files, written = {}, {}
    for name in runtimes:
        if name not in precisions:
            continue
        fmt, precision = precisions[name]
        if (fmt, precision) not in written:
            path = os.path.join(work, f"{fmt}_{precision}{'.onnx' if fmt == 'onnx' else '.xml'}")
            sub = tempfile.mkdtemp(dir=work)
            if fmt == "onnx":
                export.write_onnx(model, crop, path, precision, meta, sub, int8)
            else:
                export.write_openvino(model, crop, path, precision, meta, sub, int8)
            written[(fmt, precision)] = path
        files[name] = written[(fmt, precision)]
    return files


RUNTIME_DEVICE = {"ort_cuda": "cuda", "ort_tensorrt": "tensorrt"}
RUNTIME_HINTS = {"ov_fp16": "f16", "ov_bf16": "bf16"}  # OpenVINO's inference precision hint


def open_runtime(name: str, path: str | None, model, threads: int, compile_backend: str = "inductor"):
    """A callable images [B, 3, crop, crop] float32 in [0, 1] -> outputs, for one runtime."""
    from dinomaly import exported
    if name in ("eager", "compile"):
        net = model if name == "eager" else torch.compile(model, backend=compile_backend)

        @torch.no_grad()
        def run(x):
            return net(torch.from_numpy(x))
        return run
    graph = exported.Graph(path, RUNTIME_DEVICE.get(name), threads, spin=False)  # spinning threads would slow
    # the runtimes interleaved with it
    if name in RUNTIME_HINTS:  # recompile with the precision hint
        ov = exported.import_openvino()
        core = ov.Core()
        graph.compiled = core.compile_model(exported.one_image(core.read_model(path)), "CPU",
                                            {"INFERENCE_NUM_THREADS": threads,
                                             "INFERENCE_PRECISION_HINT": RUNTIME_HINTS[name]})
        graph.request = graph.compiled.create_infer_request()
    return graph


def available_runtimes(args, cpu: dict) -> tuple[list[str], dict]:
    """The runtimes asked for that this machine can run, and why the others are left out."""
    import onnxruntime
    isa, providers = cpu["instruction_sets"], onnxruntime.get_available_providers()
    reasons = {}
    if not (isa["AVX512-FP16"] or isa["AMX-FP16"]):
        reasons["ov_fp16"] = "no float16 arithmetic on this processor (AVX512-FP16 or AMX-FP16)"
    if not (isa["AVX512-BF16"] or isa["AMX-BF16"]):
        reasons["ov_bf16"] = "no bfloat16 arithmetic on this processor (AVX512-BF16 or AMX-BF16)"
    if "CUDAExecutionProvider" not in providers or not torch.cuda.is_available():
        reasons["ort_cuda"] = "no GPU, or onnxruntime without its CUDA execution provider (onnxruntime-gpu)"
    if "TensorrtExecutionProvider" not in providers or not torch.cuda.is_available():
        reasons["ort_tensorrt"] = "no GPU, or onnxruntime without its TensorRT execution provider"
    return [r for r in args.runtimes if r not in reasons], {r: why for r, why in reasons.items() if r in args.runtimes}


def ort_profile(path: str, threads: int, x: np.ndarray, steps: int) -> dict:
    """ONNX Runtime's own per-node timing: ms per step by operator type and by part of the model."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(steps + 1):
        session.run(None, {"image": x})
    with open(session.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = [(e["name"][:-len("_kernel_time")], e["args"].get("op_name", "?"), e["dur"] / 1000) for e in events]
    return summarise_profile(nodes, steps + 1)


def ov_profile(graph, x: np.ndarray, steps: int) -> dict:
    """OpenVINO's own per-node timing (PERF_COUNT): ms per step by node type and kernel, and by part."""
    from dinomaly import exported
    ov = exported.import_openvino()
    core = ov.Core()
    compiled = core.compile_model(exported.one_image(core.read_model(graph.path)), "CPU",
                                  {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": graph.threads})
    request = compiled.create_infer_request()
    nodes = []
    for _ in range(steps):
        request.infer({0: x})
        nodes += [(p.node_name, f"{p.node_type} ({p.exec_type})", p.real_time.total_seconds() * 1000)
                  for p in request.profiling_info if p.real_time.total_seconds() > 0]
    return summarise_profile(nodes, steps)


def part_of(node: str) -> str:
    for part in ("encoder", "bottleneck", "decoder"):
        if f"/model/{part}" in node:
            return part
    return "map, score, classes"


def summarise_profile(nodes: list[tuple[str, str, float]], steps: int, top: int = 10) -> dict:
    by_type, by_part = {}, {}
    for name, kind, ms in nodes:
        by_type[kind] = by_type.get(kind, 0.0) + ms / steps
        by_part[part_of(name)] = by_part.get(part_of(name), 0.0) + ms / steps
    total = sum(by_type.values()) or 1.0
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1])[:top]
    return dict(total_ms=total, by_type=[dict(op=k, ms=v, share=v / total) for k, v in ranked],
                by_part={k: dict(ms=v, share=v / total) for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])})


def bench_deploy(args) -> dict:
    """PyTorch eager, torch.compile, ONNX Runtime (fp32, dynamic INT8) and OpenVINO (fp32, NNCF INT8; fp16/bf16
    where the processor has them) on the exported Dinomaly map of random ViTs, interleaved in one process."""
    from dinomaly import quantize
    torch.set_num_threads(args.threads)
    cpu = cpu_info()
    runtimes, left_out = available_runtimes(args, cpu)
    load_before = os.getloadavg()
    peak = roofline(args.threads, args.roofline_size)
    print(f"{cpu['processor']}, {cpu['logical_cpus']} logical CPUs, {args.threads} threads; instruction sets: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["instruction_sets"].items()))
    print(f"measured matmul rate: fp32 {peak['fp32_gflops']:.0f} GFLOP/s (torch.mm), int8 {peak['int8_gops']:.0f} "
          f"GOP/s (onnxruntime MatMulInteger), {peak['matrix']}^2; load average {load_before[0]:.2f}")
    for name, why in left_out.items():
        print(f"not timed: {name}: {why}")
    rows, profiles = [], {}
    for spec in args.models:
        encoder, crop = spec.split(":")
        crop = int(crop)
        torch.manual_seed(0)
        mapper = AnomalyMapper(method_model(encoder, "dinomaly").eval())
        from dinomaly.export import ExportedMapper, for_export
        model = ExportedMapper(for_export(mapper, crop)).eval()
        with tempfile.TemporaryDirectory(prefix="deploy_") as work:
            rng = np.random.default_rng(0)
            images = [rng.random((1, 3, crop, crop), dtype=np.float32)
                      for _ in range(args.calibration_images + quantize.SELECTION_IMAGES)]
            int8 = quantize.Int8(images[quantize.SELECTION_IMAGES:], images[:quantize.SELECTION_IMAGES],
                                 args.max_score_change)  # as export.py: its layer selection too
            files = deploy_files(model, crop, work, runtimes, int8)
            opened = {r: open_runtime(r, files.get(r), model, args.threads, args.compile) for r in runtimes}
            one = torch.rand(1, 3, crop, crop)
            with torch.no_grad():
                flops = count_flops(lambda: model(one))
            for batch in args.batch_sizes:
                x = np.random.default_rng(1).random((batch, 3, crop, crop), dtype=np.float32)
                for r, run in opened.items():
                    for _ in range(args.warmup):
                        run(x)
                times = {r: [] for r in opened}
                for i in range(args.iters):
                    order = list(opened)[i % len(opened):] + list(opened)[:i % len(opened)]
                    for r in order:
                        start = time.perf_counter()
                        opened[r](x)
                        times[r].append(time.perf_counter() - start)
                for r in opened:
                    ms = 1000 * float(np.median(times[r])) / batch
                    int8 = r.endswith("int8")
                    rate = flops / (ms / 1000) / 1e9
                    rows.append(dict(model=spec, batch=batch, runtime=r, ms_per_image=ms,
                                     images_per_s=1000 / ms, gflop_per_image=flops / 1e9, achieved_gops=rate,
                                     share_of_peak=rate / (peak["int8_gops"] if int8 else peak["fp32_gflops"]),
                                     peak_used="int8" if int8 else "fp32"))
                eager = next(row["ms_per_image"] for row in rows if row["model"] == spec and row["batch"] == batch
                             and row["runtime"] == "eager") if "eager" in opened else None
                for row in rows:
                    if row["model"] == spec and row["batch"] == batch:
                        row["speedup_vs_eager"] = None if eager is None else eager / row["ms_per_image"]
                write_report(args, dict(results=rows, partial=True))
                print(f"{spec} batch {batch} done", file=sys.stderr)
            if args.profile:
                x = np.random.default_rng(1).random((1, 3, crop, crop), dtype=np.float32)
                for r in runtimes:
                    if r.startswith("ort") and r in files and r not in RUNTIME_DEVICE:
                        profiles[f"{spec} {r}"] = ort_profile(files[r], args.threads, x, args.profile)
                    elif r in ("ov", "ov_int8"):
                        profiles[f"{spec} {r}"] = ov_profile(opened[r], x, args.profile)
                    elif r == "eager":
                        ops = profile_ops(opened[r], itertools.repeat(x), torch.device("cpu"),
                                          args.profile)
                        profiles[f"{spec} {r}"] = dict(by_type=[dict(op=o["op"], ms=o["ms_per_step"],
                                                                     share=o["share"]) for o in ops])
            opened = None
    for title, p in profiles.items():
        print(f"profile, {title} (batch 1, ms per image" + (f", total {p['total_ms']:.1f})" if "total_ms" in p
                                                            else ")"))
        if "by_part" in p:
            print("  " + ", ".join(f"{k} {v['ms']:.1f} ({v['share']:.0%})" for k, v in p["by_part"].items()))
        print_table(p["by_type"], [("op", "operator (kernel)", ""), ("ms", "ms", ".2f"), ("share", "share", ".1%")])
    print_table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("runtime", "runtime", ""),
                       ("ms_per_image", "ms/img", ".1f"), ("images_per_s", "img/s", ".3g"),
                       ("speedup_vs_eager", "x eager", ".2f"), ("achieved_gops", "GOP/s", ".0f"),
                       ("share_of_peak", "of peak", ".0%"), ("peak_used", "peak", "")])
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    return dict(results=rows, cpu=cpu, threads=args.threads, roofline=peak, not_timed=left_out, profiles=profiles,
                load_average=dict(before=load_before, after=load_after))


# ----------------------------------------------------------------------------------------------- command line

COMMANDS = {"train": bench_train, "infer": bench_infer, "data": bench_data, "metrics": bench_metrics,
            "serve": bench_serve, "deploy": bench_deploy}
DEPLOY_RUNTIMES = ["eager", "compile", "ort", "ort_int8", "ov", "ov_int8", "ov_fp16", "ov_bf16", "ort_cuda",
                   "ort_tensorrt"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    cmds = {name: sub.add_parser(name, help=text) for name, text in [
        ("train", "iterations/s of the training steps, reference vs fast"),
        ("infer", "images/s of the anomaly map, reference vs fast"),
        ("data", "loader images/s per worker count"),
        ("metrics", "seconds and memory of the metrics of one synthetic class"),
        ("serve", "requests/s and latency of serve.py under 1, 4, 16 clients, against predict.py's path")]}
    deploy = sub.add_parser("deploy", help="ms/image of PyTorch, ONNX Runtime and OpenVINO (fp32, INT8) on a CPU")
    deploy.add_argument("--json", help="also write the results to this JSON file")
    deploy.add_argument("--models", nargs="+", default=["dinov2reg_vit_small_14:224", "dinov2reg_vit_base_14:392"],
                        metavar="ENCODER:CROP", help="random Dinomaly models of these encoders at these crops")
    deploy.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    deploy.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of every runtime (default: the logical CPUs)")
    deploy.add_argument("--runtimes", nargs="+", default=DEPLOY_RUNTIMES, choices=DEPLOY_RUNTIMES)
    deploy.add_argument("--compile", default="inductor", help="torch.compile's backend for the compile runtime")
    deploy.add_argument("--warmup", type=int, default=2, help="untimed calls of each runtime first")
    deploy.add_argument("--iters", type=int, default=10, help="timed calls of each runtime, interleaved")
    deploy.add_argument("--calibration_images", type=int, default=16,
                        help="random images calibrating the OpenVINO INT8 model (its speed does not depend on them)")
    deploy.add_argument("--max_score_change", type=float, default=MAX_SCORE_CHANGE,
                        help="the INT8 exports' layer selection, as export.py's (measured on 8 more random images)")
    deploy.add_argument("--roofline_size", type=int, default=2048, help="matrix side of the matmul rate measured")
    deploy.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timing, N more batch-1 calls of each runtime under its own profiler "
                             "(ONNX Runtime's, OpenVINO's PERF_COUNT, torch.profiler): where the time goes")
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
            c.add_argument("--tasks", nargs="+", default=INFER_TASKS[:3], choices=INFER_TASKS,
                           help="what to time (the pairs' tasks are not run by default)")
        if name == "train":
            c.add_argument("--steps", nargs="+", default=TRAIN_STEPS[:4], choices=TRAIN_STEPS,
                           help="what to time (the pairs' steps are not run by default)")
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
