"""The engine: the one training loop, the one evaluation loop, and the recipes of the five jobs.

- `dinomaly_main`: train Dinomaly on all classes (or load `--checkpoint` with `--eval_only`), then evaluate.
- `dinomaly2_main`: the same with Dinomaly2's model and recipe (2D, few-shot with --shot, multi-view datasets).
- `crr_stage1_main`: CRR Stage I, reconstruction + repair of synthetic anomalies, then evaluate.
- `crr_stage2_main`: CRR Stage II, the segmentation network on the frozen Stage-I model.
- `crr_test_main`: CRR test, the fused map.
"""
import csv
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import class_finder, fewshot, models, own_data, preflight, speed, train_state
from . import dataset as ds
from . import thresholds as th
from .anomaly_map import MAP_SIZE, AnomalyMapper, binarize_gt, check_max_ratio
from .errors import UserError
from .flags import ADAM_EPS
from .image_cache import build_cache
from .loss import focal_loss, global_cosine_hm, hard_mining_factor
from .multiview import ObjectAccumulator
from .optimizers import StableAdamW, WarmCosineSchedule, WarmupRatioSchedule
from .report import ClassReport
from .run import Run, log, save_atomic, seed_everything
from .thresholds import Calibration, PixelSample
from .utils import ClassAccumulator, nanmean, read_metrics_csv, write_metrics_csv

# ----------------------------------------------------------------------------------------------- the recipes
# Reconstruction training (Dinomaly, CRR Stage I, Dinomaly2): StableAdamW, warm-up then cosine, clipping, hard mining.
# The model each method trains is described by its settings (models.PAPER_SETTINGS); how it trains, here.


@dataclass(frozen=True)
class Recipe:
    lr: float  # the bottleneck's and the decoder's learning rate (Dinomaly2: --bottleneck_in_lr for its first layer)
    amsgrad: bool
    # "cosine": linspace(0, lr) over WARMUP_ITERS, then a cosine to LR_FINAL (Dinomaly's WarmCosineScheduler);
    # "ratio": each group's lr0 * it / WARMUP_ITERS, then a cosine to lr0 * --lr_decay_ratio (Dinomaly2's
    # WarmupCosineScheduler; ratio 1: constant)
    schedule: str


RECIPES = {
    "dinomaly": Recipe(lr=2e-3, amsgrad=True, schedule="cosine"),
    "crr": Recipe(lr=2e-3, amsgrad=True, schedule="cosine"),
    "dinomaly2": Recipe(lr=2e-3, amsgrad=False, schedule="ratio"),
}
LR_FINAL, WARMUP_ITERS = 2e-4, 100
BETAS, WEIGHT_DECAY = (0.9, 0.999), 1e-4  # StableAdamW's; its epsilon is --adam_eps (flags.ADAM_EPS)
CLIP_NORM = 0.1
HM_MAX_P, HM_RAMP_ITERS, HM_FACTOR = 0.9, 1000, 0.1  # share of easy positions, iterations to reach it, their weight
# CRR Stage II: Adam on the segmentation network, checkpoints Seg_model_3999.pth, Seg_model_7999.pth, ...
SEG_LR = 1e-4
SEG_SAVE_EVERY = 4000
MAX_BAD_STEPS = 10  # non-finite losses in a row that stop a run
SEGMENTATION_FILES = ["Seg_model_*.pth", train_state.SEGMENTATION]  # CRR Stage II's, in Stage I's run folder


# ----------------------------------------------------------------------------------------------- training

def train_loader(run: Run, dataset, batch_size: int) -> DataLoader:
    """Shuffled (each epoch's order a function of the seed and the epoch), drop_last; under torchrun each process
    gets batch_size / world_size of every batch."""
    if batch_size % run.world_size:
        raise UserError(f"--batch_size {batch_size} is not divisible by the {run.world_size} processes")
    if len(dataset) < batch_size:
        raise UserError(f"only {len(dataset)} training images, fewer than --batch_size {batch_size}")
    log.info(f"train images: {len(dataset)}")
    sampler = train_state.EpochSampler(dataset, run.world_size, run.rank, run.args.seed)
    g = torch.Generator()
    g.manual_seed(run.args.seed)
    return DataLoader(dataset, batch_size=batch_size // run.world_size, sampler=sampler,
                      num_workers=run.args.num_workers, drop_last=True, generator=g,
                      pin_memory=run.device.type == "cuda",
                      persistent_workers=run.args.num_workers > 0)


def train_loop(run: Run, loader: DataLoader, total_iters: int, loss_fn, params: list, optimizer,
               schedule: WarmCosineSchedule | WarmupRatioSchedule | None = None, clip: float | None = None,
               on_iter_end=None, start: int = 0, save_state=None):
    """The one training loop, from iteration `start`: per step forward + loss (loss_fn(batch, it)) -> zero_grad ->
    backward -> clip -> step (train_step), skipped when the loss is not finite; the learning rate of iteration
    `it` is schedule(it). Epoch e is read in the sampler's order for e, from the batch where `start` falls.
    on_iter_end(done) runs after each step; save_state(done) every --save_every iterations, at the end, on Ctrl-C
    (then KeyboardInterrupt) and after MAX_BAD_STEPS skipped steps in a row (then UserError)."""
    per_epoch = loader.sampler.num_samples // loader.batch_size
    it, losses, skipped, bad_in_row = start, [], 0, 0
    begin, data_wait = time.time(), speed.DataWait()
    with train_state.StopRequest(again_interrupts=run.world_size == 1) as stop, \
            tqdm(initial=start, total=total_iters, desc="train", disable=progress_off(run), dynamic_ncols=True) as bar:
        while it < total_iters:
            epoch, done_in_epoch = divmod(it, per_epoch)
            loader.sampler.set_epoch(epoch, skip=done_in_epoch * loader.batch_size)
            for batch in data_wait.iterate(loader):
                loss, updated, stopping = train_step(batch, it, loss_fn, params, optimizer, schedule, clip,
                                                     stop.signum if stop.requested else 0)
                it += 1
                bar.update(1)
                if updated:
                    losses.append(loss)  # read back only when logging
                    bad_in_row = 0
                else:
                    skipped, bad_in_row = skipped + 1, bad_in_row + 1
                if it % run.args.log_every == 0 or it == total_iters:
                    log_progress(it, total_iters, losses, skipped, optimizer, data_wait.share(), time.time() - begin)
                    losses = []
                if on_iter_end is not None:
                    on_iter_end(it)
                if save_state is not None and (it % run.args.save_every == 0 or it == total_iters or stopping
                                               or bad_in_row == MAX_BAD_STEPS):
                    save_state(it)
                if stopping:
                    raise train_state.Interrupted(f"the training state at iteration {it} is saved in {run.dir}; "
                                                  f"continue with --resume", stopping)
                if bad_in_row == MAX_BAD_STEPS:
                    raise UserError(f"the loss was not finite in {MAX_BAD_STEPS} iterations in a row (up to "
                                    f"iteration {it}); these steps were skipped and the last good state is saved in "
                                    f"{run.dir}; try --attn_eps 1e-6 with --resume")
                if it == total_iters:
                    break
    if skipped:
        log.warning(f"warning: {skipped} steps with a non-finite loss were skipped")


def train_step(batch, it: int, loss_fn, params: list, optimizer, schedule, clip,
               stop_signal: int) -> tuple[torch.Tensor, bool, int]:
    """One optimisation step, skipped (no update) when the loss or the gradient norm is not finite on any
    process. stop_signal: the signal that asked this process to stop, 0 when none. Returns (the loss, whether
    the model was updated, the signal that asked any process to stop or 0)."""
    if schedule is not None:
        schedule.apply(optimizer, it)
    loss = loss_fn(batch, it)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    bad = ~torch.isfinite(loss.detach())
    if clip is not None:
        bad |= ~torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_norm=clip))
    flags = torch.stack([bad.float(), torch.tensor(float(stop_signal), device=bad.device)])
    if dist.is_initialized():  # every process skips or stops together
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stopping = flags.tolist()
    if not bad:
        optimizer.step()
    return loss.detach(), not bad, int(stopping)


def progress_off(run: Run) -> bool | None:
    """tqdm's `disable`: progress bars on the first process, and only on a terminal (None), so that output
    sent to a file holds the log lines alone."""
    return None if run.is_main else True


def log_progress(it: int, total_iters: int, losses: list, skipped: int, optimizer, wait: float, seconds: float):
    mean_loss = f"{torch.stack(losses).mean().item():.4f}" if losses else "n/a"
    note = f", skipped (non-finite loss): {skipped}" if skipped else ""
    log.info(f"iter [{it}/{total_iters}], loss: {mean_loss}, lr: {optimizer.param_groups[-1]['lr']:.3g}, "
             f"data wait {wait:.0%}, {seconds:.0f}s{note}")


def ddp_wrap(run: Run, module: torch.nn.Module) -> torch.nn.Module:
    if run.world_size == 1:
        return module
    ids = [run.device.index] if run.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def train_reconstruction(run: Run, model: models.ViTill, loader: DataLoader, method: str, state: dict | None):
    """Dinomaly or Dinomaly2 training; CRR Stage I (method "crr"): batches are (img, aug_img, mask) and the loss
    adds the hard-mined distance between the clean encoder features and the decoding of aug_img. Continues from
    the training `state` when given."""
    args = run.args
    repair = method == "crr"
    params = model.trainable_parameters()
    optimizer = reconstruction_optimizer(model, method, getattr(args, "bottleneck_in_lr", None), args.adam_eps)
    schedule = reconstruction_schedule(method, args.total_iters, getattr(args, "lr_decay_ratio", 1.0))
    net = ddp_wrap(run, model)
    model.train()

    def loss_fn(batch, it):
        p = hard_mining_factor(it, HM_MAX_P, HM_RAMP_ITERS)
        with speed.autocast(run.device, args.precision):
            if repair:
                return repair_loss(net, batch[0].to(run.device, non_blocking=True),
                                   batch[1].to(run.device, non_blocking=True), p)
            en, de = net(batch.to(run.device, non_blocking=True))
            return global_cosine_hm(en, de, p=p, factor=HM_FACTOR)

    start, settings = train_state.restore(run, state, model, optimizer, len(loader.dataset))

    def save_state(done):
        if run.is_main:
            save_atomic(model.state_dict(), run.path("model.pth"))
        train_state.save(run, run.path(train_state.RECONSTRUCTION), model, optimizer, done, settings)

    train_loop(run, loader, args.total_iters, loss_fn, params, optimizer, schedule, clip=CLIP_NORM, start=start,
               save_state=save_state)
    log.info(f"saved {run.path('model.pth')}")


def reconstruction_optimizer(model: models.ViTill, method: str, bottleneck_in_lr: float | None = None,
                             eps: float = ADAM_EPS) -> StableAdamW:
    """StableAdamW over the bottleneck and the decoder: one parameter group (Dinomaly, CRR), or, with
    `bottleneck_in_lr`, three as Dinomaly2's: the first bottleneck layer at that rate, the rest of the bottleneck,
    the decoder."""
    recipe = RECIPES[method]
    if bottleneck_in_lr is None:
        groups = [{"params": model.trainable_parameters()}]
    else:
        groups = [{"params": list(model.bottleneck[0].parameters()), "lr": bottleneck_in_lr},
                  {"params": list(model.bottleneck[1:].parameters())}, {"params": list(model.decoder.parameters())}]
    return StableAdamW(groups, lr=recipe.lr, betas=BETAS, weight_decay=WEIGHT_DECAY, amsgrad=recipe.amsgrad,
                       eps=eps)


def reconstruction_schedule(method: str, total_iters: int, final_ratio: float = 1.0):
    recipe = RECIPES[method]
    if recipe.schedule == "cosine":
        return WarmCosineSchedule(recipe.lr, LR_FINAL, total_iters, warmup_iters=WARMUP_ITERS)
    return WarmupRatioSchedule(total_iters, WARMUP_ITERS, final_ratio)


def repair_loss(net, img: torch.Tensor, aug_img: torch.Tensor, p: float) -> torch.Tensor:
    """CRR Stage I: HM(en, de) + HM(en, de'), de' decoded from the synthetic image, both towards the clean
    image's encoder features. Both images go through one forward pass (every part of the model works per
    sample), which is also what DDP needs: one forward per backward."""
    b = img.shape[0]
    en, de = net(torch.cat([img, aug_img]))
    en = [e[:b] for e in en]
    de, de_aug = [d[:b] for d in de], [d[b:] for d in de]
    return global_cosine_hm(en, de, p=p, factor=HM_FACTOR) + global_cosine_hm(en, de_aug, p=p, factor=HM_FACTOR)


def train_segmentation(run: Run, model: models.ViTill, loader: DataLoader,
                       state: dict | None) -> models.SegmentationNet:
    """CRR Stage II: the segmentation network learns the synthetic masks from the frozen model's third output.
    Continues from the training `state` when given."""
    args = run.args
    segnet = synced_batchnorm(run, models.segmentation_net(model.encoder.cfg.embed_dim)).to(run.device)
    speed.maybe_compile(segnet, args.compile)
    log.info(f"segmentation network parameters: {sum(p.numel() for p in segnet.parameters()):,}")
    net = ddp_wrap(run, segnet)
    optimizer = torch.optim.Adam(segnet.parameters(), lr=SEG_LR)
    segnet.train()

    def loss_fn(batch, it):
        return segmentation_loss(model, net, batch[1].to(run.device, non_blocking=True),
                                 batch[2].to(run.device, non_blocking=True), args.precision)

    def save(done):
        if run.is_main and (done % SEG_SAVE_EVERY == 0 or done == args.total_iters):
            names = [f"Seg_model_{done - 1}.pth"] if done % SEG_SAVE_EVERY == 0 else []
            names += ["Seg_model_last.pth"] if done == args.total_iters else []
            for n in names:
                save_atomic(segnet.state_dict(), run.path(n))
                log.info(f"saved {run.path(n)}")

    start, settings = train_state.restore(run, state, segnet, optimizer, len(loader.dataset))

    def save_state(done):
        train_state.save(run, run.path(train_state.SEGMENTATION), segnet, optimizer, done, settings)

    train_loop(run, loader, args.total_iters, loss_fn, list(segnet.parameters()), optimizer, on_iter_end=save,
               start=start, save_state=save_state)
    return segnet


def synced_batchnorm(run: Run, net: torch.nn.Module) -> torch.nn.Module:
    """Under torchrun on GPUs, BatchNorm layers that normalise over the whole batch, as on one GPU (SyncBatchNorm;
    the state dict keeps its names). On CPUs (no SyncBatchNorm there) each process uses its own share."""
    if run.world_size == 1:
        return net
    if run.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    log.warning("warning: BatchNorm statistics per process (SyncBatchNorm needs CUDA); one process would use "
                "the whole batch")
    return net


def segmentation_loss(model: models.ViTill, net, aug_img: torch.Tensor, aug_mask: torch.Tensor,
                      precision: str = "fp32") -> torch.Tensor:
    """CRR Stage II's loss: the focal loss of the segmentation network `net` on the frozen model's features of
    the synthetic images against their masks (bilinear to the network's output size, >= 0.5)."""
    with speed.autocast(aug_img.device, precision):
        with torch.no_grad():
            en, de = model(aug_img)
            seg_in = models.segmentation_input(en, de)
        logits = net(seg_in)
    probs = torch.softmax(logits.float(), dim=1)
    target = F.interpolate(aug_mask, size=probs.shape[-2:], mode="bilinear", align_corners=False) >= 0.5
    return focal_loss(probs, target)


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate(run: Run, mapper: AnomalyMapper, aupro: str, gt_mode: str, tag: str = "") -> dict:
    """The one evaluation loop: per class, smoothed maps and scores from `mapper`, ground truth at 256, the
    seven metrics, streamed into a ClassAccumulator (no class's maps are kept). Under torchrun every process
    evaluates every world_size-th image and the first gathers the results: the metrics are the same as in one
    process. The first process prints the table and writes metrics<tag>.csv, scores<tag>.csv,
    thresholds<tag>.json and the pictures (report.py). With --multiview on, the metrics add the object and sample
    level (multiview.py). Returns {class: metrics} (empty on the other processes)."""
    args = run.args
    results, score_rows, reports = {}, [], []
    calibration = Calibration(mapper.scoring_settings(), args.false_alarm_rate)
    if run.world_size > 1:
        log.info(f"evaluation shared by {run.world_size} processes")
        model = mapper.model
        if model.test_mask == "on" and model.mask_rng == "cpu":
            log.warning("warning: CRR's test-time masks come from each process's CPU random stream (--mask_rng cpu), "
                        "so the metrics depend on the number of processes; --mask_rng device gives those of one "
                        "process")
    for name in ds.class_names(args.dataset, args.classes):
        parts = run.gather(evaluate_shard(run, mapper, test_samples(args, name), name, aupro, gt_mode))
        if not run.is_main:
            continue
        results[name] = ClassAccumulator.merge([p[0] for p in parts], aupro=aupro).compute()
        if parts[0][4] is not None:
            results[name].update(ObjectAccumulator.merge([p[4] for p in parts]).compute())
        rows = [row for _, row in sorted(r for p in parts for r in p[1])]  # in the dataset's order
        labels, scores = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
        pixels = PixelSample.merge([p[2] for p in parts]).arrays()
        entry = calibration.add(name, labels, scores, *pixels)
        log.info(own_data.metrics_line(name, results[name], entry))
        too_few = own_data.too_few_warning(name, entry)
        if too_few:
            log.warning(too_few)
        reports.append((ClassReport.merge([p[3] for p in parts]), name, entry, labels, scores, pixels[:2]))
        score_rows += rows
    if not run.is_main:
        return results
    write_results(run, results, tag)
    with open(run.path(f"scores{tag}.csv"), "w", newline="", errors="backslashreplace") as f:
        csv.writer(f).writerows([["class", "image_path", "label", "score"], *score_rows])
    calibration.save(run.path(f"thresholds{tag}.json"))
    for report, *what in reports:  # the pictures last: a failing picture costs a picture, not the results
        report.save(run.dir, tag, *what)
    return results


def write_results(run: Run, results: dict, tag: str = ""):
    """The mean over the classes (logged when there are several) and metrics<tag>.csv: a row per class and the
    mean."""
    mean = {k: nanmean([r[k] for r in results.values()]) for k in next(iter(results.values()))}
    if len(results) > 1:
        log.info(own_data.metrics_line("Mean", mean))
    write_metrics_csv(run.path(f"metrics{tag}.csv"), results, mean)


def evaluate_shard(run: Run, mapper: AnomalyMapper, samples: list[ds.Sample], name: str, aupro: str,
                   gt_mode: str) -> tuple[dict, list, PixelSample, ClassReport, dict | None]:
    """This process's share of one class (images rank, rank + world_size, ...): (the accumulator's state, score
    rows with their index in `samples`, the pixel sample for calibration, the pictures' candidates, the object
    accumulator's state when the samples are views grouped into objects, else None)."""
    args = run.args
    index = list(range(run.rank, len(samples), run.world_size))
    shard = [samples[i] for i in index]
    test_set = ds.TestDataset(shard, args.image_size, args.crop_size, image_cache(args, shard, ("disk",)))
    loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=run.device.type == "cuda")
    acc, pixels, report = ClassAccumulator(aupro), PixelSample(len(samples) * MAP_SIZE ** 2), \
        ClassReport(args.save_heatmaps)
    objects = ObjectAccumulator(samples, mapper.max_ratio, MAP_SIZE ** 2, name) \
        if samples[0].object_id is not None else None
    rows = []

    def seeds(first: int, n: int) -> list[int] | None:  # the test-time mask seeds of images first .. first + n - 1
        return mask_seeds(args.seed, name, index[first:first + n]) if mapper.model.mask_rng == "device" else None

    batches = tqdm(loader, desc=f"eval {name}", leave=False, dynamic_ncols=True, disable=progress_off(run))
    with torch.no_grad():
        for first, (img, mask, label, has_mask, paths), amap, score in mapped_batches(mapper, batches, run.device,
                                                                                      seeds):
            ids = index[first:first + len(paths)]
            gt = binarize_gt(mask, MAP_SIZE, gt_mode)[:, 0]
            acc.add(label, score, amap, gt, has_mask)
            pixels.add(amap[has_mask].numpy(), gt[has_mask].numpy(), [i for i, h in zip(ids, has_mask) if h])
            report.add(img, gt, amap, score, label, paths)
            if objects is not None:
                objects.add(ids, label, amap, score)
            rows += [(i, [name, p, int(l), s]) for i, p, l, s in zip(ids, paths, label.tolist(), score.tolist())]
    return acc.state(), rows, pixels, report, None if objects is None else objects.state()


def mapped_batches(mapper: AnomalyMapper, batches, device: torch.device, seeds):
    """(index of the batch's first image, batch, map [B, 256, 256], score [B]) on the CPU for each batch (images
    first); seeds(first, n) gives the test-time mask seeds of the n images from the first-th on. A batch's map is
    queued on the device, and its copy to the CPU after it, before the previous batch is handed over: on a GPU the
    next batch is computed while the caller accumulates metrics on the CPU. The results are those of one batch at
    a time."""
    pending, first = None, 0
    for batch in batches:
        amap, score = mapper(batch[0].to(device, non_blocking=True), seeds(first, len(batch[0])))
        copied = None
        if device.type == "cuda":
            copied = torch.cuda.Event()
            amap, score = amap.to("cpu", non_blocking=True), score.to("cpu", non_blocking=True)
            copied.record()
        if pending is not None:
            yield handed_over(*pending)
        pending = first, batch, amap[:, 0], score, copied
        first += len(batch[0])
    if pending is not None:
        yield handed_over(*pending)


def handed_over(first: int, batch, amap: torch.Tensor, score: torch.Tensor, copied):
    if copied is not None:
        copied.synchronize()  # the copies to the CPU have landed
    return first, batch, amap.cpu(), score.cpu()


def save_class_prototypes(run: Run, mapper: AnomalyMapper):
    """class_prototypes.pt in the run folder, from the training images (class_finder): predict.py then finds
    each image's class and uses its thresholds without --class_name."""
    if not run.is_main:
        return
    args = run.args
    try:
        samples = {c: own_data.split_training(args, c)[0] for c in ds.class_names(args.dataset, args.classes)}
    except UserError as e:  # e.g. an evaluation of an official model without its training images
        log.warning(f"warning: no {class_finder.FILE} written ({e}): predict.py will use the all-classes thresholds")
        return
    data = class_finder.build(mapper, samples, args.image_size, args.crop_size, run.device, args.batch_size,
                              args.num_workers, args.seed)
    save_atomic(data, run.path(class_finder.FILE))
    log.info(f"saved {run.path(class_finder.FILE)}: the prototypes of {len(samples)} "
             f"class{'es' * (len(samples) != 1)}, with which predict.py finds each image's class")


# ----------------------------------------------------------------------------------------------- data and models

def test_samples(args, class_name: str) -> list[ds.Sample]:
    multiview = getattr(args, "multiview", "off") == "on"
    samples, missing = own_data.test_samples(args, class_name, multiview)
    if missing:
        log.warning(f"warning: {class_name}: {missing} anomalous samples have no mask_path; " +
                    ("they count as normal views (the defect is not visible in them), as in the Dinomaly2 preview"
                     if multiview else "they count for the image metrics only"))
    return samples


def train_dataset(run: Run):
    """The reconstruction model's training images, through the image cache of --cache_images: all of them
    (ds.TrainDataset), or with --shot K, K per class with Dinomaly2's strong augmentation (fewshot.py); the
    chosen files are logged and listed in the run folder's shots.txt. MANTA-Tiny: a view of each image
    (ds.StripTrainDataset)."""
    args = run.args
    samples = own_data.train_samples(args)
    shot = getattr(args, "shot", None)
    if args.dataset == "manta":  # a random view strip of each image (not cached)
        if shot is not None:
            raise UserError("--shot is for image datasets; MANTA-Tiny's images hold five views")
        return ds.StripTrainDataset(samples, args.image_size, args.crop_size, args.seed)
    if shot is None:
        return ds.TrainDataset(samples, args.image_size, args.crop_size, image_cache(args, samples))
    samples = fewshot.select_shots(samples, shot, args.seed)
    log.info(f"{shot}-shot training set ({len(samples)} images): " + ", ".join(s.image_path for s in samples))
    if run.is_main:
        with open(run.path(fewshot.SHOTS_FILE), "w") as f:
            f.writelines(f"{s.class_name}\t{s.image_path}\n" for s in samples)
    return fewshot.AugmentedDataset(samples, args.image_size, args.crop_size, args.seed, image_cache(args, samples))


def image_cache(args, samples: list[ds.Sample], modes=("memory", "disk")):
    """The --cache_images cache of these samples' images when its mode is one of `modes` (test images are read
    once per run: only a disk cache, kept for later runs, gains), else None."""
    mode = getattr(args, "cache_images", "none")
    paths = [s.image_path for s in samples if s.strip is None]  # MANTA's view strips are cut from the file each time
    return build_cache(mode, paths, args.image_size, cache_folder(args)) if mode in modes and paths else None


def cache_folder(args) -> str:
    """Where disk caches go: --cache_dir, by default <save_dir>/image_cache."""
    return getattr(args, "cache_dir", None) or os.path.join(args.save_dir, "image_cache")


def synthetic_train_set(args):
    """CRR's training images, each with a synthetic anomaly: textures from --anomaly_source_path (DTD), object
    masks from --foreground_path or, for Real-IAD, from where the released code looks for them; images, masks and
    textures kept decoded with --cache_images."""
    from .synthesis import SyntheticAnomalyDataset, list_textures, synthesis_caches
    if args.dataset == "manta":
        raise UserError("CRR's anomaly synthesis works on whole images, not on MANTA-Tiny's five-view images; "
                        "train CRR on another --dataset")
    textures = list_textures(args.anomaly_source_path)
    samples = own_data.train_samples(args)
    if args.dataset == "realiad" or args.foreground_path:
        found = ds.attach_foreground(samples, args.foreground_path)
        log.info(f"foreground masks found for {found} of {len(samples)} training images")
    log.info(f"texture images for anomaly synthesis: {len(textures or [])}")
    caches = synthesis_caches(args.cache_images, samples, textures, args.image_size, cache_folder(args))
    return SyntheticAnomalyDataset(samples, args.image_size, args.crop_size, textures, args.seed, caches)


def model_settings(args, method: str) -> dict:
    """What a later job needs to rebuild this run's model (config.json's "model" entry): the method's paper
    settings (models.PAPER_SETTINGS) with this run's values of those the job offers as flags."""
    settings = {k: getattr(args, k, v) for k, v in models.PAPER_SETTINGS[method].items()}
    return dict(settings, method=method, setting=training_setting(args), dropout=args.dropout, decoder_depth=8)


def training_setting(args) -> str:
    """What the run is, in words, for config.json: "multi-class", "class-separated" (one model per class: the
    run folder and each class's folder in it), "K-shot" or "multi-view"."""
    if getattr(args, "per_class", False):
        return models.SEPARATE
    if getattr(args, "shot", None):
        return f"{args.shot}-shot"
    return "multi-view" if getattr(args, "multiview", "off") == "on" else "multi-class"


def trained_model(run: Run, path: str, fallback: dict) -> models.ViTill:
    """A trained reconstruction model in eval mode on the run's device, with the saved run's settings."""
    return prepared(run, models.load_trained(path, run.args, fallback))


def fresh_model(run: Run, settings: dict) -> models.ViTill:
    """A new model of the run's settings (model_settings), its encoder from --encoder_weights."""
    args = run.args
    weights = args.encoder_weights or models.default_encoder_weights(args.encoder)
    model = models.build_model(args.encoder, weights, dropout=settings["dropout"],
                               bottleneck_kind=models.BOTTLENECK_OF[settings["method"]],
                               **models.model_options(settings))
    if weights == "random":
        log.warning("warning: the encoder has random weights (--encoder_weights random): a smoke run only")
    log.info(f"trainable parameters: {sum(p.numel() for p in model.trainable_parameters()):,}")
    return prepared(run, model)


def prepared(run: Run, model: models.ViTill) -> models.ViTill:
    """`model` on the run's device with --mask_rng (CRR), --precision and --compile applied."""
    model.mask_rng = getattr(run.args, "mask_rng", "cpu")
    speed.configure(run.args.precision)
    return speed.maybe_compile(model.to(run.device), run.args.compile)


def mask_seeds(seed: int, class_name: str, indices: list[int]) -> list[int]:
    """Per-image seeds of CRR's test-time masks drawn on the device (--mask_rng device): a hash of the run's seed,
    the class and the image's index in it, so an image's mask does not depend on its batch or process."""
    return [models.mask_seed(f"{seed}/{class_name}/{i}".encode()) for i in indices]


# ----------------------------------------------------------------------------------------------- the jobs

def train_and_evaluate(args, method: str):
    """Dinomaly, Dinomaly2 or CRR Stage I (method "crr": reconstruction + repair with bottleneck masking): train
    one model on all classes unless --eval_only, save model.pth, evaluate the reconstruction map. With --per_class
    (or --eval_only of such a run): one model per class (per_class)."""
    check_max_ratio(args.max_ratio)
    if args.data_path is None:
        raise UserError(f"this script has no default data folder for --dataset {args.dataset}; pass --data_path "
                        f"(and --image_size and --crop_size)")
    if args.eval_only:
        if args.checkpoint is None:
            raise UserError("--eval_only needs --checkpoint (a run folder or model.pth)")
        if args.resume or args.overwrite:
            raise UserError("--resume and --overwrite are for training; --eval_only writes only metrics")
        run = Run(args, "config_eval.json")
        check_output_folder(run, args.checkpoint)
    else:
        args.encoder = args.encoder or models.DEFAULT_ENCODER
        if args.image_size is None or args.crop_size is None:
            raise UserError(f"this script has no default sizes for --dataset {args.dataset}; pass --image_size and "
                            f"--crop_size")
        cfg = models.encoder_config(args.encoder)
        ds.check_sizes(args.image_size, args.crop_size, cfg.patch_size, cfg.fixed_grid)
        run = Run(args, "config.json")
    args.classes = own_data.find_classes(args)
    if getattr(args, "per_class", False) or (args.eval_only and models.class_models(args.checkpoint)):
        return per_class(run, method)
    mapper = run_model(run, method)
    evaluate(run, mapper, args.aupro, args.gt_binarize, tag="_recon" if method == "crr" else "")
    save_class_prototypes(run, mapper)


def run_model(run: Run, method: str, checked: bool = False) -> AnomalyMapper:
    """The run's model in eval mode behind its AnomalyMapper: --checkpoint's with --eval_only, else trained now
    (continued with --resume). The data is checked first unless `checked`."""
    args = run.args
    crr = method == "crr"
    if args.eval_only:
        if not checked:
            preflight.check_data(args)  # the data before the model, which takes longer to load
        model = trained_model(run, args.checkpoint, models.PAPER_SETTINGS[method])
        run.save_config()
    else:
        # what Stage II derived from an earlier model goes with it
        state = train_state.start(run, train_state.RECONSTRUCTION, ["model.pth", *SEGMENTATION_FILES])
        train_set = synthetic_train_set(args) if crr else train_dataset(run)
        if not checked:
            preflight.check_data(args, train_set.samples, train_set.synthesizer.texture_paths if crr else ())
        settings = model_settings(args, method)
        model = fresh_model(run, settings)
        loader = train_loader(run, train_set, args.batch_size)
        run.save_config(settings)
        train_reconstruction(run, model, loader, method, state=state)
    run.barrier()
    model.eval()
    seed_everything(args.seed)
    return AnomalyMapper(model, max_ratio=args.max_ratio, precision=args.precision)


def per_class(run: Run, method: str):
    """One model per class (the class-separated setting): each class is trained (with --eval_only: --checkpoint's
    <class>/model.pth loaded) and evaluated alone in <run>/<class>/, from the seed on, as a run on that class
    alone would be; that folder is a complete one-class run. The run folder gets the table of every class and
    their mean (metrics.csv), and the class prototypes with which predict.py sends each image to its class's
    model. --resume skips the classes already evaluated and continues the one whose training stopped."""
    args = run.args
    train = [s for name in args.classes for s in own_data.split_training(args, name)[0]]  # each class logs its own
    preflight.check_data(args, None if args.eval_only else train)
    run.save_config(None if args.eval_only else model_settings(args, method))  # the setting marks the folder
    results, mapper = {}, None
    for i, name in enumerate(args.classes):
        checkpoint = os.path.join(args.checkpoint, name) if args.eval_only else args.checkpoint
        sub = run.subfolder(name, classes=[name], checkpoint=checkpoint)
        log.info(f"class {name} ({i + 1} of {len(args.classes)}): {sub.dir}")
        if args.resume and os.path.isfile(sub.path("metrics.csv")):
            results[name] = read_metrics_csv(sub.path("metrics.csv")).get(name)
            if results[name] is None:
                raise UserError(f"{sub.path('metrics.csv')} has no row for {name}; delete it to evaluate {name} again")
            log.info(f"{name}: trained and evaluated before (its metrics.csv); skipped")
            continue
        sub.args.resume = args.resume and os.path.isfile(sub.path(train_state.RECONSTRUCTION))
        seed_everything(args.seed + run.rank)  # what a run on this class alone starts from
        mapper = run_model(sub, method, checked=True)
        results.update(evaluate(sub, mapper, args.aupro, args.gt_binarize))
    if run.is_main:
        log.info(f"one model per class, {len(results)} classes:")
        for name, metrics in results.items():
            calibration = os.path.join(run.dir, name, "thresholds.json")
            entry = th.load(calibration)["classes"][name] if os.path.isfile(calibration) else None
            log.info(own_data.metrics_line(name, metrics, entry))
        write_results(run, results)
    if mapper is None:  # every class was done before: the prototypes come from one of their models
        model = trained_model(run, run.path(args.classes[-1]), models.PAPER_SETTINGS[method])
        mapper = AnomalyMapper(model, max_ratio=args.max_ratio, precision=args.precision)
    save_class_prototypes(run, mapper)


def check_output_folder(run: Run, checkpoint: str):
    """Evaluating another run's model into a folder that holds a trained model would replace that run's
    thresholds.json, metrics, scores and pictures with those of another model: refused unless
    --replace_results."""
    own = run.path("model.pth")
    if run.args.replace_results or not os.path.isfile(own) or \
            os.path.samefile(models.checkpoint_file(checkpoint), own):
        return
    default = "" if "save_name" in run.args.explicit else \
        " (without --save_name the evaluation goes into the default training run's folder)"
    raise UserError(f"{run.dir} holds another trained model{default}; evaluating {checkpoint} there would replace "
                    f"that run's thresholds.json, metrics, scores and pictures: pass another --save_name, or "
                    f"--replace_results to replace them")


def dinomaly_main(args):
    train_and_evaluate(args, "dinomaly")


def dinomaly2_main(args):
    train_and_evaluate(args, "dinomaly2")


def crr_stage1_main(args):
    train_and_evaluate(args, "crr")


def crr_stage2_main(args):
    """CRR Stage II: train the segmentation network on the frozen Stage-I model (never written)."""
    run = Run(args, "config_stage2.json")
    args.classes = own_data.find_classes(args)
    state = train_state.start(run, train_state.SEGMENTATION, ["Seg_model_*.pth"])
    checkpoint = models.checkpoint_file(args.checkpoint or run.dir)
    # the Stage-I run's sizes, then the data checked before the model, which takes longer to load
    models.follow_saved_settings(args, models.saved_settings(checkpoint), models.PAPER_SETTINGS["crr"])
    train_set = synthetic_train_set(args)
    preflight.check_data(args, train_set.samples, train_set.synthesizer.texture_paths, test=False)
    model = trained_model(run, checkpoint, models.PAPER_SETTINGS["crr"])
    model.requires_grad_(False)
    if state is not None:
        models.check_segmentation_owner(run.dir, model, checkpoint, run.path(train_state.SEGMENTATION))
    run.save_config(stage1_model=models.fingerprint(model))
    loader = train_loader(run, train_set, args.batch_size)
    train_segmentation(run, model, loader, state)


def crr_test_main(args):
    """CRR test: fused map 0.7 * reconstruction + 0.3 * segmentation, metrics, optional heatmaps."""
    check_max_ratio(args.max_ratio)
    run = Run(args, "config_test.json")
    if args.checkpoint is not None:
        check_output_folder(run, args.checkpoint)
    args.classes = own_data.find_classes(args)
    preflight.check_data(args)  # the data before the model, which takes longer to load
    model = trained_model(run, args.checkpoint or run.dir, models.PAPER_SETTINGS["crr"])
    run.save_config()
    checkpoint = models.checkpoint_file(args.checkpoint or run.dir)
    folder = os.path.dirname(checkpoint)  # Stage II's network beside Stage I's model
    seg_path = args.seg_checkpoint or models.segmentation_file(folder) or models.segmentation_file(run.dir)
    if seg_path is None:
        where = " or ".join(dict.fromkeys(os.path.normpath(f) for f in (folder, run.dir)))
        kind = " (this model was trained without bottleneck masking: a Dinomaly model, not CRR's Stage I?)" \
            if models.saved_settings(checkpoint).get("mask_ratio") == 0 else ""
        raise UserError(f"no segmentation network (Seg_model_7999.pth or Seg_model_last.pth) in {where}{kind}; "
                        f"run crr_realiad_stage2.py on this run first, or pass --seg_checkpoint")
    models.check_segmentation_owner(os.path.dirname(os.path.abspath(seg_path)), model, checkpoint, seg_path)
    segnet = models.load_segmentation_net(seg_path, model.encoder.cfg.embed_dim).to(run.device).eval()
    log.info(f"loaded {seg_path}")
    seed_everything(args.seed)
    mapper = AnomalyMapper(model, segnet, args.fusion_alpha, args.max_ratio, args.precision, args.compile)
    evaluate(run, mapper, args.aupro, args.gt_binarize)
    save_class_prototypes(run, mapper)
