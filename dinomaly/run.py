"""One invocation of a script: exit codes, logging, device and DDP setup, seeds, the run folder (held by its lock,
runlock.py) and its config, atomic checkpoint writing (the command line is parsed in cli.py).

Exit status: 0 success; 2 a user error or out of GPU memory (one line on stderr and in log.txt naming the
thing and the fix); 128 + the signal when stopped by one (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); 1 anything
else (with its traceback).

PyTorch is imported where it is used, not with this module: a command that runs an exported model
(exported.py) never loads it.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
import shutil
import signal
import sys
import threading
import warnings

import numpy as np

from . import events, runlock
from .errors import UserError, user_message
from .options import RunOptions

log = logging.getLogger("anomaly")


class _Formatter(logging.Formatter):
    """The message alone, with characters no encoding can write (a file name that is not valid UTF-8, decoded
    with surrogate escapes) written as backslash escapes, so every line reaches every handler."""

    def format(self, record):
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


_FORMAT = _Formatter("%(message)s")


# ----------------------------------------------------------------------------------------------- command line

class Interrupted(KeyboardInterrupt):
    """The job stopped on a signal (after saving, in training); main exits with 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what a scheduler or a closed terminal sends; Ctrl-C is SIGINT


def _stop(signum, frame):
    """SIGTERM or SIGHUP outside training (which saves first, train_state.StopRequest): stop like Ctrl-C, so that
    the job says so and releases its run folder. A forked loader worker dies as by default."""
    if os.getpid() != _main_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(f"{signal.Signals(signum).name} received: stopped (files written before it are kept)",
                      signum)


_main_pid = os.getpid()


def main(fn, settings):
    """Call fn(settings) (the parsed command line) and turn failures and stop signals into exit codes."""
    global _main_pid
    setup_logging(None)
    code, previous = 0, {}
    torch = sys.modules.get("torch")  # imported by the command if it needed it
    out_of_memory = (torch.OutOfMemoryError,) if torch is not None else ()
    if threading.current_thread() is threading.main_thread():
        _main_pid = os.getpid()
        previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        fn(settings)
    except (UserError, *out_of_memory) as e:
        log.error(f"error: {user_message(e)}")
        code = 2
    except KeyboardInterrupt as e:
        log.error(f"interrupted; {e}" if str(e) else "interrupted")
        code = 128 + getattr(e, "signum", signal.SIGINT)
    except Exception:
        log.exception("internal error (please report it with this traceback):")
        code = 1
    finally:
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        runlock.release_all()
        setup_logging(None)  # closes the run's log.txt: later messages in this process do not go into it
        name_unstarted()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code:
        sys.exit(code)


_fresh_folders: list[str] = []  # run folders this process created


def name_unstarted():
    """For each run folder this process created that holds only log.txt (a job stopped by its checks before it
    started), one line on stdout saying so: the folder is not a run, its log keeps the error."""
    while _fresh_folders:
        folder = _fresh_folders.pop()
        if os.path.isdir(folder) and os.listdir(folder) == ["log.txt"]:
            print(f"nothing was run: {os.path.abspath(folder)} holds only the log of this error (log.txt); delete "
                  f"it or run again into it")


# ----------------------------------------------------------------------------------------------- logging

class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


def setup_logging(log_file: str | None):
    """Messages to stdout, warnings and errors to stderr, and everything (Python warnings too) to log_file."""
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    handlers = [out, err]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.captureWarnings(True)
    for logger in (log, logging.getLogger("py.warnings")):
        for h in logger.handlers:
            h.close()
        logger.handlers.clear()
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in handlers:
            h.setFormatter(_FORMAT)
            logger.addHandler(h)
    warnings.simplefilter("default")


# ----------------------------------------------------------------------------------------------- the run

class Run:
    """Device, distributed state, run folder, logging and seed of one script invocation."""

    def __init__(self, options: RunOptions, config_name: str):
        self.options = options
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.is_main = self.rank == 0
        self.dir = os.path.join(options.save_dir, options.save_name)
        fresh = not os.path.isdir(self.dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {os.path.abspath(self.dir)} ({e.strerror}); check "
                            f"--save_dir") from None
        if fresh and self.is_main:
            _fresh_folders.append(self.dir)
        problem = self._lock() if self.is_main else None
        if problem is None:
            setup_logging(os.path.join(self.dir, "log.txt") if self.is_main else None)
        self.device = self._device(options.device)
        problem = self.gather(problem)[0]  # every process stops when the main one could not take the folder
        if problem is not None:
            raise UserError(problem)
        self.config_name = config_name
        self.tensorboard = self.is_main and events.wanted(options.tensorboard)
        self._events = None
        seed_everything(options.seed + self.rank)
        import torch
        torch.backends.cudnn.deterministic = options.cudnn == "deterministic"
        torch.backends.cudnn.benchmark = options.cudnn == "benchmark"
        where = "" if os.path.isabs(self.dir) else f" ({os.path.abspath(self.dir)}: --save_dir is relative to " \
                                                   f"the current folder)"
        log.info(f"run folder: {self.dir}{where}  device: {self.device}  processes: {self.world_size}")

    def _lock(self) -> str | None:
        """Take the run folder's lock (runlock.py) and open log.txt in it; None, or why the job cannot write
        there."""
        try:
            runlock.acquire(self.dir)
            open(os.path.join(self.dir, "log.txt"), "a").close()
        except UserError as e:
            return str(e)
        except OSError as e:
            return (f"cannot write into the run folder {self.dir} ({e.strerror}); make it writable, or pass "
                    f"another --save_name (--eval_only; --resume: copy the run folder there first)")
        return None

    def _device(self, requested: str | None) -> torch.device:
        if self.world_size == 1:
            return resolve_device(requested)
        import torch
        import torch.distributed as dist
        if not torch.cuda.is_available() or requested == "cpu":
            dist.init_process_group("gloo")
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # before the process group, which binds to the current device
        dist.init_process_group("nccl", device_id=device)
        return device

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def events(self) -> events.Events:
        """The TensorBoard events of this run folder (events.py; writes nothing with --tensorboard off, or on the
        other processes)."""
        if self._events is None or self._events.folder != self.dir:
            self._events = events.Events(self.dir, self.tensorboard)
        return self._events

    def subfolder(self, name: str, **changes) -> "Run":
        """This invocation writing into <run folder>/<name> (one class's folder of a run with one model per
        class), its options changed by `changes`; the lock, log, device and processes are the run's."""
        sub = copy.copy(self)
        sub.options = self.options.replace(**changes)
        sub.dir = self.path(name)
        if self.is_main:
            os.makedirs(sub.dir, exist_ok=True)
        self.barrier()
        return sub

    def save_config(self, config: dict):
        """Every setting of this job (options.Settings.config) in its config file (config.json for training)."""
        if self.is_main:
            with open(self.path(self.config_name), "w") as f:
                json.dump(config, f, indent=2)

    def gather(self, obj) -> list:
        """`obj` from every process, in rank order ([obj] without torchrun)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()


def resolve_device(requested: str | None) -> torch.device:
    """--device, or cuda when available, else the CPU with a warning. A CUDA device given by its index becomes
    the process's current device."""
    import torch
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("warning: no CUDA device found; running on the CPU, which is very slow")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested}; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for, but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        torch.cuda.set_device(device)  # the current device too (the loader's pinned-memory thread uses it)
    return device


def seed_everything(seed: int):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def save_atomic(obj, path: str):
    """torch.save through a temporary file (see write_atomic)."""
    import torch
    write_atomic(path, lambda f: torch.save(obj, f), tensor_bytes(obj))


def write_atomic(path: str, write, size: int):
    """write(f) into a temporary file of this process (flushed and fsynced, then renamed over `path`), so a kill
    at any moment leaves either the old file or the new one, never a broken one, and two processes never write
    the same temporary file. On any failure the temporary file is removed; a full disk is a UserError naming
    the folder and the space needed (`size`: about the file's bytes)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e):
            folder = os.path.dirname(os.path.abspath(path))
            raise UserError(f"no space left in {folder} to write {os.path.basename(path)} (it needs about "
                            f"{size / 1e6:.1f} MB; {shutil.disk_usage(folder).free / 1e6:.1f} MB are free); free "
                            f"some space or pass another --save_dir (the previous file, if any, is unchanged)") \
                from None
        raise


def _no_space(e: BaseException | None) -> bool:
    """Whether `e` or an exception it arose from is a full disk or quota (torch.save wraps the OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in a (nested) dict, list or tuple: about the size of its torch.save file."""
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
