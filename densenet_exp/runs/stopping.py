"""Clean stops: Ctrl-C (SIGINT) and SIGTERM stop training at the next step, the run is marked
KILLED with the reason, the command that resumes it is printed, and the process exits with
128 + the signal number (130, 143), as shells and schedulers expect.

A second Ctrl-C stops at once. Resuming restarts the interrupted epoch from the last epoch-end
checkpoint (`checkpoints.LastCheckpoint`), so every figure of the run equals that of an
uninterrupted one. Under SLURM, the scheduler sends SIGTERM when it preempts or requeues a job
(the requeued job resumes the run: see `ownership`) and at the time limit; `sbatch
--signal=USR1@N` asks for SIGUSR1 N seconds before the limit, which stops the job the same way
while there is time to (exit 138). Lightning's own SLURM requeue on SIGUSR1 is off (job.py).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import lightning as L

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM",
                signal.SIGUSR1: "SIGUSR1 (the warning before the time limit: sbatch --signal=USR1@N)"}
_received: int | None = None


class Stopped(SystemExit):
    """Raised at the next step after a stop signal; its exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def reason(self) -> str:
        return f"stopped by {SIGNAL_NAMES.get(self.signum, signal.Signals(self.signum).name)}"

    def __str__(self) -> str:
        return self.reason


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
    """Route SIGINT, SIGTERM and SIGUSR1 to the stop flag (main thread only; Lightning chains its own
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
    """The Stopped exception that `err` amounts to: once a stop signal was received, any error
    counts as the stop: Lightning's own SIGTERM exit, its exit after a KeyboardInterrupt, and the
    failure of work that the signal reached too (SLURM signals every process of the job: a C++
    compiler that torch.compile started fails with a compile error)."""
    if isinstance(err, Stopped):
        return err
    return Stopped(_received) if _received is not None else None


class StopAtNextStep(L.Callback):
    """Raise Stopped at the end of the step (training, validation or test) after a stop signal."""

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise_if_stopped()
