"""SIGTERM as a preemption notice: finish the step, checkpoint, end the MLflow run as KILLED, exit 143.

Kubernetes sends SIGTERM when it evicts a pod (spot reclaim, node drain, preemption by the scheduler)
and SIGKILL once ``terminationGracePeriodSeconds`` has passed. The trainer's entry point installs
:class:`StopNotice`; the training loop asks :meth:`StopNotice.requested` after each optimizer step (all
ranks agree on the answer, see :func:`agree`), writes a checkpoint of that exact position and exits
with :data:`gpu_trainer.contract.PREEMPTED_EXIT_CODE`. A launcher restarts it on the same checkpoint
directory and it continues at the next sample, in the same MLflow run.

A second SIGTERM means "stop now": the process ends at once, as SIGTERM's default action would, without
a checkpoint. One exception: the same notice often arrives twice within milliseconds (sent to the whole
process group and forwarded again by torchrun to its workers), so a repeat within
:data:`DUPLICATE_WINDOW_SECONDS` of the first counts as that first notice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: A SIGTERM this soon after the first one is the same notice delivered a second way (process group
#: plus torchrun's forwarding), not a request to skip the checkpoint.
DUPLICATE_WINDOW_SECONDS = 1.0

_SECOND_SIGTERM_LINE = b"gpu_trainer: second SIGTERM: stopping now, without a checkpoint\n"


class TrainingPreempted(Exception):
    """Raised out of the training loop once the preemption checkpoint is written.

    :param global_step: the optimizer step the checkpoint holds (every rank stopped after it).
    """

    def __init__(self, global_step: int) -> None:
        super().__init__(f"preempted by SIGTERM after step {global_step}")
        self.global_step = global_step


class StopNotice:
    """Remembers a SIGTERM for the training loop instead of dying on it.

    :param duplicate_window: seconds within which a repeated SIGTERM counts as the first one.
    """

    def __init__(self, *, duplicate_window: float = DUPLICATE_WINDOW_SECONDS) -> None:
        self.duplicate_window = duplicate_window
        self.received_at: float | None = None
        self._previous: Any = None

    @property
    def requested(self) -> bool:
        """Whether a SIGTERM arrived in this process."""
        return self.received_at is not None

    def install(self) -> StopNotice:
        """Handle SIGTERM in this process (call it from the main thread, in the entry point only).

        :returns: this notice, for chaining.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopNotice.install must run on the main thread (Python's signal rule)")
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def uninstall(self) -> None:
        """Give SIGTERM back to the handler it had before :meth:`install` (an in-process caller's)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this on the main thread between bytecodes: it only records the time, the loop
        # does the work at the next step boundary.
        now = time.monotonic()
        if self.received_at is None:
            self.received_at = now
            return
        if now - self.received_at < self.duplicate_window:
            return
        # The grace period is being cut short: end like SIGTERM's default action, so whoever waits sees
        # a process killed by SIGTERM, not one that wrote a checkpoint. os.write: no locks in a handler.
        os.write(2, _SECOND_SIGTERM_LINE)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


class StopVote:
    """Whether any rank got the notice, the same answer on every rank for the same step.

    Ranks receive SIGTERM microseconds to milliseconds apart (torchrun forwards it to each worker in
    turn): asking only the local flag, one rank would stop a step before another and the checkpoint
    would mix two steps. So after each step every rank contributes its flag to an all-reduce (MAX) and
    acts on the result one step later: the collective runs in the background during the next step
    instead of adding a round trip to every step. ``tests/benchmarks/bench_preemption_vote.py`` (digits
    MLP, 2 CPU processes, gloo): a blocking vote per step ran at 0.78-0.84 of the loop without a vote,
    this one at 1.01-1.04. All ranks stop after the same step; reacting one step later loses nothing,
    since the checkpoint holds that step too.

    The vote travels over a gloo group on CPU tensors even when training uses NCCL: reading an NCCL
    result on the host would synchronise the GPU stream every step.

    :param notice: this process's SIGTERM notice; None never stops (in-process callers, tests).
    :param group: a gloo process group over all ranks (the trainer's host-side group); None in a single
        process.
    """

    def __init__(self, notice: StopNotice | None, *, group: Any = None) -> None:
        self.notice = notice
        self.group = group
        self.distributed = group is not None and notice is not None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def after_step(self) -> bool:
        """Call on every rank after each optimizer step; True when all ranks must stop now."""
        if self.notice is None:
            return False
        if not self.distributed:
            return self.notice.requested
        import torch
        import torch.distributed as dist

        decided = self._collect()
        if decided:
            return True
        flag = torch.tensor([1 if self.notice.requested else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, flag)
        return False

    def settle(self) -> bool:
        """The outcome of the vote in flight (call on every rank where training stops stepping)."""
        if self.notice is None:
            return False
        if not self.distributed:
            return self.notice.requested
        return self._collect()

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())

    def barrier(self) -> None:
        """Hold every rank until rank 0's preemption checkpoint is written, so they all exit together
        (a rank leaving early makes torchrun tear the others down)."""
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)
