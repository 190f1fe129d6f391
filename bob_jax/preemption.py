"""Preemption: a signal makes a training loop checkpoint at the current step and exit cleanly.

Signals that announce the end of a run:
  * SIGTERM: what SLURM sends at the time limit or on preemption (SIGKILL follows after `KillWait`,
    default 30 s), what Kubernetes sends, and how TPU VM maintenance events / spot preemptions arrive;
  * SIGUSR1 / SIGUSR2: advance warnings asked for with `sbatch --signal=[B:]USR1@120` (the signal
    `sig_time` seconds before the time limit).

A training loop wraps itself in `watch()` and asks `watcher.should_stop(step)` once per step. When it
says True, the loop saves a checkpoint at that step (synchronously) and raises `Preempted`; entry points
(`bob_jax.main`, `bob_jax.sweep`) catch it, print where the checkpoint is and exit with `EXIT_STATUS`
(143 = 128 + SIGTERM, what a shell reports for a process ended by SIGTERM, so schedulers and wrappers
read it as "terminated, not failed"). Rerunning the same command resumes from the checkpoint.

How every process agrees on the stop step. A multi-host checkpoint is a collective save: all processes
must stop after the same step, although a signal may reach only one host (a TPU maintenance event) or
reach hosts at different moments. Two ways were possible: an all-gather of the local flags every k
steps (a device collective that blocks the host and so stalls the asynchronous dispatch of steps, and
stops up to k steps late), or jax's coordination-service preemption sync manager, which
`jax.distributed.initialize()` starts (`jax_enable_preemption_service`, on by default). We use the
latter: its C++ notifier installs its own SIGTERM handler at initialize time (`std::signal`; Python's
`signal.getsignal` does not see it), a notice from any process is propagated through the coordinator
to all of them, every process reports its current call counter, and
`multihost_utils.reached_preemption_sync_point(counter)` turns True on every process at the same
counter, max + 1. Asking costs a mutex and a compare per step, no communication. Consequences, checked
against jax 0.10.2 (`jax/_src/distributed.py`, `jax/experimental/multihost_utils.py`, and by sending a
SIGTERM to a `jax.distributed` process):
  * in that mode we must not install a Python SIGTERM handler: it would replace the notifier's. SIGUSR1/2
    get a Python handler that re-sends SIGTERM to this process, so the warning reaches the notifier;
  * the sync manager needs ONE counter that grows over the process's life (it compares for equality
    and computes max + 1 across processes), while a sweep runs many loops whose steps restart at 0 or
    at a resumed step. The watcher therefore passes a process-wide call counter, which every process
    advances identically because all of them run the same loops for the same steps;
  * if the service is disabled, we fall back to the all-gather every `ALLGATHER_EVERY` steps.
A single-process run (no `jax.distributed`) just reads the flag set by its own handlers.

Outside `watch()` signals keep their default action (SIGTERM/USR1/USR2 end the process): work finished
so far is in the results store and checkpoints, and a rerun skips or resumes it. Under jax.distributed
the notifier holds SIGTERM for the whole process life instead: the notice is kept, and the next training
loop stops after its first step (the sync point is the last call counter + 1).

Measured on this machine (2 CPU cores): a SIGUSR1 sent to one of two jax.distributed processes stopped
both at the same step about 2 s later (the notifier polls once a second); a single process stops at the
step after the signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["EXIT_STATUS", "SIGNALS", "Preempted", "Watcher", "message", "requested", "watch"]

log = logging.getLogger(__name__)

# 128 + SIGTERM: a shell's status for "ended by SIGTERM". Launchers requeue on it (launch/slurm.sbatch,
# the array script from `python -m bob_jax.sweep --emit_slurm`); clusters with `RequeueExit=143` in
# slurm.conf requeue such jobs themselves.
EXIT_STATUS = 128 + int(signal.SIGTERM)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Fallback agreement (multi-process without jax's preemption service): steps between all-gathers.
ALLGATHER_EVERY = 10


class Preempted(BaseException):
    """A training loop stopped on a preemption signal after checkpointing `step` in `checkpoint_dir`.

    A BaseException (like KeyboardInterrupt), so `except Exception` blocks that keep a sweep going after
    an ordinary failure do not swallow it: the whole process has to stop."""

    def __init__(self, step: int, checkpoint_dir: str | None, signal_name: str | None = None):
        self.step, self.checkpoint_dir, self.signal_name = int(step), checkpoint_dir, signal_name
        super().__init__(message(self))


def message(e: Preempted) -> str:
    cause = f" ({e.signal_name})" if e.signal_name else ""
    where = f"checkpoint saved in {e.checkpoint_dir}" if e.checkpoint_dir else "no checkpoint directory"
    return f"preempted at step {e.step}{cause}; {where}; rerun the same command to resume"


@dataclasses.dataclass
class _State:
    """Process-wide: the signal seen (None: none yet), nesting depth and the sync-point call counter."""

    received: str | None = None
    depth: int = 0
    calls: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))


_STATE = _State()
_LOCK = threading.Lock()


def requested() -> bool:
    """Whether a preemption signal arrived while a `watch()` was active (since the outermost one began)."""
    return _STATE.received is not None


def _distributed_mode() -> str:
    """'local' (own handlers, local flag), 'sync_point' (jax's preemption service) or 'allgather'."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        return "local"
    return "sync_point" if distributed.global_state.preemption_sync_manager is not None else "allgather"


class Watcher:
    """Asked once per training step whether to checkpoint and stop (see the module docstring)."""

    def __init__(self, mode: str):
        if mode not in ("off", "local", "sync_point", "allgather"):
            raise ValueError(f"preemption.Watcher: unknown mode {mode!r}")
        self.mode = mode

    @property
    def signal_name(self) -> str | None:
        if _STATE.received is None and self.mode == "sync_point":
            return "a SIGTERM here or on another process, via jax's preemption service"
        return _STATE.received

    def should_stop(self, step: int) -> bool:
        """True on every process at the same step once a preemption signal arrived (anywhere)."""
        del step  # the agreement uses the process-wide counter: loop steps restart between runs
        if self.mode == "off":
            return False
        if self.mode == "local":
            return _STATE.received is not None
        call = next(_STATE.calls)
        if self.mode == "sync_point":
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(call))
        if call % ALLGATHER_EVERY:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(_STATE.received is not None))
        return bool(np.any(flags))


def _handler(mode: str):
    def handle(signum, frame):
        del frame
        name = signal.Signals(signum).name
        if _STATE.received is None:
            _STATE.received = name
        log.warning("received %s: the training loop checkpoints and stops at the next agreed step", name)
        if mode == "sync_point":
            # Only SIGTERM reaches jax's notifier; turn the advance warning into one.
            os.kill(os.getpid(), signal.SIGTERM)

    return handle


@contextlib.contextmanager
def watch(enabled: bool = True) -> Iterator[Watcher]:
    """Install the preemption handlers for the duration of a training loop; restore the previous ones.

    `enabled=False` (e.g. a loop without a checkpoint directory) yields a watcher that never stops and
    leaves the signals alone. Nested watches share one flag; the outermost one clears it on entry.
    Handlers can only be installed from the main thread; elsewhere the signals keep their current action
    (jax's preemption service needs no Python handler and still works)."""
    if not enabled:
        yield Watcher("off")
        return
    mode = _distributed_mode()
    # jax's notifier owns SIGTERM in sync_point mode; installing a Python handler would replace it.
    signals = [s for s in SIGNALS if not (mode == "sync_point" and s == signal.SIGTERM)]
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread:
        log.warning("preemption.watch() outside the main thread: no signal handlers are installed")
    previous = {}
    with _LOCK:
        if _STATE.depth == 0:
            _STATE.received = None
        _STATE.depth += 1
    try:
        if main_thread:
            handler = _handler(mode)
            for s in signals:
                previous[s] = signal.signal(s, handler)
        # Without handlers the local flag stays unset, but the watcher still takes part in the agreement
        # (sync point or all-gather), which every process must call identically.
        yield Watcher(mode)
    finally:
        for s, old in previous.items():
            # None: the old handler was not installed from Python; the default is the best we can restore.
            signal.signal(s, signal.SIG_DFL if old is None else old)
        with _LOCK:
            _STATE.depth -= 1
