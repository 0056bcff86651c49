"""The training state: what a run needs to continue bit for bit after a kill, a crash or Ctrl-C.

`<run>/train_state.pth` (CRR Stage II: `train_state_stage2.pth`) holds the trained module's weights, the
optimiser, the number of finished iterations, the settings that shape training, and the random-number states
of every process (torch CPU and CUDA, NumPy, Python). Nothing else is needed: the learning rate and the
hard-mining share are functions of the iteration, and the data order is a function of (seed, epoch)
(`EpochSampler`), as is CRR's anomaly synthesis.

- `start(run, state_name, results)`: what to do with a run folder that already holds this job's results:
  stop (one line), start afresh (--overwrite) or load the state to continue from (--resume).
- `settings(...)`: what a resumed run must share with the saved one; `restore(run, state, module, optimizer,
  settings) -> iteration` and `save(run, path, module, optimizer, iteration, settings)`.
- `EpochSampler`: the shuffled order of each epoch, on one process or many, from any batch of the epoch.
- `StopRequest`: Ctrl-C during training asks the loop to finish its step, save and stop.
"""
import glob
import itertools
import os
import random
import signal
import threading

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from .errors import UserError, check_entries, integer, kind, one_line
from .checkpoints import load_file, load_strict
from .options import DataOptions
from .recipes import Recipe
from .run import Interrupted, Run, log, save_atomic

RECONSTRUCTION = "train_state.pth"  # Dinomaly, CRR Stage I
SEGMENTATION = "train_state_stage2.pth"  # CRR Stage II
FORMAT = "dinomaly training state"
# Settings that must not change when a run is resumed: they decide the model's shapes, the schedule or the
# data order. Others (e.g. --attn_eps) may change; the change is logged.
FIXED = ("dataset", "classes", "realiad_resolution", "json_dir", "encoder", "image_size", "crop_size",
         "batch_size", "total_iters", "seed")
LOGGED = ("dropout", "attn_eps", "mask_ratio", "test_mask")
# What load checks in a training state (besides its format), key by key.
CONTENT = {
    "iteration": integer(0),
    "settings": kind(dict, "a mapping of the run's settings"),
    "settings.processes": integer(1),
    "module": kind(dict, "a state dict"),
    "optimizer": kind(dict, "an optimiser state dict"),
    "rng": kind(list, "a list of random-number states, one per process"),
}


# ----------------------------------------------------------------------------------------------- run folder

def start(run: Run, state_name: str, results: list[str]) -> dict | None:
    """The saved state to continue from (--resume), or None for a fresh start. A run folder that holds this
    job's results (`results`: file names or glob patterns; the state file counts too) is never overwritten
    silently: without --resume or --overwrite the job stops; --overwrite deletes them first."""
    path = run.path(state_name)
    if run.options.resume:
        visible = run.gather(os.path.isfile(path))  # every process decides alike (multi-node: each its own disk)
        if not any(visible):
            raise UserError(f"nothing to resume: {run.dir} has no {state_name}; run without --resume to start")
        if not all(visible):
            raise UserError(f"{path} is missing for {visible.count(False)} of {len(visible)} "
                            f"processes; --resume on several machines needs a --save_dir that all of them share")
        return load(path)
    found = sorted({os.path.basename(p) for pattern in [*results, state_name] for p in glob.glob(run.path(pattern))})
    found = run.gather(found)[0]  # the main process's folder decides for all
    if found and not run.options.overwrite:
        raise UserError(f"{run.dir} already holds {', '.join(found)}; pass --resume to continue its training, "
                        f"--overwrite to start afresh (deleting them), or another --save_name")
    if found:
        run.barrier()  # every process has looked before any file goes
        if run.is_main:
            for name in found:
                os.remove(run.path(name))
        log.warning(f"warning: --overwrite: deleted {', '.join(found)} in {run.dir}")
    return None


def load(path: str) -> dict:
    state = load_file(path, "training state")
    fix = "remove it, or pass --overwrite to start afresh"
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a training state; {fix}")
    check_entries(state, CONTENT, f"the training state {path}", fix)
    if len(state["rng"]) != state["settings"]["processes"]:
        raise UserError(f"the training state {path}: rng holds {len(state['rng'])} states for "
                        f"{state['settings']['processes']} processes; {fix}")
    return dict(state, path=path)


# ----------------------------------------------------------------------------------------------- save, restore

def settings(data: DataOptions, model: Recipe, batch_size: int, total_iters: int, seed: int, train_images: int,
             world_size: int) -> dict:
    """The settings a resumed run must share with the saved one (FIXED), and those whose change is logged
    (LOGGED): of the data, the model's recipe, the training's length and batch, and the seed."""
    values = dict(dataset=data.dataset, classes=list(data.classes), realiad_resolution=data.realiad_resolution,
                  json_dir=data.json_dir, encoder=model.encoder, image_size=model.image_size,
                  crop_size=model.crop_size, batch_size=batch_size, total_iters=total_iters, seed=seed,
                  dropout=model.dropout, attn_eps=model.attn_eps, mask_ratio=model.mask_ratio,
                  test_mask=model.test_mask)
    return dict(values, train_images=train_images, processes=world_size)


def save(run: Run, path: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
         settings: dict):
    """Write the state atomically (main process). Every process must call it: each one's RNG state is kept."""
    rng = rng_states(run)
    if run.is_main:
        save_atomic(dict(format=FORMAT, iteration=iteration, settings=settings, module=module.state_dict(),
                         optimizer=optimizer.state_dict(), rng=rng), path)


def restore(run: Run, state: dict | None, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
            current: dict) -> int:
    """The finished iterations. With a saved `state`, first checks that this run's settings (`current`, see
    settings) match and loads the weights, the optimiser and this process's RNG states from it."""
    if state is None:
        return 0
    saved = state["settings"]
    for key in FIXED + ("train_images", "processes"):
        if saved.get(key) != current[key]:
            raise UserError(f"cannot resume with {_describe(key, current[key])}: the saved training state was made "
                            f"with {_describe(key, saved.get(key))}; resume with the same settings, or pass "
                            f"--overwrite instead of --resume to start afresh")
    for key in LOGGED:
        if saved.get(key) != current[key]:
            log.info(f"{_describe(key, current[key])} given; the saved training state was made with "
                     f"{_describe(key, saved.get(key))}")
    path, fix = state.get("path", "file"), "remove it, or pass --overwrite instead of --resume to start afresh"
    try:
        load_strict(module, state["module"], path, "the training state")
    except UserError as e:
        raise UserError(f"{e}; {fix}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"cannot restore the optimiser from the training state {path} ({one_line(e)}); {fix}") \
            from None
    set_rng_state(state["rng"][run.rank], run.device)
    log.info(f"resuming at iteration {state['iteration']} of {current['total_iters']}")
    return state["iteration"]


def _describe(key: str, value) -> str:
    """A setting as the user gives it: '--classes a b', '--batch_size 16', '12 training images', 'torchrun
    --nproc_per_node 2'."""
    value = " ".join(value) if isinstance(value, (list, tuple)) else value
    if key == "processes":
        return f"torchrun --nproc_per_node {value}"
    return f"--{key} {value}" if key in FIXED + LOGGED else f"{value} training images"


def rng_state(device: torch.device) -> dict:
    """This process's random-number states, in types that torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                python=random.getstate())


def set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def rng_states(run: Run) -> list[dict]:
    """The RNG states of all processes, by rank."""
    return run.gather(rng_state(run.device))


# ----------------------------------------------------------------------------------------------- data order

class EpochSampler(DistributedSampler):
    """Shuffled indices for one of `world_size` processes (one included), drop_last: epoch e's order comes from a
    generator seeded with seed + e, so it is the same after a restart. `set_epoch(e, skip)` starts epoch e after
    its first `skip` indices (of this process), which are never loaded. For a dataset whose items change with
    the epoch (`keyed_by_epoch`) it yields (epoch, index) keys (dataset.epoch_key)."""

    def __init__(self, dataset, world_size: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0
        self.keyed = getattr(dataset, "keyed_by_epoch", False)

    def set_epoch(self, epoch: int, skip: int = 0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.skip, None)
        return ((self.epoch, i) for i in indices) if self.keyed else indices

    def __len__(self):
        return self.num_samples - self.skip


# ----------------------------------------------------------------------------------------------- Ctrl-C, SIGTERM

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C; SLURM, Kubernetes, torchrun; a closed terminal


class StopRequest:
    """Within `with StopRequest(...) as stop:`, Ctrl-C (SIGINT), SIGTERM (what SLURM, Kubernetes and torchrun
    send before killing a job) and SIGHUP only set `stop.requested` (and `stop.signum`): the training loop ends
    its step, saves the state and stops. With `again_interrupts` a second signal interrupts at once (one
    process; under torchrun the launcher forwards the signal, so repeats are ignored)."""

    def __init__(self, again_interrupts: bool):
        self.again_interrupts = again_interrupts
        self.requested = False
        self.signum = signal.SIGINT
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and self.again_interrupts:
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped without saving", signum)
        self.requested, self.signum = True, signum
        log.warning(f"{signal.Signals(signum).name} received: saving the training state after this step")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
