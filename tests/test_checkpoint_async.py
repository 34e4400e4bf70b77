"""Background checkpoint writes (checkpoint/writer.py): save() returns once the state is copied, training
(collectives included) goes on while a thread writes, the next save waits for that write, and
last.pt only ever names a step whose files are complete on every rank, whenever a kill comes.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_checkpoint_async.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dist_cluster.checkpoint import store
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
HOLD_S = 1.5  # how long the slow rank's write is held


def _records(rank: int, g: int):
    shared = {"w": torch.full((4096,), float(g)), "progress": {"global_step": g}, "config": "seed: 0\n"}
    return (shared if rank == 0 else None), {"h": torch.full((1024,), 100.0 * rank + g)}


def _last(run_dir) -> str:
    return os.readlink(store.ckpt_dir(run_dir) / "last.pt")


def _hold_writes_of_step(step: int, release: threading.Event) -> None:
    """This rank's write of `step` waits for `release` before its first file (as a slow disk)."""
    original = store.write_checked

    def held(obj, path):
        if f"step{step}." in path.name:
            release.wait()
        return original(obj, path)
    store.write_checked = held


def _slow_rank(rank, world, tmp):
    """Rank 1's write of step 20 is held; what each rank sees meanwhile, and when save 30 returns."""
    from dist_cluster.checkpoint.writer import CheckpointWriter
    from dist_cluster.runtime import comm
    from dist_cluster.runtime.logger import MetricLogger
    run_dir, seen = tmp / "run", {}
    writer = CheckpointWriter(run_dir, background=True, logger=MetricLogger(run_dir, tensorboard=False))
    writer.save(*_records(rank, 10), 10)
    release = threading.Event()
    if rank == 1:
        _hold_writes_of_step(20, release)
    start = time.perf_counter()
    writer.save(*_records(rank, 20), 20)
    seen["save_returned_s"] = time.perf_counter() - start  # only step 10 was published in it
    # training goes on: its collectives run while the write is pending (a tensor changed after the
    # copy does not reach the file either)
    seen["all_reduce"] = float(comm.all_reduce(torch.ones(1))[0])
    if rank == 0:
        writer.join()  # rank 0's own files of step 20 are complete, rank 1's are not even started
        folder = store.ckpt_dir(run_dir)
        seen["rank0_done"] = store.verify(folder / "shared.step20.pt") is None
        seen["last_while_pending"] = _last(run_dir)
    comm.barrier()
    # a kill now would resume from step 10: step 20 is incomplete on rank 1 (load is what a restart runs)
    loaded = store.load(run_dir)
    seen["loaded_while_pending"] = loaded.path.name, loaded.rejected
    if rank == 1:
        threading.Timer(HOLD_S, release.set).start()
    start = time.perf_counter()
    writer.save(*_records(rank, 30), 30)  # waits for step 20 on every rank, publishes it, then goes on
    seen["next_save_s"] = time.perf_counter() - start
    seen["last_after_next_save"] = _last(run_dir)
    writer.wait()
    seen["last_at_the_end"] = _last(run_dir)
    seen["files"] = sorted(p.name for p in store.ckpt_dir(run_dir).iterdir())
    return seen


def test_the_training_thread_goes_on_and_the_next_save_waits_for_the_slowest_rank(tmp_path):
    results = run_ranks(_slow_rank, 2, (tmp_path,), timeout=240)
    for rank, seen in enumerate(results):
        assert seen["save_returned_s"] < HOLD_S and seen["all_reduce"] == 2.0
        assert seen["loaded_while_pending"][0] == "shared.step10.pt"
        assert "step 20: rank 1: rank1.step20.pt: missing" in seen["loaded_while_pending"][1][0]
        assert seen["next_save_s"] >= HOLD_S * 0.8, seen  # held by rank 1's write (the timer started just before)
        assert seen["last_after_next_save"] == "shared.step20.pt" and seen["last_at_the_end"] == "shared.step30.pt"
        assert [f for f in seen["files"] if f.startswith(f"rank{rank}.") and not f.endswith("sha256")] == [
            f"rank{rank}.step20.pt", f"rank{rank}.step30.pt"]
    assert results[0]["rank0_done"] and results[0]["last_while_pending"] == "shared.step10.pt"
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {e["step"]: e for e in events if e["stage"] == "checkpoint"}
    assert sorted(by_step) == [10, 20, 30] and all(e["background"] for e in by_step.values())
    assert by_step[20]["wait_s"] >= HOLD_S * 0.8 > by_step[10]["wait_s"]  # rank 1 waited for its write


KILL_SCRIPT = """
import os, sys, time, torch
from pathlib import Path
from dist_cluster.checkpoint import store, durable
from dist_cluster.checkpoint.writer import CheckpointWriter
run_dir, published = Path(sys.argv[1]), sys.argv[2] == "published"
writer = CheckpointWriter(run_dir)
record = lambda g: ({"w": torch.full((300_000,), float(g)), "config": "seed: 0\\n"}, {"h": torch.full((10,), float(g))})
writer.save(*record(10), 10)
if not published:  # the write of step 20 stops half way through its shared file, as a slow disk
    original = durable._HashingWriter.write
    def write(self, data):
        if "shared.step20" in self.f.name and self.nbytes > 500_000:
            print("half written", flush=True)
            time.sleep(600)
        return original(self, data)
    durable._HashingWriter.write = write
writer.save(*record(20), 20)  # publishes 10, returns while 20 is written
print("save returned", flush=True)
if published:
    writer.join()  # every file of step 20 written, not yet published
    print("written, not published", flush=True)
for _ in range(600):  # training goes on until the kill
    torch.randn(100, 100) @ torch.randn(100, 100)
    time.sleep(0.1)
"""


def _kill_during(run_dir: Path, phase: str, marker: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run_dir), phase], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines, wanted = [], {marker, "save returned"}  # the two threads print in either order
    try:
        while wanted and (line := proc.stdout.readline()):
            lines.append(line)
            wanted -= {w for w in wanted if w in line}
        assert not wanted, "".join(lines)[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_a_kill_during_or_after_a_background_write_leaves_last_pt_on_a_complete_step(tmp_path):
    """kill -9 while step 20's shared file is half written: last.pt names step 10, complete, and a
    restart resumes there. kill -9 once step 20 is written but before it is published: last.pt
    still names step 10 (complete), and a restart takes step 20, complete on every rank."""
    for phase, marker, resumed in (("half", "half written", 10), ("published", "written, not published", 20)):
        run_dir = tmp_path / phase
        _kill_during(run_dir, phase, marker)  # "save returned" too: training went on meanwhile
        folder = store.ckpt_dir(run_dir)
        assert _last(run_dir) == "shared.step10.pt"
        assert store.verify(folder / "shared.step10.pt") is None
        assert store.verify(folder / "rank0.step10.pt") is None
        loaded = store.load(run_dir)
        assert loaded.path.name == f"shared.step{resumed}.pt" and float(loaded.shared["w"][0]) == resumed
        if phase == "half":
            assert (folder / "shared.step20.pt.tmp").exists() and not (folder / "shared.step20.pt").exists()
            assert not loaded.rejected  # only rank files (and a tmp) of step 20: not a step yet
            store.save(run_dir, {"w": torch.zeros(3), "config": ""}, {"h": torch.zeros(1)}, 30)
            assert not list(folder.glob("*.tmp"))  # the next save clears what the kill left


def _same_step_again(rank, world, tmp):
    """A step saved again (an epoch's end, then its round's): while its files are rewritten, last.pt
    names the fallback, never the step being replaced."""
    from dist_cluster.checkpoint.writer import CheckpointWriter
    run_dir, release = tmp / "run", threading.Event()
    writer = CheckpointWriter(run_dir)
    for g in (10, 20):
        writer.save(*_records(rank, g), g)
    writer.wait()
    _hold_writes_of_step(20, release)
    writer.save(*_records(rank, 20), 20, round_copy=0)
    during = _last(run_dir)
    release.set()
    writer.wait()
    return during, _last(run_dir), (store.ckpt_dir(run_dir) / "round_0.pt").exists()


def test_a_step_saved_again_moves_last_pt_to_the_fallback_while_rewritten(tmp_path):
    for during, after, round_copy in run_ranks(_same_step_again, 2, (tmp_path,), timeout=180):
        assert (during, after, round_copy) == ("shared.step10.pt", "shared.step20.pt", True)


def test_inline_saves_are_published_when_save_returns(tmp_path):
    """train.async_checkpoint=false: no copy, no thread; the step is last.pt when save() returns."""
    from dist_cluster.checkpoint.writer import CheckpointWriter
    from dist_cluster.runtime.logger import MetricLogger, read_metrics
    writer = CheckpointWriter(tmp_path, background=False, logger=MetricLogger(tmp_path, tensorboard=False))
    for g in (10, 20):
        writer.save(*_records(0, g), g)
        assert _last(tmp_path) == f"shared.step{g}.pt" and not writer.pending
    events = read_metrics(tmp_path, "checkpoint")
    assert [(e["step"], e["background"], e["copy_s"]) for e in events] == [(10, False, 0.0), (20, False, 0.0)]
