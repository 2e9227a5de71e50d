"""Clean stops: Ctrl-C (SIGINT) and SIGTERM stop training at the next step, the run is marked
KILLED with the reason, the command that resumes it is printed, and the process exits with
128 + the signal number (130, 143), as shells and schedulers expect.

A second Ctrl-C stops at once. Resuming restarts the interrupted epoch from the last epoch-end
checkpoint (`checkpoints.LastCheckpoint`), so every figure of the run equals that of an
uninterrupted one. Under SLURM, the scheduler sends SIGTERM at the time limit or on preemption;
with `sbatch --signal=SIGUSR1@90` Lightning's SLURMEnvironment (auto_requeue) requeues the job
on SIGUSR1 first, and the requeued job resumes the run (see `ownership`).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
_received: int | None = None


class Stopped(SystemExit):
    """Raised at the next step after a stop signal; its exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def reason(self) -> str:
        return f"stopped by {SIGNAL_NAMES.get(self.signum, signal.Signals(self.signum).name)}"


def received() -> int | None:
    """The stop signal this process got, if any."""
    return _received


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    if _received is not None:  # the second one: stop now
        raise Stopped(_received)
    _received = signum
    print(f"\n{SIGNAL_NAMES.get(signum, signum)}: stopping at the next step"
          + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)


def install() -> None:
    """Route SIGINT and SIGTERM to the stop flag (main thread only; Lightning chains its own
    SIGTERM handler in front of this one while it trains)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNAL_NAMES:
            signal.signal(signum, _on_signal)


def _note_and_interrupt(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def install_in_launcher() -> None:
    """For the process that launches a sweep: note the signal (so the sweep's parent run is
    marked KILLED with the reason) and stop at once. A job that trains in this process installs
    the step-stopping handler over this one."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNAL_NAMES:
            signal.signal(signum, _note_and_interrupt)


def raise_if_stopped() -> None:
    if _received is not None:
        raise Stopped(_received)


def as_stopped(err: BaseException) -> Stopped | None:
    """The Stopped exception that `err` amounts to: Lightning's own SIGTERM exit and its exit
    after a KeyboardInterrupt count once a stop signal was received."""
    if isinstance(err, Stopped):
        return err
    if _received is not None and isinstance(err, SIGTERMException | SystemExit | KeyboardInterrupt):
        return Stopped(_received)
    return None


class StopAtNextStep(L.Callback):
    """Raise Stopped at the end of the step (training, validation or test) after a stop signal."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()
