"""Checkpoint on the preemption signal: SLURM's `--signal=USR2@<delay>` arrives, every rank saves at
the same step, then the job is requeued (submitit) or exits with PREEMPTED_EXIT_CODE (plain runs).

    previous = preemption.install()      # in every rank's process, before training
    ...                                  # train_epoch: the step statistics sum the flag over ranks
    except preemption.Preempted: ...     # raised after the checkpoint of that step is on disk

Why not act in the handler: a signal lands in the middle of a step, on some ranks only (SLURM
signals every task, but not at the same instant). The handler only records it; the flag travels in
the per-step all_reduce that already exists (trainer.step_stats_vector), so all ranks see it after
the same step, save that step together and stop. The statistics are read one step late (no host
sync, trainer.py), so the signal is acted on within two training steps.
EXTRACT has no per-step collective and a different number of batches on each rank (at 96M images
it lasts most of an hour, longer than any signal delay), so it polls: `UnevenLoopPoll` ORs the
flag over ranks every POLL_EVERY batches and stops every rank in the same poll round; nothing needs
saving there, last.pt already holds the round's start. CLUSTER (minutes at scale: PCA moments,
whitening, k-means iterations at both levels) polls the same way, at every chunk batch and every
Lloyd iteration, and stops the same way.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Union

import torch

from . import comm

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
    """Has this process received the signal? (trainer.step_stats_vector sums it over ranks)"""
    return _received["signum"] is not None


def reset() -> None:
    """Forget a received signal (tests)."""
    _received["signum"] = None


class StopRequested(Exception):
    """Raised on every rank in the same UnevenLoopPoll round once any rank has the signal."""


class UnevenLoopPoll:
    """Agree on the signal inside a loop whose length differs between ranks.

        poll = UnevenLoopPoll()
        for batch in loader: ...; poll.step()    # every `every` calls: all_reduce (signal?, still running)
        poll.finish()                            # joins the others' polls until every rank is done
        for it in range(niter): ...; poll.now()  # a poll at every call (one Lloyd iteration: seconds)
        poll.finish()

    Every poll is one all_reduce over the world that all ranks join: running ranks at their own
    pace, ranks that have finished in a loop inside finish(). So the rounds stay in lockstep, the
    loop ends together when no rank is running, and StopRequested is raised on all ranks in the same
    round. The same object serves phase after phase; between finish() and the next step() a rank
    may run other collectives (all ranks have left the loop). Collectives on sub-groups may run
    inside the loop (level-2 k-means): those groups' members poll in the same order.
    """

    def __init__(self, every: int = POLL_EVERY):
        self.every, self.calls = every, 0

    def _poll(self, running: bool) -> bool:
        """True while some rank is still running; raises StopRequested when some rank has the signal."""
        votes = comm.all_reduce(torch.tensor([int(requested()), int(running)], dtype=torch.int64))
        signalled, running_ranks = bool(votes[0]), int(votes[1])
        if signalled:
            raise StopRequested("preemption signal received")
        return running_ranks > 0

    def step(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self._poll(running=True)

    def now(self) -> None:
        self._poll(running=True)

    def finish(self) -> None:
        while self._poll(running=False):
            pass
        self.calls = 0

    @staticmethod
    def vote() -> float:
        """This rank's flag, to ride on a world collective the caller runs anyway (level-1 k-means
        M-step): no extra message. `decide(sum over ranks)` then stops every rank together."""
        return float(requested())

    @staticmethod
    def decide(total: float) -> None:
        if total > 0:
            raise StopRequested("preemption signal received")


class _NoPoll:
    """The poll of a loop outside training (tools, tests, one process): does nothing."""

    def step(self) -> None:
        pass

    def now(self) -> None:
        pass

    def finish(self) -> None:
        pass

    @staticmethod
    def vote() -> float:
        return 0.0

    @staticmethod
    def decide(total: float) -> None:
        pass


NO_POLL = _NoPoll()
