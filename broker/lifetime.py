"""That nothing a run starts outlives it: child processes that die with their parent, and run
folders (the broker's hashed passwords, ACL, TLS key) removed by the next run when their owner died.

A run killed with SIGKILL runs no cleanup of its own, so both are arranged beforehand:

- On Linux, every child the run starts asks the kernel for a signal when its parent dies
  (``PR_SET_PDEATHSIG``): mosquitto, the channel emulator, and (scenarios/agent_groups.py) each
  agent. The kernel clears that request when a process changes its user, so mosquitto, when the run
  is root, is started as its unprivileged user directly (the request is made after the switch)
  instead of dropping privileges itself. Elsewhere the run's own cleanup is all there is.
- A run folder holds an ``owner`` file (the owning PID and its start time, so a recycled PID does
  not count as alive); :func:`sweep_stale_run_dirs` removes the folders of owners that are gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
OWNER_FILE = "owner"
RUN_DIR_PREFIX = "nmoe-"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded before any fork


def wait_exited(pid: int, timeout: float) -> None:
    """Block until our child ``pid`` has exited (it is left to the caller to reap) or ``timeout``
    seconds have passed, whichever is first.

    ``Popen.wait`` with a timeout, and a ``waitpid(WNOHANG)`` loop, poll with sleeps (Popen's grow
    to 50 ms), so they notice an exit up to 50 ms late (the end of a networked run: the broker's
    stop took 0.114 s by Popen.wait, 0.102 s by this; the agent host's close polled every 50 ms).
    A pidfd (Linux 5.3+) is readable the moment the process exits. Elsewhere, or where the kernel
    has none, or once the child is reaped, this returns at once and the caller's own wait does
    the rest.
    """
    if not hasattr(os, "pidfd_open"):
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # reaped already, or a kernel without pidfds
        return
    try:
        select.select([fd], [], [], max(0.0, timeout))
    finally:
        os.close(fd)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies; a no-op
    elsewhere. Call it in the child, as the first thing it does (or from a ``preexec_fn``)."""
    if _libc is None:
        return
    parent = os.getppid()
    if _libc.prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:  # the parent died before the request was in place
        os.kill(os.getpid(), sig)


def dying_with(parent_pid: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess``: the child dies with ``parent_pid`` (the caller).

    The kernel signals the child when the *thread* that forked it ends, so start such children from
    the main thread (or the event loop's), never from a short-lived worker thread.
    """

    def preexec() -> None:
        if _libc is None:
            return
        if _libc.prctl(PR_SET_PDEATHSIG, sig) != 0 or os.getppid() != parent_pid:
            os._exit(1)  # prctl failed, or the run is already gone: do not start orphaned

    return preexec


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat, after the parenthesized name


def alive(pid: int, start_time: str | None = None) -> bool:
    """Whether ``pid`` runs (and, when given, is the process that started at ``start_time``)."""
    if sys.platform == "linux":
        now = _start_time(pid)
        return now is not None and (start_time is None or now == start_time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_run_dir(run_id: str) -> Path:
    """A private temporary folder for one run's broker files, marked with its owner (this process)."""
    sweep_stale_run_dirs()
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{run_id}-"))
    pid = os.getpid()
    (path / OWNER_FILE).write_text(f"{pid} {_start_time(pid) or '-'}\n")
    return path


def sweep_stale_run_dirs(root: Path | None = None) -> list[Path]:
    """Remove run folders (ours: named ``nmoe-*`` and holding an owner file) whose owner is gone.

    Folders without an owner file are not ours to judge and are left alone.
    """
    root = root or Path(tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid_text, start = (path / OWNER_FILE).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not a run folder of ours, or one being created right now
        if alive(pid, None if start == "-" else start):
            continue
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue  # another run swept it first
        except OSError as err:
            log.warning("cannot remove %s, left behind by run process %d: %s", path, pid, err)
            continue
        log.info("removed %s, left behind by run process %d", path, pid)
        removed.append(path)
    return removed
