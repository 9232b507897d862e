"""Preemption and time limits: turn USR1/TERM into "save a checkpoint at the next step boundary, then exit".

Slurm warns a job before its time limit (or a preemption) with a signal: `#SBATCH --signal=B:USR1@300` sends
USR1 to the batch script 300 s before the end; `scancel` and the time limit itself send TERM. The batch script
(`scripts/slurm/opd_verl.sbatch`) forwards the signal to the training driver and also creates a flag file.

Two processes are involved, because veRL runs its training loop inside a Ray actor (the task runner), which may
live on another node than the driver that receives the signal:

- the **driver** (`python -m opd_verl.main`) calls :func:`install_signal_handlers` once, before Ray starts. A
  handled signal sets an in-process flag and creates the flag file, so the driver keeps running (without a
  handler USR1 would kill it) and the request reaches the actor;
- the **trainer** (inside the actor) calls :func:`should_save_and_exit` at every step boundary, after the step's
  update and veRL's own periodic save. When it returns True the trainer saves a veRL checkpoint (unless it just
  saved this step), leaves its training loop and returns normally. A later run with `trainer.resume_mode=auto`
  continues from that checkpoint.

The flag file is where the two meet. Its path comes from the environment variable ``OPD_PREEMPT_FLAG_FILE``
(the Slurm script sets it, on a shared filesystem, and Ray's workers inherit it from ``ray start``) or is passed
explicitly. With neither, only the in-process flag is used (single-process runs).

Public API (all functions are safe to call any number of times)::

    install_signal_handlers(flag_file=None, signals=DEFAULT_SIGNALS) -> None   # driver, main thread
    handlers_kept_through(module, name) -> context manager                     # re-install after e.g. ray.init
    request_preemption(reason, flag_file=None) -> None                          # what the handler does
    preemption_requested(flag_file=None) -> bool                                # the flag, or the flag file
    should_save_and_exit(flag_file=None) -> bool                                # trainer, each step boundary
    preemption_reason(flag_file=None) -> str | None                             # e.g. "SIGUSR1", for logs
    clear_preemption(flag_file=None) -> None                                    # forget a handled request
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "DEFAULT_SIGNALS",
    "FLAG_FILE_ENV",
    "clear_preemption",
    "flag_file_path",
    "handlers_kept_through",
    "install_signal_handlers",
    "preemption_reason",
    "preemption_requested",
    "request_preemption",
    "should_save_and_exit",
]

FLAG_FILE_ENV = "OPD_PREEMPT_FLAG_FILE"
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)

_requested = threading.Event()
_reason: str | None = None


def flag_file_path(flag_file: str | os.PathLike | None = None) -> Path | None:
    """The flag file to use: `flag_file` if given, else ``$OPD_PREEMPT_FLAG_FILE``, else None (none is used)."""
    if flag_file is not None and str(flag_file) != "":
        return Path(flag_file)
    env = os.environ.get(FLAG_FILE_ENV, "")
    return Path(env) if env else None


def request_preemption(reason: str, flag_file: str | os.PathLike | None = None) -> None:
    """Record a request to save and exit: set the in-process flag and create the flag file (if one is configured).

    The file holds the reason and the time, one line. Failing to write it (e.g. a read-only directory) leaves the
    in-process flag set and is not raised: this runs inside a signal handler.
    """
    global _reason
    if _reason is None:
        _reason = reason
    _requested.set()
    path = flag_file_path(flag_file)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(f"{reason} {time.time():.3f} pid={os.getpid()}\n")
    except OSError:
        pass


def _handler(signum: int, frame) -> None:  # noqa: ARG001  (signal handler signature)
    request_preemption(signal.Signals(signum).name)


def install_signal_handlers(
    flag_file: str | os.PathLike | None = None, signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS
) -> None:
    """Catch `signals` (default USR1 and TERM) in this process and turn them into a preemption request.

    Must run in the main thread (Python's rule for signal handlers). With `flag_file` given, it is exported as
    ``$OPD_PREEMPT_FLAG_FILE`` so that processes started afterwards (Ray workers started by this driver) see it.
    """
    if flag_file is not None and str(flag_file) != "":
        os.environ[FLAG_FILE_ENV] = str(flag_file)
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers must be called from the main thread (Python signal rule)")
    for sig in signals:
        signal.signal(signal.Signals(sig), _handler)


@contextlib.contextmanager
def handlers_kept_through(
    owner, name: str = "init", signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS
) -> Iterator:
    """Within the block, every call of ``owner.name`` re-installs the plugin's handlers when it returns.

    ``ray.init`` installs Ray's own SIGTERM handler in the driver (``ray/_private/worker.py``: ``sys.exit``; with a
    local head node, ``ray/_private/node.py``: stop Ray's processes and exit 1), which would take TERM from the
    plugin: the run would end with nothing saved. veRL calls ``ray.init`` inside ``run_ppo``, so the driver runs
    ``run_ppo`` in ``with handlers_kept_through(ray, "init"):``.
    """
    original = getattr(owner, name)
    signals = tuple(signals)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            install_signal_handlers(signals=signals)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


def preemption_requested(flag_file: str | os.PathLike | None = None) -> bool:
    """True once a signal was handled in this process or the flag file exists."""
    if _requested.is_set():
        return True
    path = flag_file_path(flag_file)
    return path is not None and path.exists()


def should_save_and_exit(flag_file: str | os.PathLike | None = None) -> bool:
    """The step-boundary decision: True means "save a checkpoint now (if not saved this step), then stop training".

    Call it after a step has finished (update applied, veRL's periodic save done), never in the middle of one.
    """
    return preemption_requested(flag_file)


def preemption_reason(flag_file: str | os.PathLike | None = None) -> str | None:
    """The first word of the request (e.g. "SIGUSR1") for logs; None when nothing was requested."""
    if _reason is not None:
        return _reason
    path = flag_file_path(flag_file)
    if path is None or not path.exists():
        return None
    try:
        words = path.read_text().split()
    except OSError:
        return "flag_file"
    return words[0] if words else "flag_file"


def clear_preemption(flag_file: str | os.PathLike | None = None) -> None:
    """Forget a request: clear the in-process flag and delete the flag file.

    The Slurm script deletes a stale flag file itself before it starts the driver, so a resumed run does not need
    this (calling it after start-up could drop a signal that arrived during start-up).
    """
    global _reason
    _reason = None
    _requested.clear()
    path = flag_file_path(flag_file)
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
