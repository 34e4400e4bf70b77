"""preemption.UnevenLoopPoll: ranks with different numbers of EXTRACT batches agree on the signal
in lockstep poll rounds (all stop in the same round, or all finish), with real gloo ranks."""
import signal
from types import SimpleNamespace

import pytest
import torch

from dist_cluster.cluster.extract import extract_features
from dist_cluster.runtime import preemption
from tests.dist_utils import run_ranks


def _uneven_loop(rank, world, lengths, signal_at, every=2):
    """('done' | 'stopped', iterations run); the signal is recorded on rank signal_at[0] before
    iteration signal_at[1] (or 'after' its loop)."""
    preemption.reset()
    poll, done = preemption.UnevenLoopPoll(every=every), 0
    try:
        for i in range(lengths[rank]):
            if signal_at == (rank, i):
                preemption._record(signal.SIGUSR2, None)
            done += 1
            poll.step()
        if signal_at == (rank, "after"):
            preemption._record(signal.SIGUSR2, None)
        poll.finish()
    except preemption.StopRequested:
        return "stopped", done
    return "done", done


def test_no_signal_every_rank_finishes_its_own_length():
    assert run_ranks(_uneven_loop, 3, ((7, 3, 5), None)) == [("done", 7), ("done", 3), ("done", 5)]
    assert run_ranks(_uneven_loop, 2, ((1, 0), None, 4)) == [("done", 1), ("done", 0)]  # no in-loop poll


def test_signal_mid_loop_stops_all_ranks_at_the_same_poll():
    # rank 1 is signalled before its 2nd iteration: the first poll (after 2 iterations) sees it
    assert run_ranks(_uneven_loop, 3, ((7, 3, 5), (1, 1))) == [("stopped", 2)] * 3


def test_signal_on_a_rank_that_already_finished_stops_the_others():
    # rank 1 (3 iterations) polls once while running, then answers from finish(): round 2 raises
    assert run_ranks(_uneven_loop, 3, ((7, 3, 5), (1, "after"))) == [("stopped", 4), ("stopped", 3),
                                                                     ("stopped", 4)]


class _Loader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for i in range(self.batches):
            yield torch.randn(2, 3), [f"k{i}a", f"k{i}b"], None

    def __len__(self):
        return self.batches


def test_extract_stops_on_the_signal_and_removes_its_memmap(tmp_path):
    preemption.reset()
    cfg_cluster = SimpleNamespace(memmap_gb=0.0, memmap_dir=str(tmp_path))  # force the disk buffer
    feats, keys, _ = extract_features(torch.nn.Linear(3, 4), _Loader(5), 10, 4, torch.device("cpu"),
                                      cfg_cluster, poll=preemption.UnevenLoopPoll(every=2))
    assert feats.shape == (10, 4) and len(keys) == 10  # single process: the poll is local
    preemption._record(signal.SIGUSR2, None)
    try:
        with pytest.raises(preemption.StopRequested):
            extract_features(torch.nn.Linear(3, 4), _Loader(5), 10, 4, torch.device("cpu"), cfg_cluster,
                             tag="stopped", poll=preemption.UnevenLoopPoll(every=2))
    finally:
        preemption.reset()
    assert not list(tmp_path.glob("*stopped*"))


class _SignalAtKmeans:
    """A metrics logger that records the signal on one rank when it logs a given k-means iteration
    (level 1: every rank iterates together; level 2: ranks own different super-clusters)."""

    def __init__(self, rank, at):
        self.rank, self.at, self.iterations = rank, at, []

    def event(self, kind, **fields):
        if kind == "kmeans" and "iteration" in fields:
            self.iterations.append((fields["level"], fields["super"], fields["iteration"]))
            if self.at is not None and self.at == (self.rank, fields["level"], fields["iteration"]):
                preemption._record(signal.SIGUSR2, None)


def _cluster_with_signal(rank, world, at, run_dir):
    from dist_cluster.cluster.stage import round_dir, run_clustering
    from dist_cluster.config import ClusterConfig
    preemption.reset()
    gen = torch.Generator().manual_seed(rank)
    feats = torch.randn(60 + 20 * rank, 8, generator=gen)
    keys = [f"r{rank}_{i}" for i in range(len(feats))]
    cfg = ClusterConfig(k=12, m=3, pca_dim=4, niter=4, memmap_dir=str(run_dir))
    logger = _SignalAtKmeans(rank, at)
    try:
        run_clustering(feats, keys, cfg, 0, run_dir, logger, seed=0, device=torch.device("cpu"),
                       poll=preemption.UnevenLoopPoll(every=1))
        outcome = "done"
    except preemption.StopRequested:
        outcome = "stopped"
    finally:
        preemption.reset()
    return outcome, logger.iterations, (round_dir(run_dir, 0) / "sizes.json").exists()


def _three_scenarios(rank, world, run_dir):
    return [_cluster_with_signal(rank, world, at, run_dir / name)
            for name, at in (("level1", (1, 1, 1)), ("level2", (0, 2, 0)), ("none", None))]


def test_signal_during_clustering_stops_every_rank_at_the_same_poll(tmp_path):
    """A USR2 in k-means (minutes at scale) used to wait for the first training step, past any
    signal delay. Now every rank stops together, in level 1 or in the uneven level 2, and a run
    without a signal is unaffected (one 3-rank start-up for the three scenarios)."""
    level1, level2, none = zip(*run_ranks(_three_scenarios, 3, (tmp_path,)))
    for results in (level1, level2):
        assert [r[0] for r in results] == ["stopped"] * 3
        assert not any(r[2] for r in results)  # no round files: the round is redone on resume
    # level 1 is iterated by all ranks together: all stop after the iteration that saw the signal
    assert {len(r[1]) for r in level1} == {2}
    assert all(len(r[1]) > 4 and any(level == 2 for level, _, _ in r[1]) for r in level2)
    assert [r[0] for r in none] == ["done"] * 3 and all(r[2] for r in none)


def test_the_message_names_the_checkpoint_only_when_there_is_one(tmp_path):
    preemption.reset()
    last = tmp_path / "checkpoints" / "last.pt"
    held = str(preemption.Preempted(12, last))
    assert held == f"preempted by SIGUSR2 at step 12; {last} holds this step: the same command resumes"
    fresh = str(preemption.Preempted(0, None))  # stopped in round 0's EXTRACT/CLUSTER of a new run
    assert fresh == "preempted by SIGUSR2 at step 0; no checkpoint yet: the run restarts from the beginning"


def test_marker_is_written_then_cleared(tmp_path):
    import json
    preemption.reset()
    path = preemption.write_marker(tmp_path, preemption.Preempted(7, tmp_path / "last.pt"), world_size=4)
    assert json.loads(path.read_text()) | {"time": 0} == {
        "step": 7, "signal": "SIGUSR2", "checkpoint": str(tmp_path / "last.pt"), "exit_code": 75,
        "world_size": 4, "time": 0}
    preemption.clear_marker(tmp_path)
    preemption.clear_marker(tmp_path)  # none: nothing to do
    assert not path.exists()


def test_launcher_note_only_for_torchrun_in_slurm_without_forwarding():
    torchrun_in_slurm = {"TORCHELASTIC_RUN_ID": "x", "SLURM_JOB_ID": "1",
                         "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT"}
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2" in preemption.launcher_note(torchrun_in_slurm)
    forwarding = dict(torchrun_in_slurm, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM, SIGUSR2")
    assert preemption.launcher_note(forwarding) is None
    assert preemption.launcher_note({"TORCHELASTIC_RUN_ID": "x"}) is None  # a workstation: no SLURM signal
    assert preemption.launcher_note({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}) is None  # srun, one task per GPU
