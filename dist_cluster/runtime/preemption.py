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
saving there: last.pt already holds the round's start (in round 0 of a fresh run there is none yet,
and the run restarts from the beginning, having lost only that extraction). CLUSTER (minutes at scale: PCA moments,
whitening, k-means iterations at both levels) polls the same way, at every chunk batch and every
Lloyd iteration, and stops the same way.

How the processes end (rounds.train, then `stop_and_exit` here), once every rank's checkpoint is
on disk: rank 0 writes RUN/preempted.json (step, signal, checkpoint, exit code), every rank stops
listening to SIGTERM, meets the others at a barrier and exits with PREEMPTED_EXIT_CODE.
- srun, one task per GPU: every task exits 75, and srun returns the highest exit code of its tasks:
  75. With `srun --kill-on-bad-exit` (or KillOnBadExit=1) srun may kill the tasks still exiting.
- torchrun: every rank exits 75 (ignoring SIGTERM is what makes this hold: torchrun's agent treats
  the first non-zero exit as a failure and SIGTERMs the ranks still running, the others' last
  milliseconds of exiting included; it then waits for them and reports each rank's code in its
  failure summary). torchrun itself exits 1 whatever the ranks' codes (it re-raises
  ChildFailedError), so a wrapper tells a preemption from a crash by RUN/preempted.json, which every
  start of the run removes. With `--max-restarts N`, torchrun restarts ranks that exited 75 (they
  resume from the checkpoint they just wrote): use --max-restarts 0 where a wrapper requeues.
- A USR2 sent to torchrun itself kills it (its default action) and the ranks run on, orphaned,
  unless torchrun forwards it: `torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2`
  sends it to every rank, which then stop as above, and torchrun exits 1 (SignalException); it
  SIGKILLs ranks still running `--shutdown-timeout` seconds (default 30) later. Under SLURM signal
  the ranks (`#SBATCH --signal=USR2@<delay>` reaches every process of the job steps; by hand:
  `scancel --signal=USR2 --full`), not only the launcher.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from dist_cluster.runtime import comm

POLL_EVERY = 20  # EXTRACT batches between polls: one tiny all_reduce per 20 batches
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the checkpoint of the stopping step is on disk

Handler = Union[Callable, int, None]
_received: dict = {"signum": None}


class Preempted(Exception):
    """Raised on every rank once the checkpoint of the stopping step is written (`checkpoint`: its
    path), or, stopped before the run's first checkpoint, with checkpoint=None."""

    def __init__(self, global_step: int, checkpoint: Optional[Path] = None):
        # a rank that learnt of the signal from its peers has received none itself
        self.signum = _received["signum"] or int(preemption_signal())
        where = (f"{checkpoint} holds this step: the same command resumes" if checkpoint is not None
                 else "no checkpoint yet: the run restarts from the beginning")
        super().__init__(f"preempted by {signal.Signals(self.signum).name} at step {global_step}; {where}")
        self.global_step, self.checkpoint = global_step, checkpoint


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


# ------------------------------------------------------------------ the end of a preempted run

MARKER = "preempted.json"  # RUN/preempted.json: the last start of RUN stopped on the signal


def marker_path(run_dir) -> Path:
    return Path(run_dir) / MARKER


def clear_marker(run_dir) -> None:
    """A run that starts is no longer preempted (rank 0, before any work)."""
    marker_path(run_dir).unlink(missing_ok=True)


def write_marker(run_dir, stop: Preempted, world_size: int) -> Path:
    """What a wrapper reads after torchrun (which exits 1 for a crash and a preemption alike)."""
    path = marker_path(run_dir)
    record = {"step": stop.global_step, "signal": signal.Signals(stop.signum).name,
              "checkpoint": None if stop.checkpoint is None else str(stop.checkpoint),
              "exit_code": PREEMPTED_EXIT_CODE, "world_size": world_size, "time": round(time.time(), 3)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def stop_and_exit(stop: Preempted, run_dir, main: bool, world_size: int, on_preempted=None,
                  previous_handler: Handler = None):
    """Every rank, every rank's checkpoint on disk: marker (rank 0), on_preempted (submitit's
    requeue; it may exit itself), a barrier so that none leaves before the others got here, then
    SystemExit(PREEMPTED_EXIT_CODE). SIGTERM is ignored from here on: it could only turn a stop that
    is already complete into a death by signal (torchrun sends it to the ranks still exiting)."""
    if main:
        write_marker(run_dir, stop, world_size)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if on_preempted is not None:
            on_preempted(stop, previous_handler)
    finally:
        comm.barrier()
    raise SystemExit(PREEMPTED_EXIT_CODE)


def launcher_note(environ: Optional[dict] = None) -> Optional[str]:
    """A warning for torchrun inside a SLURM job when torchrun does not forward the preemption
    signal (its TORCHELASTIC_SIGNALS_TO_HANDLE, which the ranks inherit, lacks it); else None."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or "SLURM_JOB_ID" not in env:
        return None
    name = preemption_signal().name
    handled = {s.strip() for s in env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "").split(",")}
    if name in handled:
        return None
    return (f"note: this torchrun does not forward {name}: a {name} sent to torchrun kills it and orphans "
            f"the ranks. Signal the ranks (#SBATCH --signal={name.removeprefix('SIG')}@<delay> does) or start "
            f"torchrun with --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,{name}.")
