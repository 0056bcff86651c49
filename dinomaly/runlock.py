"""The lock of a run folder: one job at a time writes it.

`acquire(folder)` creates `<folder>/run.lock` (host, pid, start time, command) atomically (a hard link of a
complete temporary file, so the lock never exists half-written). When another job holds it the caller gets
a UserError naming the holder and what to do. A lock left by a process that no longer exists on this host
(a kill -9, a crash of the machine's job) is taken over, with a warning. `release_all()` removes the locks
this process holds (run.main calls it when the job ends; also at exit).
"""
import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import time

from .errors import UserError

NAME = "run.lock"
log = logging.getLogger("anomaly")
_held: set[str] = set()  # lock files created by this process


def acquire(folder: str):
    """Hold `folder`'s lock for this process (again: nothing to do). A UserError when another live process
    holds it; an OSError when the folder cannot be written."""
    path = os.path.join(folder, NAME)
    if path in _held:
        return
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
              command=" ".join(sys.argv))
    for _ in range(3):  # a stale lock taken over by another process at the same moment: look again
        if _create(path, me):
            _held.add(path)
            return
        holder = _read(path)
        if holder is None:
            continue  # removed since
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            _held.add(path)
            return
        if not _stale(holder, me["host"]):
            raise UserError(f"the run folder {folder} is in use by another job (pid {holder.get('pid')} on host "
                            f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or pass another "
                            f"--save_name (if that job is gone, delete {path})")
        with contextlib.suppress(FileNotFoundError):  # only one of several takers renames it
            os.rename(path, f"{path}.{os.getpid()}.stale")
            os.remove(f"{path}.{os.getpid()}.stale")
            log.warning(f"warning: took over {path} from pid {holder.get('pid')}, which no longer runs")
    raise UserError(f"cannot take the lock {path}: other jobs keep taking it; wait for them to end")


def _create(path: str, content: dict) -> bool:
    """Create the lock file with `content` unless it exists (False)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(content, f, ensure_ascii=True)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _read(path: str) -> dict | None:
    """The holder named in the lock file, {} when it cannot be read, None when there is no lock file."""
    try:
        with open(path) as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict, host: str) -> bool:
    """Whether the holder is a process of this host that no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != host or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def release_all():
    """Remove the locks this process holds."""
    for path in list(_held):
        with contextlib.suppress(FileNotFoundError):
            if (_read(path) or {}).get("pid") == os.getpid():
                os.remove(path)
        _held.discard(path)


atexit.register(release_all)
