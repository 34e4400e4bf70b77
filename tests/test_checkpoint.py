"""Checkpoint integrity: every file checked against its checksum on load, a bad or missing one makes
every rank fall back to the newest step good on all ranks (saying which), a full disk gives one
clear error and leaves no partial file.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_checkpoint.py
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_cluster.checkpoint import durable, store
from tests.ci import skip_unless_ci
from tests.dist_utils import run_ranks
from tests.test_rounds import small_run_config

ROOT = Path(__file__).resolve().parents[1]
DAMAGES = ("truncated", "zero_bytes", "flipped_4k", "no_checksum", "missing")
REASONS = {"truncated": "checksum mismatch", "zero_bytes": "empty (0 bytes)", "flipped_4k": "checksum mismatch",
           "no_checksum": "save did not finish", "missing": "missing"}


def _shared(g):
    return {"w": torch.full((4096,), float(g)), "progress": {"global_step": g}, "config": "seed: 0\n"}


def _save(run_dir, steps, round_at=None):
    """Saves steps in order, the one equal to round_at with round copy 0 (what a round end does)."""
    rank = store.distributed.rank()
    for g in steps:
        store.save(run_dir, _shared(g), {"h": torch.full((1024,), 100.0 * rank + g)}, g,
                        round_copy=0 if g == round_at else None)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "zero_bytes":
        path.write_bytes(b"")
    elif how == "flipped_4k":  # 4 KB in the middle: tensor data, the zip structure intact
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 4096]) + data[mid + 4096:])
    elif how == "no_checksum":  # killed between the rename and the checksum
        store.checksum_file(path).unlink()
    elif how == "missing":
        path.unlink()


def _summary(loaded):
    h = None if loaded.per_rank is None else float(loaded.per_rank["h"][0])
    return float(loaded.shared["w"][0]), h, loaded.path.name, loaded.rejected


def _damaged_newest(rank, world, tmp):
    """For each damage, to the shared file or the last rank's own file of the newest step: load."""
    from dist_cluster.runtime import comm
    out = {}
    for how in DAMAGES:
        for whose in ("shared", f"rank{world - 1}"):
            run_dir = tmp / f"{how}-{whose}"
            _save(run_dir, [10, 20])
            comm.barrier()
            if rank == 0:
                damage(run_dir / "checkpoints" / f"{whose}.step20.pt", how)
            comm.barrier()
            out[how, whose] = _summary(store.load(run_dir))
    untouched = tmp / "untouched"
    _save(untouched, [10, 20])
    out["untouched"] = _summary(store.load(untouched))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_a_damaged_newest_step_falls_back_to_the_previous_on_every_rank(world, tmp_path):
    results = run_ranks(_damaged_newest, world, (tmp_path,), timeout=240)
    for rank, seen in enumerate(results):
        assert seen["untouched"] == (20.0, 100.0 * rank + 20, "shared.step20.pt", [])
        for how in DAMAGES:
            for whose in ("shared", f"rank{world - 1}"):
                w, h, used, rejected = seen[how, whose]
                assert (w, h, used) == (10.0, 100.0 * rank + 10, "shared.step10.pt"), (how, whose)
                (why,) = rejected  # names the step, the rank, the file and the reason
                owner = 0 if whose == "shared" else world - 1
                assert why.startswith(f"step 20: rank {owner}: {whose}.step20.pt: ") and REASONS[how] in why


def _nothing_good(rank, world, tmp):
    from dist_cluster.runtime import comm
    run_dir = tmp / "run"
    _save(run_dir, [10, 20], round_at=10)
    comm.barrier()
    if rank == 0:
        damage(run_dir / "checkpoints" / "shared.step20.pt", "flipped_4k")
        damage(run_dir / "checkpoints" / f"rank{world - 1}.step10.pt", "truncated")
    comm.barrier()
    try:
        store.load(run_dir)
        refused = None
    except store.CheckpointError as err:
        refused = str(err)
    return refused, _summary(store.load(run_dir, round_fallback=True))


def test_without_a_good_step_only_a_caller_with_fresh_heads_takes_the_round_copy(tmp_path):
    for rank, (refused, (w, h, used, rejected)) in enumerate(run_ranks(_nothing_good, 2, (tmp_path,))):
        assert "no usable checkpoint" in refused and "shared.step20.pt: checksum mismatch" in refused
        assert "rank 1: rank1.step10.pt: checksum mismatch" in refused and "round_0.pt: a round copy" in refused
        assert (w, h, used) == (10.0, None, "round_0.pt") and len(rejected) == 2


def test_files_checksums_and_what_is_kept(tmp_path):
    """One process, no process group: the layout, `sha256sum -c`, the two newest steps kept."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "rank0.step5.pt.tmp").write_bytes(b"left by a kill -9")
    _save(tmp_path, [10, 20, 30], round_at=20)
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.pt", "rank0.step20.pt", "rank0.step20.pt.sha256", "rank0.step30.pt", "rank0.step30.pt.sha256",
        "round_0.pt", "round_0.pt.sha256", "shared.step20.pt", "shared.step20.pt.sha256", "shared.step30.pt",
        "shared.step30.pt.sha256"]
    assert os.readlink(folder / "last.pt") == "shared.step30.pt"
    assert float(torch.load(folder / "round_0.pt", weights_only=True)["w"][0]) == 20.0
    if shutil.which("sha256sum"):
        sums = [p.name for p in folder.glob("*.sha256")]
        subprocess.run(["sha256sum", "--quiet", "-c", *sums], cwd=folder, check=True)
    _save(tmp_path, [30])  # the same step again (a round end, then the next round's start)
    assert store.load(tmp_path).path.name == "shared.step30.pt"


def _fail_with_enospc(monkeypatch, where: str, after: int = 2048):
    """The writer (or fsync) raises ENOSPC, as a full disk does, once `after` bytes went out."""
    if where == "fsync":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(durable.os, "fsync", fsync)
        return
    write = durable._HashingWriter.write

    def limited(self, data):
        if where in self.f.name and self.nbytes + len(memoryview(data)) > after:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return write(self, data)
    monkeypatch.setattr(durable._HashingWriter, "write", limited)


@pytest.mark.parametrize("where", ["rank0", "shared", "fsync"])
def test_a_full_disk_gives_one_clear_error_and_no_partial_file(where, tmp_path, monkeypatch):
    _save(tmp_path, [10])
    folder = tmp_path / "checkpoints"
    before = sorted(p.name for p in folder.iterdir() if not p.name.startswith("rank0.step20"))
    with monkeypatch.context() as patch:
        _fail_with_enospc(patch, where)
        with pytest.raises(store.CheckpointWriteError) as err:
            _save(tmp_path, [20])
    message = str(err.value)
    assert message.startswith(f"checkpoint not saved: no space left in {folder} for ")
    assert "MiB needed" in message and "previous checkpoint is intact" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # not torch's traceback
    assert not list(folder.glob("*.tmp"))
    after = sorted(p.name for p in folder.iterdir() if not p.name.startswith("rank0.step20"))
    assert after == before and os.readlink(folder / "last.pt") == "shared.step10.pt"
    assert store.load(tmp_path).path.name == "shared.step10.pt"
    _save(tmp_path, [25])  # the run goes on: step 10 stays the fallback, with its rank file
    damage(folder / "rank0.step25.pt", "flipped_4k")
    assert store.load(tmp_path).path.name == "shared.step10.pt"


def test_a_checkpoint_from_before_checksums_still_loads(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({**_shared(7), "global_step": 7, "world_size": 1}, folder / "last.pt")
    torch.save({"h": torch.ones(3), "global_step": 7}, folder / "rank0.step7.pt")
    assert _summary(store.load(tmp_path)) == (7.0, 1.0, "last.pt", [])
    assert "written before checksums" in capsys.readouterr().out
    _save(tmp_path, [8])  # the next save moves the run to the new layout
    assert store.load(tmp_path).path.name == "shared.step8.pt"


TMPFS_SCRIPT = """
import json, sys, torch
from pathlib import Path
from dist_cluster.checkpoint import store
run_dir = Path(sys.argv[1])
store.save(run_dir, {"w": torch.zeros(1000)}, {"h": torch.zeros(100)}, 10)
try:
    store.save(run_dir, {"w": torch.zeros(200_000)}, {"h": torch.zeros(100)}, 20)
    error = None
except store.CheckpointWriteError as err:
    error = str(err)
print(json.dumps({"error": error, "files": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
                  "loaded": store.load(run_dir).path.name}))
"""


def test_a_full_tmpfs(tmp_path):
    """A real full filesystem: a 256 KB tmpfs, mounted in a private mount namespace (unshare -rm),
    so that nothing outlives the test; skipped where namespaces are not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    script = f"mount -t tmpfs -o size=256k tmpfs {mount} || exit 77; exec {sys.executable} -c \"$0\" {mount}"
    try:
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, TMPFS_SCRIPT], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    except FileNotFoundError:
        skip_unless_ci("no unshare (util-linux)")
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        skip_unless_ci(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"].startswith(f"checkpoint not saved: no space left in {mount / 'checkpoints'} for ")
    assert not [f for f in result["files"] if f.endswith(".tmp")] and "shared.step20.pt" not in result["files"]
    assert result["loaded"] == "shared.step10.pt"


# ---------------------------------------------------------------- through rounds.Run


def _config(mode, run_dir, shards, epochs):
    return small_run_config(mode, run_dir, shards, epochs, ckpt_every_steps=1)


def _kept_steps(run_dir) -> list[int]:
    return sorted(int(p.name.split("step")[1][:-3]) for p in (run_dir / "checkpoints").glob("shared.step*.pt"))


def _runs_after_damage(rank, world, tmp, shards):
    from dist_cluster.run.rounds import Run
    from dist_cluster.runtime.logger import read_metrics
    out = {}
    run_dir = tmp / "deepercluster"
    cfg = _config("deepercluster", run_dir, shards, 2)
    Run(cfg).run()  # 2 rounds x 3 steps; every step saved
    prev, last = _kept_steps(run_dir)
    damage(run_dir / "checkpoints" / f"shared.step{last}.pt", "flipped_4k")
    Run(cfg).run()
    losses = [(e["step"], e["loss_super"], e["loss_sub"]) for e in read_metrics(run_dir, "train")]
    out["prev_step"] = read_metrics(run_dir, "checkpoint_fallback")[0], prev, last, losses
    for g in _kept_steps(run_dir):  # now neither step can be used, nor the copy of the last round
        damage(run_dir / "checkpoints" / f"rank0.step{g}.pt", "truncated")
    damage(run_dir / "checkpoints" / "round_1.pt", "zero_bytes")
    Run(cfg).run()
    out["round_copy"] = read_metrics(run_dir, "checkpoint_fallback")[-1], read_metrics(run_dir, "resume")[-1], \
        len(read_metrics(run_dir, "done"))
    rotnet = tmp / "rotnet"
    Run(_config("rotnet", rotnet, shards, 1)).run()
    for g in _kept_steps(rotnet):
        damage(rotnet / "checkpoints" / f"shared.step{g}.pt", "missing")
    try:
        Run(_config("rotnet", rotnet, shards, 1)).run()
    except store.CheckpointError as err:
        out["rotnet"] = str(err)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.shard_fixtures import make_shards
    return make_shards(tmp_path_factory.mktemp("shards"), 2, 96, size=28).root


def test_a_run_resumes_from_the_newest_good_checkpoint_and_logs_which(shards, tmp_path):
    out = run_ranks(_runs_after_damage, 1, (tmp_path, shards), timeout=300)[0]
    event, prev, last, losses = out["prev_step"]
    assert event["used"] == f"shared.step{prev}.pt" and event["round_copy"] is False
    assert event["rejected"] == [f"step {last}: rank 0: shared.step{last}.pt: checksum mismatch (" +
                                 event["rejected"][0].split("(", 1)[1]]
    again = [loss for step, *loss in losses if step == last]
    assert len(again) == 2 and again[0] == again[1]  # the redone step, exactly as the first time
    event, resumed, done = out["round_copy"]
    assert event["used"] == "round_0.pt" and event["round_copy"] is True and "round_1.pt: empty" in str(event)
    assert (resumed["round"], resumed["phase"], done) == (1, "cluster", 3)  # round 1 redone, run finished
    assert "round_0.pt: a round copy has no rank files" in out["rotnet"]  # its classifier carries over
