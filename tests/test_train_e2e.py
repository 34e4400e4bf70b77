"""End to end through the real launcher: torchrun, 2 CPU ranks, shards built here (1200 grayscale
28 px PNGs in 10 visual classes, tests/shard_fixtures.make_class_shards: nothing to install, so
these checks run wherever the suite runs, CI included, instead of skipping without a dataset).

- 2 rounds run: every stage logged, every image labelled exactly once on its own rank, export written.
- kill -9 mid-run (torchrun and every rank), same command again: the resumed run logs the same
  losses at the same steps as an uninterrupted one.
- USR2 to one rank (SLURM's preemption notice): both ranks save the step they are in and exit 75;
  the same command resumes at that very step, with no step done twice.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_cluster.config import load_config
from dist_cluster.data.manifest import load_manifest
from dist_cluster.plan.planner import predicted_smoke
from dist_cluster.runtime.logger import read_metrics
from tests.shard_fixtures import make_class_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """configs/smoke.yaml's data: 2 ranks x max_samples=600, 8 shards (2 ranks x 1 worker read them)."""
    out = tmp_path_factory.mktemp("data") / "smoke"
    make_class_shards(out, num_shards=8, per_shard=150)
    return out


def torchrun_cmd(run_dir, shards, *overrides):
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc_per_node", "2", "launch/train.py",
            "--config", "configs/smoke.yaml", f"run_dir={run_dir}", f"data.train={shards}", *overrides]


def run_train(run_dir, shards, *overrides, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun_cmd(run_dir, shards, *overrides), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses_by_step(run_dir):
    """The last logged loss of each step (a resumed run logs the replayed steps again)."""
    return {e["step"]: (e["loss_super"], e["loss_sub"]) for e in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def smoke_run(shards, tmp_path_factory):
    """configs/smoke.yaml as the benchmarks run it: 2 rounds on 2 ranks."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    run_train(run_dir, shards)
    return run_dir


def test_two_rounds_end_to_end(shards, smoke_run):
    run_dir = smoke_run
    stages = {e["stage"] for e in read_metrics(run_dir)}
    assert {"extract", "pca", "kmeans", "train", "epoch", "done"} <= stages
    assert (run_dir / "config.yaml").exists() and list((run_dir / "export").iterdir())
    all_keys = set()
    for path in sorted((run_dir / "clusters" / "round_1").glob("assignments.rank*.npz")):
        part = np.load(path)
        assert len(set(part["keys"].tolist()) & all_keys) == 0  # disjoint across ranks
        all_keys |= set(part["keys"].tolist())
        assert (part["sub"] // (16 // 2) == part["super"]).all()  # each sub-cluster inside its super
    assert len(all_keys) == load_manifest(shards).num_samples == 1200
    for e in read_metrics(run_dir, "train"):
        assert np.isfinite(e["loss_super"]) and np.isfinite(e["loss_sub"])


def test_planner_agrees_with_the_smoke_run(shards, smoke_run):
    """What `python -m dist_cluster.plan` predicts for this config is what the run measured/wrote:
    memory (features per rank), storage (centroids, checkpoint), steps, rounds, and traffic."""
    cfg = load_config(str(ROOT / "configs" / "smoke.yaml"), [f"data.train={shards}"])
    predicted = predicted_smoke(cfg, 2, load_manifest(shards).num_samples)
    extracts = read_metrics(smoke_run, "extract")
    assert predicted["rounds"] == len(extracts) == 2
    assert predicted["steps_per_epoch"] == read_metrics(smoke_run, "epoch")[0]["steps"]
    assert predicted["features_bytes_per_rank"] == extracts[0]["features_bytes_rank0"]
    clusters = smoke_run / "clusters" / "round_0"
    npy_header = 128
    assert (clusters / "centroids_super.npy").stat().st_size == predicted["centroids_super_bytes"] + npy_header
    for path in clusters.glob("centroids_sub.*.npy"):
        assert path.stat().st_size == predicted["centroids_sub_bytes_each"] + npy_header
    # last.pt: trunk + super head weights and their SGD momentum (+ BN buffers and pickling overhead)
    last = (smoke_run / "checkpoints" / "last.pt").stat().st_size
    assert predicted["checkpoint_replicated_bytes"] <= last <= 1.15 * predicted["checkpoint_replicated_bytes"]
    # traffic, measured on the wire (loopback bytes per rank): DDP's gradient all_reduce dominates a
    # step; a clustering round is PCA moments + k-means sums + the routed rows + the labels returned
    for epoch in read_metrics(smoke_run, "epoch"):
        measured = epoch["loopback_bytes_per_rank_step"]
        assert 0.98 <= measured / predicted["train_net_bytes_per_step"] <= 1.05, (measured, predicted)
    for traffic in read_metrics(smoke_run, "traffic"):  # small messages: TCP/gloo headers weigh more
        measured = traffic["loopback_bytes_per_rank"]
        assert 0.9 <= measured / predicted["cluster_net_bytes_per_rank_round"] <= 1.25, (measured, predicted)


SETTINGS = ("train.epochs=3", "train.reassign=2", "train.ckpt_every_steps=4", "train.log_every_steps=1")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run (3 epochs, 2 rounds) to compare the interrupted ones with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(run_dir, shards, *SETTINGS)
    return losses_by_step(run_dir)


def start_and_kill_at(run_dir, shards, step, kill, *torchrun_args, overrides=()):
    """Start a run, wait until it logged `step`, then kill(proc); return once torchrun exited."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_cmd(run_dir, shards, *SETTINGS, *overrides)
    cmd[1:1] = list(torchrun_args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill once past a mid-epoch checkpoint
        steps = [e["step"] for e in read_metrics(run_dir, "train")]
        if steps and max(steps) >= step:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill(proc)
    output, _ = proc.communicate(timeout=240)
    return proc.returncode, output


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, children) for d in [c, *descendants(c)]]


def kill_everything(proc) -> None:
    """kill -9 the job: torchrun and every process under it (ranks run in sessions of their own)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_same_losses(run_dir, expected):
    got = losses_by_step(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        np.testing.assert_allclose(got[step], expected[step], rtol=1e-4, atol=1e-5, err_msg=f"step {step}")


def test_kill_and_resume_matches_uninterrupted(shards, tmp_path, reference):
    run_dir = tmp_path / "resumed"
    start_and_kill_at(run_dir, shards, 14, kill_everything)
    assert max(e["step"] for e in read_metrics(run_dir, "train")) < 27  # really interrupted (3 x 9 steps)
    run_train(run_dir, shards, *SETTINGS)  # the same command again resumes
    assert_same_losses(run_dir, reference)


def signal_one_rank(proc) -> None:
    """USR2 to rank processes only (torchrun's children), and to one of them: SLURM signals
    every task, but not at the same instant."""
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[-1]), signal.SIGUSR2)


def test_preemption_signal_saves_the_current_step_and_resumes_there(shards, tmp_path, reference):
    run_dir = tmp_path / "preempted"
    no_periodic = ("train.ckpt_every_steps=0",)  # only the signal can explain a mid-epoch checkpoint
    code, output = start_and_kill_at(run_dir, shards, 12, signal_one_rank, overrides=no_periodic)
    assert code != 0 and "preempted by SIGUSR2 at step" in output, output[-3000:]
    (stop,) = read_metrics(run_dir, "preempted")
    assert 12 <= stop["step"] < 27 and 0 <= stop["epoch_step"] < 9
    import torch
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["global_step"] == stop["step"] == last["progress"]["global_step"]
    run_train(run_dir, shards, *SETTINGS, *no_periodic)
    (resumed,) = read_metrics(run_dir, "resume")
    assert resumed["step"] == stop["step"]
    steps = [e["step"] for e in read_metrics(run_dir, "train")]
    assert len(steps) == len(set(steps)), "a step was done twice"
    assert_same_losses(run_dir, reference)
