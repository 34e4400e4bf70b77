"""The steps of scripts/gpu_check.py, in order of value, and the context that runs their commands.

Every command a step starts goes through `Ctx.run` / `Ctx.popen`: it carries an environment tag
(tests/processes.py), so at its time limit, at the deadline, or after the kill/resume step's kill,
the whole tree (torchrun, its ranks in their own sessions, their loader workers) is SIGKILLed.
`--device cpu` runs every step on CPU with small sizes: the rehearsal tests/test_gpu_check.py runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
GPU_LOSS_TOL = 1e-3  # kill/resume on CUDA: |loss - uninterrupted loss| per logged step (cuDNN's
# nondeterministic kernels); on CPU the resumed run must reproduce the logged losses exactly
PAUSE_STEP = 13  # tests/kill_point.py pause-train: round 1 (steps 10-18) of the smoke runs below
SMOKE = ["--config", "configs/smoke.yaml", "train.epochs=2", "dist.timeout_s=120"]
TRAIN_BENCH_GPU = ["--synthetic-jpeg", "4096", "--decode", "cpu,device", "--world", "1", "--steps", "20",
                   "--warmup", "5", "--threads", "8", "model.arch=vgg16_bn", "model.sobel=true",
                   "data.image_size=224", "data.resize=256", "data.batch_size=64", "data.num_workers=12",
                   "data.shuffle_buffer=256", "cluster.k=320", "cluster.m=4", "cluster.pca_dim=256",
                   "dist.device=cuda", "train.bf16=true"]
TRAIN_BENCH_CPU = ["--synthetic-jpeg", "128", "--decode", "cpu", "--world", "1", "--steps", "4", "--warmup", "1",
                   "--config", "configs/smoke.yaml", "data.image_size=32", "data.resize=40", "data.batch_size=16",
                   "data.num_workers=1", "data.shuffle_buffer=16", "dist.device=cpu"]
NEEDED_FILES = ["tests/test_gpu.py", "tests/kill_point.py", "tests/processes.py", "tests/shard_fixtures.py",
                "configs/smoke.yaml", "launch/train.py", "bench/kmeans.py", "bench/train.py", "bench/memory.py",
                "scripts/gpu_wheels.txt"]


class StepFailed(Exception):
    """A command exited badly, or a result is not what it must be."""


class StepTimeout(Exception):
    """A command ran into the step's time limit (or the deadline) and was killed, tree and all."""


@dataclass
class Step:
    name: str
    expect_s: float  # typical seconds: skipped when less than this is left before the deadline
    limit_s: float  # killed after this long (or at the deadline, whichever comes first)
    fn: Callable
    what: str


class Ctx:
    """What a step gets: its folders, the device mode, its clock, and the commands it starts."""

    def __init__(self, work: Path, logs: Path, device: str, deadline: float):
        self.work, self.logs, self.device, self.deadline = work, logs, device, deadline
        self.results = work / "results"
        self.shared: dict = {}  # across steps: the smoke shards, the uninterrupted reference runs
        self.tokens: list[str] = []
        self.begin("", 0.0)

    def begin(self, step: str, limit_s: float) -> None:
        self.step, self.step_deadline = step, time.monotonic() + limit_s
        self.numbers, self.checks, self.last_log = {}, {}, None

    def left(self) -> float:
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def env(self, **extra: str) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if self.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def popen(self, cmd: list[str], log: str, **env: str) -> tuple[subprocess.Popen, str]:
        from tests.processes import new_token, tagged_env
        token = new_token()
        self.tokens.append(token)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.last_log = self.logs / f"{self.step}_{log}.log"
        with open(self.last_log, "w") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    env=tagged_env(token, self.env(**env)))
        return proc, token

    def wait(self, proc: subprocess.Popen, token: str, what: str) -> int:
        try:
            return proc.wait(timeout=max(self.left(), 0.1))
        except subprocess.TimeoutExpired:
            from tests.processes import kill_tagged
            kill_tagged(token)
            proc.wait()
            raise StepTimeout(f"{what}: killed (tree and all) at the step's limit or the deadline") from None

    def run(self, cmd: list[str], log: str, ok=(0,), **env: str) -> int:
        proc, token = self.popen(cmd, log, **env)
        rc = self.wait(proc, token, log)
        if rc not in ok:
            raise StepFailed(f"{log}: exit code {rc}: {self.tail(600)}")
        return rc

    def kill_all(self) -> None:
        from tests.processes import kill_tagged
        for token in self.tokens:
            kill_tagged(token)
        self.tokens.clear()

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        return bool(ok)

    def tail(self, chars: int) -> str:
        if self.last_log is None or not self.last_log.exists():
            return ""
        return self.last_log.read_text(errors="replace")[-chars:]


# ----------------------------------------------------------------------------- run records


def events(run_dir: Path, stage: str) -> list[dict]:
    from dist_cluster.runtime.logger import read_metrics
    return read_metrics(run_dir, stage) if (run_dir / "metrics.jsonl").exists() else []


def torchrun(ranks: int, args: list[str]) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]


def smoke_args(ctx: Ctx, run_dir: Path, ranks: int, *extra: str) -> list[str]:
    """The smoke run on this device: NCCL at one rank on CUDA; two ranks share the GPU over gloo."""
    shards = ctx.shared.get("shards")
    if shards is None:
        from tests.shard_fixtures import make_shards  # random 28 px PNGs with labels: no dataset
        shards = ctx.shared["shards"] = make_shards(ctx.work / "shards", 8, 150, size=28).root
    backend = "gloo" if ranks > 1 or ctx.device == "cpu" else "auto"
    return [*SMOKE, f"run_dir={run_dir}", f"data.train={shards}", f"dist.device={ctx.device}",
            f"dist.backend={backend}", *extra]


def run_numbers(run_dir: Path) -> dict:
    epochs, train = events(run_dir, "epoch"), events(run_dir, "train")
    return {"epoch_losses": [[round(e["loss_super"], 5), round(e["loss_sub"], 5)] for e in epochs],
            "img_per_s": round(sum(e["img_per_s"] for e in train) / max(len(train), 1), 1),
            "done_events": len(events(run_dir, "done"))}


def smoke_run(ctx: Ctx, name: str, ranks: int, *extra: str) -> Path:
    run_dir = ctx.work / name
    ctx.run(torchrun(ranks, ["launch/train.py", *smoke_args(ctx, run_dir, ranks, *extra)]), name)
    numbers = ctx.numbers[name] = run_numbers(run_dir)
    ctx.check(f"{name}: one done event", numbers["done_events"] == 1)
    return run_dir


def per_step_losses(run_dir: Path) -> dict[int, list[tuple[float, float]]]:
    """Every logged `train` event's losses by global step (both attempts of a resumed run)."""
    out: dict[int, list] = {}
    for e in events(run_dir, "train"):
        out.setdefault(e["step"], []).append((e["loss_super"], e["loss_sub"]))
    return out


def kill_and_resume(ctx: Ctx, ranks: int, reference: Path) -> dict:
    """Pause every rank mid-round-1 (tests/kill_point.py pause-train), SIGKILL the whole tree as a
    node failure would, resume with a new torchrun, compare each logged step with `reference`."""
    from tests.processes import alive_tagged, kill_tagged
    run_dir = ctx.work / f"killed_{ranks}rank"
    args = smoke_args(ctx, run_dir, ranks)
    proc, token = ctx.popen(torchrun(ranks, ["tests/kill_point.py", "pause-train", *args]), f"killed_{ranks}rank",
                            DIST_CLUSTER_PAUSE_STEP=str(PAUSE_STEP))
    while len(list(run_dir.glob("paused.rank*.json"))) < ranks:
        if proc.poll() is not None:
            raise StepFailed(f"the run ended (rc {proc.returncode}) before pausing at step {PAUSE_STEP}: "
                             f"{ctx.tail(600)}")
        if ctx.left() <= 0:
            ctx.wait(proc, token, "pause")  # raises StepTimeout, tree killed
        time.sleep(0.1)
    killed = kill_tagged(token)
    proc.wait()
    ctx.check("kill: no process of the run alive", not alive_tagged(token))
    ctx.run(torchrun(ranks, ["launch/train.py", *args]), f"resumed_{ranks}rank")
    ctx.check("resume: no process of the run alive", not alive_tagged(ctx.tokens[-1]))
    want, got = per_step_losses(reference), per_step_losses(run_dir)
    missing = sorted(step for step in got if step not in want)
    diffs = [abs(a - b) for step, logged in got.items() if step in want for pair in logged
             for a, b in zip(pair, want[step][0])]
    resumes = events(run_dir, "resume")
    after = [step for step in got if resumes and step > resumes[0]["step"]]
    worst = max(diffs, default=float("inf"))
    tol = 0.0 if ctx.device == "cpu" else GPU_LOSS_TOL
    ctx.check("one done event", len(events(run_dir, "done")) == 1)
    ctx.check("resumed from a checkpoint", len(resumes) == 1)
    ctx.check("steps after the resume logged", bool(after))
    ctx.check("every logged step is in the uninterrupted run", not missing)
    ctx.check(f"every logged step's losses within {tol:g} of the uninterrupted run's", worst <= tol)
    return {"ranks": ranks, "paused_at_step": PAUSE_STEP, "processes_killed": len(killed),
            "resumed_from_step": resumes[0]["step"] if resumes else None, "events_compared": len(diffs) // 2,
            "steps_missing_in_reference": missing,
            "max_abs_loss_diff": worst, "tolerance": tol}


def reference_run(ctx: Ctx, ranks: int) -> Path:
    ref = ctx.shared.get(f"reference_{ranks}rank")
    return ref if ref is not None else smoke_run(ctx, f"reference_{ranks}rank", ranks)


# ----------------------------------------------------------------------------- the steps


def step_pytest(ctx: Ctx) -> dict:
    xml = ctx.logs / "pytest_gpu.xml"
    env = {"DIST_CLUSTER_GPU_TESTS_DEVICE": "cpu"} if ctx.device == "cpu" else {}
    ctx.run([PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", "tests",
             f"--junitxml={xml}"], "pytest", ok=(0, 1), **env)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    ctx.check("no test failed", counts["failures"] + counts["errors"] == 0)
    least = 10 if ctx.device == "cuda" else 5  # the rehearsal leaves out the CUDA-only tests
    ctx.check(f"at least {least} tests ran", counts["tests"] - counts["skipped"] >= least)
    return counts


def step_smoke(ctx: Ctx) -> dict:
    ctx.shared["reference_1rank"] = smoke_run(ctx, "reference_1rank", 1)
    return {}


def step_kill_resume(ctx: Ctx) -> dict:
    return kill_and_resume(ctx, 1, reference_run(ctx, 1))


def step_two_ranks(ctx: Ctx) -> dict:
    """W = 2 < S = 8 sub heads (a rank owns 4), then DeepCluster's one head shared by a group of 2."""
    ctx.shared["reference_2rank"] = smoke_run(ctx, "reference_2rank", 2)
    smoke_run(ctx, "deepcluster_2rank", 2, "mode=deepcluster")
    return {}


def step_kill_resume_2(ctx: Ctx) -> dict:
    return kill_and_resume(ctx, 2, reference_run(ctx, 2))


def step_kmeans(ctx: Ctx) -> dict:
    variants = [("fp32", []), ("tf32", ["--tf32"])] if ctx.device == "cuda" else [("cpu", ["--quick", "--ranks", "1"])]
    numbers = {}
    for name, extra in variants:
        out = ctx.results / f"kmeans_{name}.json"
        ctx.run([PY, "bench/kmeans.py", "--device", ctx.device, "--out", str(out), *extra], f"kmeans_{name}")
        record = json.loads(out.read_text())
        numbers[name] = {"config": record["config"], "table": record["table"]}
    return numbers


def step_train(ctx: Ctx) -> dict:
    out = ctx.results / "train.json"
    args = TRAIN_BENCH_GPU if ctx.device == "cuda" else TRAIN_BENCH_CPU
    ctx.run([PY, "bench/train.py", *args, "--run-dir", str(ctx.work / "train_bench"), "--out", str(out)], "train")
    record = json.loads(out.read_text())
    return {"config": record["config"], "pipeline_over_model": record["pipeline_over_model"],
            **{name: {"img_per_s_per_rank": round(row["img_per_s_per_rank"], 1), "ms_per_step": round(
                row["ms_per_step"], 2), "phase_ms": {p: round(v, 2) for p, v in row["phase_ms"].items()}}
               for name, row in record["rows"].items()}}


def step_memory(ctx: Ctx) -> dict:
    out = ctx.results / "memory.json"
    sizes = (["--dims", "256,1024", "--backend", "torch"] if ctx.device == "cuda"
             else ["--dims", "256"])  # bench/memory.py --quick's sizes: the planner's fixed terms are small
    ctx.run([PY, "bench/memory.py", "--device", ctx.device, "--worlds", "1", *sizes, "--out", str(out)], "memory")
    rows = json.loads(out.read_text())["rows"]
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    ctx.check("measured within 1.15 x the planned peak", bool(ratios) and max(ratios) <= 1.15)
    return {"max_measured_over_planned": max(ratios, default=None),
            "rows": [[r["dim"], r["rows_per_rank"], r["stage"], r["measured_peak_bytes"], r["planned_peak_bytes"]]
                     for r in rows]}


def step_compile(ctx: Ctx) -> dict:
    """torch.compile (GPU only: on CPU the run is eager and this only rehearses the step)."""
    run_dir = smoke_run(ctx, "compiled_1rank", 1, "model.compile=true")
    ref = per_step_losses(reference_run(ctx, 1))
    diffs = [abs(a - b) for step, losses in per_step_losses(run_dir).items() if step in ref
             for a, b in zip(losses[0], ref[step][0])]
    return {"max_abs_loss_diff_vs_eager": max(diffs, default=None)}


STEPS = [
    Step("pytest", 45, 150, step_pytest, "pytest -m gpu: NCCL at world size 1, CUDA == CPU per stage, nvjpeg"),
    Step("smoke", 30, 120, step_smoke, "1 rank, NCCL, configs/smoke.yaml: 2 rounds extract-cluster-train"),
    Step("kill_resume", 45, 150, step_kill_resume, "1 rank paused in round 1, tree SIGKILLed, resumed: per-step "
                                                   "losses vs the uninterrupted run"),
    Step("two_ranks", 50, 180, step_two_ranks, "2 ranks on one GPU over gloo (dist.device=cuda): uneven "
                                               "all_to_all, 4 heads a rank; DeepCluster: a head group of 2"),
    Step("kill_resume_2", 50, 150, step_kill_resume_2, "the kill/resume check at 2 ranks (gloo, CUDA)"),
    Step("kmeans", 30, 120, step_kmeans, "bench/kmeans.py: 1M x 256 -> 20k, 25 iterations, fp32 and TF32"),
    Step("train", 60, 200, step_train, "bench/train.py: VGG-16-BN 224 px bf16 img/s, CPU and nvjpeg decode"),
    Step("memory", 40, 150, step_memory, "bench/memory.py --device cuda: peak GPU memory per stage vs the planner"),
    Step("compile", 60, 240, step_compile, "the smoke run with model.compile=true"),
]


def dry_run_problems(wheels: Path) -> list[str]:
    problems = [f"missing file {f}" for f in NEEDED_FILES if not (ROOT / f).exists()]
    check = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--check"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "GPU_WHEELS_DIR": str(wheels)})
    if check.returncode != 0:
        problems.append(f"wheels in {wheels}: {check.stdout.strip() or check.stderr.strip()} "
                        "(run bash scripts/gpu_wheels.sh)")
    collected = subprocess.run([PY, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests"], cwd=ROOT, capture_output=True, text=True)
    count = sum(1 for line in collected.stdout.splitlines() if "::test_" in line)
    if count < 10:
        problems.append(f"pytest -m gpu collects {count} tests (need >= 10)")
    return problems
