"""Checkpoint on the preemption signal: SLURM's `--signal=USR2@<delay>` arrives, every rank saves at
the same step, then the job is requeued (submitit) or exits with PREEMPTED_EXIT_CODE (plain runs).

    previous = preemption.install()      # in every rank's process, before training
    ...                                  # train_epoch: reduce_step_stats ORs the flag over ranks
    except preemption.Preempted: ...     # raised after the checkpoint of that step is on disk

Why not act in the handler: a signal lands in the middle of a step, on some ranks only (SLURM
signals every task, but not at the same instant). The handler only records it; the flag travels in
the per-step all_reduce that already exists (trainer.reduce_step_stats), so all ranks see it after
the same step, save that step together and stop. The signal is acted on within one training step.
EXTRACT has no per-step collective and a different number of batches on each rank (at 96M images
it lasts most of an hour, longer than any signal delay), so it polls: `UnevenLoopPoll` ORs the
flag over ranks every POLL_EVERY batches and stops every rank in the same poll round; nothing needs
saving there, last.pt already holds the round's start. During CLUSTER (minutes) the signal waits
for the first training step.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Union

import torch
import torch.distributed as dist

POLL_EVERY = 20  # EXTRACT batches between polls: one tiny all_reduce per 20 batches
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the checkpoint of the stopping step is on disk

Handler = Union[Callable, int, None]
_received: dict = {"signum": None}


class Preempted(Exception):
    """Raised on every rank once the checkpoint of the stopping step is written."""

    def __init__(self, global_step: int):
        # a rank that learnt of the signal from its peers has received none itself
        self.signum = _received["signum"] or int(preemption_signal())
        super().__init__(f"preempted by {signal.Signals(self.signum).name} at step {global_step}; "
                         "RUN/checkpoints/last.pt holds this step: the same command resumes")
        self.global_step = global_step


def preemption_signal() -> signal.Signals:
    """USR2 unless SUBMITIT_PREEMPT_SIGNAL names another (submitit's own variable; NCCL catches USR1)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2').removeprefix('SIG')}"]


def _record(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received["signum"] = signum


def install() -> Handler:
    """Record the preemption signal instead of acting on it; returns the handler it replaces
    (submitit's requeue handler inside a submitit job, SIG_DFL otherwise)."""
    _received["signum"] = None
    return signal.signal(preemption_signal(), _record)


def requested() -> bool:
    """Has this process received the signal? (trainer.reduce_step_stats sums it over ranks)"""
    return _received["signum"] is not None


def reset() -> None:
    """Forget a received signal (tests)."""
    _received["signum"] = None


class StopRequested(Exception):
    """Raised on every rank in the same UnevenLoopPoll round once any rank has the signal."""


class UnevenLoopPoll:
    """Agree on the signal inside a loop whose length differs between ranks.

        poll = UnevenLoopPoll(device)
        for batch in loader: ...; poll.step()    # every `every` calls: all_reduce (signal?, still running)
        poll.finish()                            # joins the others' polls until every rank is done

    Every poll is one all_reduce that all ranks join: running ranks every `every` iterations, ranks
    that have finished in a loop inside finish(). So the rounds stay in lockstep, the loop ends
    together when no rank is running, and StopRequested is raised on all ranks in the same round.
    """

    def __init__(self, device: torch.device, every: int = POLL_EVERY):
        self.device, self.every, self.calls = device, every, 0

    def _poll(self, running: bool) -> bool:
        """True while some rank is still running; raises StopRequested when some rank has the signal."""
        if not (dist.is_available() and dist.is_initialized()):
            signalled, running_ranks = requested(), int(running)
        else:
            votes = torch.tensor([int(requested()), int(running)], device=self.device)
            dist.all_reduce(votes)
            signalled, running_ranks = bool(votes[0]), int(votes[1])
        if signalled:
            raise StopRequested("preemption signal received")
        return running_ranks > 0

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self._poll(running=True)

    def finish(self) -> None:
        while self._poll(running=False):
            pass
