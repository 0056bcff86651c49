"""The one training loop and what it trains: the reconstruction model (Dinomaly, Dinomaly2, CRR Stage I: StableAdamW,
warm-up and schedule, clipping, hard mining, as the recipe says) and CRR Stage II's segmentation network."""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import models, speed, train_state
from .errors import UserError
from .loss import focal_loss, global_cosine_hm, hard_mining_factor
from .optimizers import StableAdamW, WarmCosineSchedule, WarmupRatioSchedule
from .recipes import Recipe, SegmentationRecipe
from .run import Interrupted, Run, log, save_atomic

MAX_BAD_STEPS = 10  # non-finite losses in a row that stop a run


def train_loader(run: Run, dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Shuffled (each epoch's order a function of the seed and the epoch), drop_last; under torchrun each process
    gets batch_size / world_size of every batch."""
    if batch_size % run.world_size:
        raise UserError(f"--batch_size {batch_size} is not divisible by the {run.world_size} processes")
    if len(dataset) < batch_size:
        raise UserError(f"only {len(dataset)} training images, fewer than --batch_size {batch_size}")
    log.info(f"train images: {len(dataset)}")
    sampler = train_state.EpochSampler(dataset, run.world_size, run.rank, run.options.seed)
    g = torch.Generator()
    g.manual_seed(run.options.seed)
    return DataLoader(dataset, batch_size=batch_size // run.world_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, generator=g, pin_memory=run.device.type == "cuda",
                      persistent_workers=num_workers > 0)


def train_loop(run: Run, loader: DataLoader, total_iters: int, loss_fn, params: list, optimizer,
               schedule: WarmCosineSchedule | WarmupRatioSchedule | None = None, clip: float | None = None,
               on_iter_end=None, start: int = 0, save_state=None):
    """The one training loop, from iteration `start`: per step forward + loss (loss_fn(batch, it)) -> zero_grad ->
    backward -> clip -> step (train_step), skipped when the loss is not finite; the learning rate of iteration
    `it` is schedule(it). Epoch e is read in the sampler's order for e, from the batch where `start` falls.
    on_iter_end(done) runs after each step; save_state(done) every --save_every iterations, at the end, on Ctrl-C
    (then KeyboardInterrupt) and after MAX_BAD_STEPS skipped steps in a row (then UserError)."""
    per_epoch = loader.sampler.num_samples // loader.batch_size
    it, losses, norms, skipped, bad_in_row = start, [], [], 0, 0
    begin, data_wait = time.time(), speed.DataWait()
    with train_state.StopRequest(again_interrupts=run.world_size == 1) as stop, \
            tqdm(initial=start, total=total_iters, desc="train", disable=progress_off(run), dynamic_ncols=True) as bar:
        while it < total_iters:
            epoch, done_in_epoch = divmod(it, per_epoch)
            loader.sampler.set_epoch(epoch, skip=done_in_epoch * loader.batch_size)
            for batch in data_wait.iterate(loader):
                loss, updated, stopping, norm = train_step(batch, it, loss_fn, params, optimizer, schedule, clip,
                                                           stop.signum if stop.requested else 0)
                it += 1
                bar.update(1)
                if updated:
                    losses.append(loss)  # read back only when logging
                    norms += [norm] if norm is not None else []
                    bad_in_row = 0
                else:
                    skipped, bad_in_row = skipped + 1, bad_in_row + 1
                if it % run.options.log_every == 0 or it == total_iters:
                    run.events.scalars(it, log_progress(it, total_iters, losses, norms, skipped, optimizer,
                                                        data_wait.share(), time.time() - begin))
                    losses, norms = [], []
                if on_iter_end is not None:
                    on_iter_end(it)
                if start == 0 and skipped == it and (it == total_iters or bad_in_row == MAX_BAD_STEPS):
                    # the model is still the untrained one: nothing to save
                    raise UserError(f"the loss was not finite in any of the {it} iterations: every step was skipped, "
                                    f"so no model is saved; check the encoder weights (--encoder_weights) and the "
                                    f"images, or try --attn_eps 1e-6")
                if save_state is not None and (it % run.options.save_every == 0 or it == total_iters or stopping
                                               or bad_in_row == MAX_BAD_STEPS):
                    save_state(it)
                if stopping:
                    raise Interrupted(f"the training state at iteration {it} is saved in {run.dir}; "
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
               stop_signal: int) -> tuple[torch.Tensor, bool, int, torch.Tensor | None]:
    """One optimisation step, skipped (no update) when the loss or the gradient norm is not finite on any
    process. stop_signal: the signal that asked this process to stop, 0 when none. Returns (the loss, whether
    the model was updated, the signal that asked any process to stop or 0, the gradient norm before clipping,
    None without clipping)."""
    if schedule is not None:
        schedule.apply(optimizer, it)
    loss = loss_fn(batch, it)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    bad = ~torch.isfinite(loss.detach())
    norm = None
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=clip)
        bad |= ~torch.isfinite(norm)
    flags = torch.stack([bad.float(), torch.tensor(float(stop_signal), device=bad.device)])
    if dist.is_initialized():  # every process skips or stops together
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stopping = flags.tolist()
    if not bad:
        optimizer.step()
    return loss.detach(), not bad, int(stopping), norm


def progress_off(run: Run) -> bool | None:
    """tqdm's `disable`: progress bars on the first process, and only on a terminal (None), so that output
    sent to a file holds the log lines alone."""
    return None if run.is_main else True


def log_progress(it: int, total_iters: int, losses: list, norms: list, skipped: int, optimizer, wait: float,
                 seconds: float) -> dict:
    """The log line of the steps since the last one; returns its values for TensorBoard (events.py): the mean
    loss and gradient norm (None without), the last group's learning rate, the share of time spent waiting for
    data."""
    mean_loss = torch.stack(losses).mean().item() if losses else None
    note = f", skipped (non-finite loss): {skipped}" if skipped else ""
    lr = optimizer.param_groups[-1]["lr"]
    log.info(f"iter [{it}/{total_iters}], loss: {'n/a' if mean_loss is None else f'{mean_loss:.4f}'}, lr: {lr:.3g}, "
             f"data wait {wait:.0%}, {seconds:.0f}s{note}")
    return {"train/loss": mean_loss, "train/lr": lr, "train/data_wait": wait,
            "train/grad_norm": torch.stack(norms).float().mean().item() if norms else None}


def ddp_wrap(run: Run, module: torch.nn.Module) -> torch.nn.Module:
    if run.world_size == 1:
        return module
    ids = [run.device.index] if run.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def train_reconstruction(run: Run, model: models.ViTill, loader: DataLoader, recipe: Recipe, state: dict | None,
                         resume_settings: dict):
    """Dinomaly or Dinomaly2 training; CRR Stage I (method "crr"): batches are (img, aug_img, mask) and the loss
    adds the hard-mined distance between the clean encoder features and the decoding of aug_img. Continues from
    the training `state` when given (its settings checked against `resume_settings`, train_state.settings)."""
    repair = recipe.method == "crr"
    precision = run.options.precision
    params = model.trainable_parameters()
    optimizer = reconstruction_optimizer(model, recipe)
    schedule = reconstruction_schedule(recipe)
    net = ddp_wrap(run, model)
    model.train()

    def loss_fn(batch, it):
        p = hard_mining_factor(it, recipe.hm_max_p, recipe.hm_ramp_iters)
        with speed.autocast(run.device, precision):
            if repair:
                return repair_loss(net, batch[0].to(run.device, non_blocking=True),
                                   batch[1].to(run.device, non_blocking=True), p, recipe.hm_factor)
            en, de = net(batch.to(run.device, non_blocking=True))
            return global_cosine_hm(en, de, p=p, factor=recipe.hm_factor)

    start = train_state.restore(run, state, model, optimizer, resume_settings)

    def save_state(done):
        if run.is_main:
            save_atomic(model.state_dict(), run.path("model.pth"))
        train_state.save(run, run.path(train_state.RECONSTRUCTION), model, optimizer, done, resume_settings)

    train_loop(run, loader, recipe.total_iters, loss_fn, params, optimizer, schedule, clip=recipe.clip_norm,
               start=start, save_state=save_state)
    log.info(f"saved {run.path('model.pth')}")


def reconstruction_optimizer(model: models.ViTill, recipe: Recipe) -> StableAdamW:
    """StableAdamW over the bottleneck and the decoder: one parameter group (Dinomaly, CRR), or, with the recipe's
    `bottleneck_in_lr`, three as Dinomaly2's: the first bottleneck layer at that rate, the rest of the bottleneck,
    the decoder."""
    if recipe.bottleneck_in_lr is None:
        groups = [{"params": model.trainable_parameters()}]
    else:
        groups = [{"params": list(model.bottleneck[0].parameters()), "lr": recipe.bottleneck_in_lr},
                  {"params": list(model.bottleneck[1:].parameters())}, {"params": list(model.decoder.parameters())}]
    return StableAdamW(groups, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                       amsgrad=recipe.amsgrad, eps=recipe.adam_eps)


def reconstruction_schedule(recipe: Recipe) -> WarmCosineSchedule | WarmupRatioSchedule:
    """The recipe's schedule: "cosine" (Dinomaly's: one rate, warm-up from 0 then a cosine to lr_final) or
    "ratio" (Dinomaly2's: each group's rate times a warm-up then a cosine to lr_decay_ratio)."""
    if recipe.schedule == "cosine":
        return WarmCosineSchedule(recipe.lr, recipe.lr_final, recipe.total_iters, warmup_iters=recipe.warmup_iters)
    return WarmupRatioSchedule(recipe.total_iters, recipe.warmup_iters, recipe.lr_decay_ratio)


def repair_loss(net, img: torch.Tensor, aug_img: torch.Tensor, p: float, factor: float) -> torch.Tensor:
    """CRR Stage I: HM(en, de) + HM(en, de'), de' decoded from the synthetic image, both towards the clean
    image's encoder features. Both images go through one forward pass (every part of the model works per
    sample), which is also what DDP needs: one forward per backward."""
    b = img.shape[0]
    en, de = net(torch.cat([img, aug_img]))
    en = [e[:b] for e in en]
    de, de_aug = [d[:b] for d in de], [d[b:] for d in de]
    return global_cosine_hm(en, de, p=p, factor=factor) + global_cosine_hm(en, de_aug, p=p, factor=factor)


def train_segmentation(run: Run, model: models.ViTill, loader: DataLoader, recipe: SegmentationRecipe,
                       state: dict | None, resume_settings: dict) -> models.SegmentationNet:
    """CRR Stage II: the segmentation network learns the synthetic masks from the frozen model's third output,
    with Adam at the recipe's rate; Seg_model_<it>.pth every recipe.checkpoint_every iterations and
    Seg_model_last.pth at the end. Continues from the training `state` when given."""
    segnet = synced_batchnorm(run, models.segmentation_net(model.encoder.cfg.embed_dim)).to(run.device)
    speed.maybe_compile(segnet, run.options.compile)
    log.info(f"segmentation network parameters: {sum(p.numel() for p in segnet.parameters()):,}")
    net = ddp_wrap(run, segnet)
    optimizer = torch.optim.Adam(segnet.parameters(), lr=recipe.lr)
    segnet.train()
    every, total = recipe.checkpoint_every, recipe.total_iters

    def loss_fn(batch, it):
        return segmentation_loss(model, net, batch[1].to(run.device, non_blocking=True),
                                 batch[2].to(run.device, non_blocking=True), run.options.precision)

    def save(done):
        if run.is_main and (done % every == 0 or done == total):
            names = [f"Seg_model_{done - 1}.pth"] if done % every == 0 else []
            names += ["Seg_model_last.pth"] if done == total else []
            for n in names:
                save_atomic(segnet.state_dict(), run.path(n))
                log.info(f"saved {run.path(n)}")

    start = train_state.restore(run, state, segnet, optimizer, resume_settings)

    def save_state(done):
        train_state.save(run, run.path(train_state.SEGMENTATION), segnet, optimizer, done, resume_settings)

    train_loop(run, loader, total, loss_fn, list(segnet.parameters()), optimizer, on_iter_end=save, start=start,
               save_state=save_state)
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
