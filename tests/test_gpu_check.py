"""scripts/gpu_check.sh without a GPU: the dry run, the GPU tests rehearsed on CPU, the time limits
and the deadline, the 2-rank kill/resume steps, and (-m slow) the whole check rehearsed on CPU under
the GPU machine's limits (540 s, at most 8 files back, every process of every step gone at the end).

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from scripts.gpu_steps import STEPS, Ctx, StepTimeout
from tests.processes import alive_tagged
from tests.test_packaging import gpu_pins, norm

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = {"name", "what", "status", "expect_s", "limit_s", "seconds", "numbers", "checks", "reason", "tail"}
STATUSES = {"ok", "failed", "timeout", "skipped", "error"}
MAX_FILES = 8  # the device tool returns at most 8 files from $OUT


def _dry_run(wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_WHEELS_DIR": str(wheels), "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _check(out: Path, work: Path, *args: str, timeout: float = 700) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--work", str(work), *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    return run, json.loads((out / "gpu_check.json").read_text())


def _assert_schema(record: dict, out: Path) -> None:
    assert record["schema"] == "dist_cluster.gpu_check/1" and record["status"] == "complete"
    assert {"python", "torch", "cuda_available"} <= set(record["env"])
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(record["files"]) and len(files) <= MAX_FILES
    assert all(p.stat().st_size < 16 << 20 for p in files)
    for entry in record["steps"]:
        assert set(entry) == STEP_KEYS and entry["status"] in STATUSES, entry
        assert entry["status"] != "skipped" or "left before the deadline" in entry["reason"]
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    ran = [e["name"] for e in record["steps"] if e["status"] != "skipped"]
    assert all(any(Path(n).name.startswith(f"{step}_") for n in names) for step in ran), names


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and int(entry.name) != os.getpid() and text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_dry_run_lists_the_steps_and_checks_the_wheels(tmp_path):
    missing = _dry_run(tmp_path)
    assert missing.returncode == 1 and "PROBLEM: wheels" in missing.stdout, missing.stdout + missing.stderr
    for name, version in gpu_pins().items():  # --check reads names only: empty files stand in
        (tmp_path / f"{norm(name).replace('-', '_')}-{version}-py3-none-any.whl").touch()
    ok = _dry_run(tmp_path)
    assert ok.returncode == 0 and "dry run: ok" in ok.stdout, ok.stdout + ok.stderr
    lines = [line.split()[0] for line in ok.stdout.splitlines() if line.startswith("  ")]
    assert lines == [step.name for step in STEPS]  # in order of value, compile last
    assert "returns 8 files at most" in ok.stdout


def test_gpu_tests_are_collected_and_skip_cleanly_without_cuda():
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and "skipped" in last and "failed" not in last, run.stdout[-2000:]
    assert int(last.split()[0]) >= 10 and "needs CUDA" in run.stdout


def test_gpu_tests_rehearsed_on_cpu_pass():
    """tests/test_gpu.py's code paths on CPU (gloo at world size 1): a test that would break on its
    first GPU run for a reason CPU shares (a config built by hand that lacks a key) breaks here."""
    env = {**os.environ, "DIST_CLUSTER_GPU_TESTS_DEVICE": "cpu"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                          "tests/test_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and "failed" not in last and int(last.split()[0]) >= 8, run.stdout[-3000:]


def test_a_step_past_its_limit_is_killed_with_its_whole_tree(tmp_path):
    """A child in a session of its own (as torchrun starts its ranks) dies with the step."""
    ctx = Ctx(tmp_path, tmp_path / "logs", "cpu", time.monotonic() + 60)
    ctx.begin("hang", 2.0)
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(300)'], start_new_session=True); print('started', flush=True); time.sleep(300)")
    start = time.monotonic()
    with pytest.raises(StepTimeout):
        ctx.run([sys.executable, "-c", script], "hang")
    assert time.monotonic() - start < 15
    assert not alive_tagged(ctx.tokens[-1]) and "started" in ctx.tail(100)


def test_no_time_left_skips_every_step_and_still_reports(tmp_path):
    run, record = _check(tmp_path / "out", tmp_path / "work", "--deadline", "3", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    _assert_schema(record, tmp_path / "out")
    assert [e["name"] for e in record["steps"]] == [s.name for s in STEPS]
    assert {e["status"] for e in record["steps"]} == {"skipped"}
    assert all(f"{s.name} " in run.stdout for s in STEPS)  # the console names each, skipped or not


def _check_kill_resume(step: dict, ranks: int, work: Path) -> None:
    """Exactly one done event, every logged loss equal to the uninterrupted run's, a real resume."""
    numbers = step["numbers"]
    assert step["status"] == "ok", step["reason"]
    assert numbers["max_abs_loss_diff"] == 0.0 and numbers["processes_killed"] >= ranks + 1
    assert numbers["resumed_from_step"] < numbers["paused_at_step"] and not numbers["steps_missing_in_reference"]
    assert all(step["checks"].values()) and len(step["checks"]) >= 6
    done = [line for line in (work / f"killed_{ranks}rank" / "metrics.jsonl").read_text().splitlines()
            if '"stage": "done"' in line]
    assert len(done) == 1


def test_two_rank_kill_resume_kills_every_worker_and_resumes_exactly(tmp_path):
    """The 2-rank steps of the check on CPU: torchrun's ranks (sessions of their own) and their loader
    workers are all killed, and the resumed run logs the uninterrupted run's losses step by step."""
    out, work = tmp_path / "out", tmp_path / "work"
    run, record = _check(out, work, "--only", "two_ranks,kill_resume_2")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    _assert_schema(record, out)
    steps = {e["name"]: e for e in record["steps"]}
    assert steps["two_ranks"]["status"] == "ok", steps["two_ranks"]["reason"]
    _check_kill_resume(steps["kill_resume_2"], 2, work)
    assert not _processes_mentioning(str(work))


@pytest.mark.slow
def test_the_whole_check_rehearsed_on_cpu_under_the_gpu_limits(tmp_path):
    """Every step under the GPU machine's limits (540 s, at most 8 files back, no process left);
    about 160 s on 2 free cores: bench territory, `bash scripts/test.sh -m slow`."""
    out, work = tmp_path / "out", tmp_path / "work"
    start = time.monotonic()
    run, record = _check(out, work)
    assert time.monotonic() - start < 560, "past the 540 s deadline"
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    _assert_schema(record, out)
    steps = {e["name"]: e for e in record["steps"]}
    assert all(e["status"] == "ok" for e in steps.values()), {n: e["reason"] for n, e in steps.items()}
    for name, ranks in (("kill_resume", 1), ("kill_resume_2", 2)):
        _check_kill_resume(steps[name], ranks, work)
    assert steps["pytest"]["numbers"]["failures"] == 0
    assert not _processes_mentioning(str(work))
