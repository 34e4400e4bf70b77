"""The one-call proof of the GPU path, under a hard deadline (run by scripts/gpu_check.sh).

On a lent GPU machine, through the device tool (its limits: 10 min a command, 15 min of device time
in all, machine start included; at most 8 files back from $OUT):

    run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
        # .whl/: webdataset, omegaconf, submitit, braceexpand (bash scripts/gpu_wheels.sh, here, first)

    bash scripts/gpu_check.sh --dry-run              # anywhere: the steps, their budgets, wheels, files
    python scripts/gpu_check.py --device cpu         # the whole check rehearsed on CPU (same limits)

Steps run in order of value (scripts/gpu_steps.py): first the cheapest proofs that the GPU path runs
at all, then the kill/resume and 2-rank checks, then k-means and training throughput, then memory,
then torch.compile. A step whose typical time (`expect_s`) no longer fits before the deadline
(--deadline, default 540 s from the shell's start) is skipped and reported so; a step that runs
past its own limit or the deadline is killed with its whole process tree (torchrun's ranks run in
sessions of their own: tests/processes.py finds them by an environment tag) and reported as
`timeout`. SIGTERM/SIGINT do the same for the step in flight and write what there is.

What comes back (2 files, rewritten after every step, so a cut-off call still returns them):
    $OUT/gpu_check.json        schema dist_cluster.gpu_check/1: per step status (ok | failed |
                               timeout | skipped | error), seconds, limit, numbers, checks, log tail
    $OUT/gpu_check_logs.tar.gz every step's full log, bench JSON, runs' metrics.jsonl (logs cut to
                               their last 2 MiB)
The console ends with one line per step (the device tool returns the last 12,000 characters).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.gpu_steps import STEPS, Ctx, StepFailed, StepTimeout  # noqa: E402

SCHEMA = "dist_cluster.gpu_check/1"
STATUSES = ("ok", "failed", "timeout", "skipped", "error", "pending")
JSON_NAME, TAR_NAME = "gpu_check.json", "gpu_check_logs.tar.gz"
MAX_FILES = 8  # the device tool returns at most 8 files from $OUT
TAIL_CHARS = 2000  # of a step's log, in the JSON
LOG_KEEP_BYTES = 2 << 20  # of each file in the tarball (the tool's limit: 16 MiB a file)
MARGIN_S = 8.0  # kept back from the deadline: kill, tar and write after the last step


class Check:
    """The state of one call: the record written to $OUT after every step."""

    def __init__(self, out: Path, work: Path, device: str, deadline_s: float, started_at: float):
        self.out, self.work, self.device = out, work, device
        self.deadline = time.monotonic() + deadline_s - (time.time() - started_at)
        self.record = {"schema": SCHEMA, "status": "running", "device_mode": device, "deadline_s": deadline_s,
                       "started_at": started_at, "work": str(work), "env": {}, "steps": [],
                       "files": [JSON_NAME, TAR_NAME]}
        self.ctx = Ctx(work=work, logs=work / "logs", device=device, deadline=self.deadline - MARGIN_S)

    def remaining(self) -> float:
        return self.deadline - MARGIN_S - time.monotonic()

    def run_step(self, step) -> dict:
        entry = {"name": step.name, "what": step.what, "status": "pending", "expect_s": step.expect_s,
                 "limit_s": step.limit_s, "seconds": 0.0, "numbers": {}, "checks": {}, "reason": "", "tail": ""}
        self.record["steps"].append(entry)
        left = self.remaining()
        if left < step.expect_s:
            entry.update(status="skipped", reason=f"needs ~{step.expect_s:.0f} s, {max(left, 0):.0f} s left "
                                                  "before the deadline")
            return entry
        self.ctx.begin(step.name, min(step.limit_s, left))
        start = time.monotonic()
        try:
            entry["numbers"] = step.fn(self.ctx) or {}
            entry["status"] = "ok"
        except StepTimeout as err:
            entry.update(status="timeout", reason=str(err))
        except StepFailed as err:
            entry.update(status="failed", reason=str(err))
        except Exception as err:  # noqa: BLE001 - a broken step is a result; the others still run
            entry.update(status="error", reason=f"{type(err).__name__}: {err}")
        finally:
            self.ctx.kill_all()  # nothing of this step outlives it
        entry["numbers"] = {**self.ctx.numbers, **entry["numbers"]}
        entry["checks"] = dict(self.ctx.checks)
        if entry["status"] == "ok" and not all(self.ctx.checks.values()):
            entry.update(status="failed", reason="checks failed: " + ", ".join(
                name for name, ok in self.ctx.checks.items() if not ok))
        entry["seconds"] = round(time.monotonic() - start, 1)
        entry["tail"] = self.ctx.tail(TAIL_CHARS)
        return entry

    def write(self) -> None:
        """gpu_check.json and the log tarball, each replaced atomically."""
        self.record["elapsed_s"] = round(self.record["deadline_s"] - (self.deadline - time.monotonic()), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{TAR_NAME}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                if path.is_file() and _bundled(path):
                    _add_tail(tar, path, path.relative_to(self.work))
        os.replace(tmp, self.out / TAR_NAME)
        tmp = self.out / f".{JSON_NAME}.tmp"
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, self.out / JSON_NAME)


def _bundled(path: Path) -> bool:
    """Logs, JSON results and run records; not shards, checkpoints or features."""
    return path.suffix in (".log", ".json", ".jsonl", ".xml", ".yaml", ".txt") and "shards" not in path.parts


def _add_tail(tar: tarfile.TarFile, path: Path, name: Path) -> None:
    data = path.read_bytes()
    if len(data) > LOG_KEEP_BYTES:
        data = b"[... cut: first %d bytes]\n" % (len(data) - LOG_KEEP_BYTES) + data[-LOG_KEEP_BYTES:]
    info = tarfile.TarInfo(str(name))
    info.size, info.mtime = len(data), int(path.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


def environment(device: str) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu to rehearse)")
    return env


def summary_line(entry: dict) -> str:
    numbers = json.dumps(entry["numbers"], default=str, separators=(",", ":"))
    if len(numbers) > 600:
        numbers = numbers[:600] + "...(gpu_check.json has all)"
    reason = f" | {entry['reason'][:300]}" if entry["reason"] else ""
    return f"{entry['name']:<15}{entry['status']:<8}{entry['seconds']:>7.1f} s  {numbers}{reason}"


def dry_run(wheels: Path) -> int:
    from scripts.gpu_steps import dry_run_problems
    problems = dry_run_problems(wheels)
    print("steps, in order (deadline 540 s; a step is skipped when less than its typical time is left):")
    for step in STEPS:
        print(f"  {step.name:<13} ~{step.expect_s:>4.0f} s, at most {step.limit_s:>4.0f} s  {step.what}")
    print(f"returns {MAX_FILES} files at most: $OUT/{JSON_NAME} and $OUT/{TAR_NAME}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-results"))
    p.add_argument("--work", default=None, help="default: a fresh folder under /tmp on every call")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: rehearse every step on CPU, with small sizes (no GPU needed)")
    p.add_argument("--smoke-device", dest="device", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from --started-at to the last write")
    p.add_argument("--started-at", type=float, default=None, help="epoch seconds the call began (the shell's)")
    p.add_argument("--only", default=None, help="comma list of steps (default: all, in order)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wheels", default=os.environ.get("GPU_WHEELS_DIR") or str(ROOT / ".whl"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(Path(args.wheels))
    names = [s.name for s in STEPS]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {unknown}; steps: {', '.join(names)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dist_cluster_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(Path(args.out), work, args.device, args.deadline, args.started_at or time.time())

    def stop(signum, _frame):  # the device tool's kill, or ^C: nothing left running, results written
        check.ctx.kill_all()
        check.record["status"] = f"interrupted by signal {signum}"
        check.write()
        os._exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)

    check.record["env"] = environment(args.device)
    print(f"gpu_check: device {args.device}, deadline {args.deadline:.0f} s, work {work}, out {args.out}", flush=True)
    for step in STEPS:
        if step.name not in only:
            continue
        print(f"== {step.name}: {step.what}", flush=True)
        entry = check.run_step(step)
        check.write()
        print(summary_line(entry), flush=True)
    check.record["status"] = "complete"
    check.write()
    print("\n== summary (all of it in $OUT/gpu_check.json; logs in $OUT/gpu_check_logs.tar.gz)")
    for entry in check.record["steps"]:
        print(summary_line(entry))
    failed = [e["name"] for e in check.record["steps"] if e["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
