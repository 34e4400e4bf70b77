"""The one-call proof of the GPU path (run by scripts/gpu_check.sh on a lent GPU machine).

    bash scripts/gpu_check.sh              # on the GPU machine: runs every step, JSON under $OUT
    bash scripts/gpu_check.sh --dry-run    # anywhere: prints the steps, checks wheels and files

Steps (each a subprocess with its own time limit; a failed step is recorded, the next still runs):
  pytest     `pytest -m gpu tests`: NCCL at world size 1 through every collective, CUDA == CPU
             results, nvjpeg decoding (tests/test_gpu.py, tests/test_decode.py)
  smoke      torchrun --nproc_per_node 1 on synthetic shards with dist.device=cuda; again with
             model.compile=true; a third run killed with -9 mid-training and resumed: its final
             losses against the uninterrupted run's
  kmeans     bench/kmeans.py --device cuda (1M x 256 -> 20k, 25 iterations; fp32 and TF32)
  train      bench/train.py: VGG-16-BN at 224 px, bf16, img/s per GPU, pipeline / model-only, with
             CPU and GPU JPEG decoding, on synthetic JPEG shards it builds itself
Writes OUT/gpu_check.json (per step: rc, seconds, key numbers, output tail) and the benches' JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOKE = ["launch/train.py", "--config", "configs/smoke.yaml", "train.epochs=2"]
TRAIN_BENCH = ["bench/train.py", "--synthetic-jpeg", "4096", "--decode", "cpu,device", "--world", "1",
               "--steps", "20", "--warmup", "5", "--threads", "8", "model.arch=vgg16_bn", "model.sobel=true",
               "data.image_size=224", "data.resize=256", "data.batch_size=64", "data.num_workers=12",
               "data.shuffle_buffer=256", "cluster.k=320", "cluster.m=4", "cluster.pca_dim=256",
               "dist.device=cuda", "train.bf16=true"]
NEEDED_FILES = ["tests/test_gpu.py", "configs/smoke.yaml", "launch/train.py", "bench/kmeans.py",
                "bench/train.py", "tests/shard_fixtures.py", "scripts/gpu_wheels.txt"]


def torchrun(args: list[str]) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def run(cmd: list[str], limit: int, log: Path, env: dict | None = None) -> dict:
    """Run one command with a time limit; returns rc, seconds and the output's tail."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = "timeout"
    text = log.read_text(errors="replace")
    return {"cmd": shlex.join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "tail": text[-1500:]}


def events(run_dir: Path, stage: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when we read
            pass
    return [r for r in records if r.get("stage") == stage]


def final_losses(run_dir: Path) -> list[list[float]]:
    return [[e["loss_super"], e["loss_sub"]] for e in events(run_dir, "epoch")]


def step_pytest(out: Path) -> dict:
    res = run([PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests",
               f"--junitxml={out / 'pytest_gpu.xml'}"], 240, out / "pytest_gpu.log")
    res["summary"] = res["tail"].strip().splitlines()[-1] if res["tail"].strip() else ""
    return res


def build_smoke_shards(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.shard_fixtures import make_shards  # random 28 px PNGs with labels: no dataset needed
    if not (folder / "manifest.json").exists():
        make_shards(folder, 8, 150, size=28)
    return folder


def kill_when_training(cmd: list[str], run_dir: Path, log: Path, limit: int) -> dict:
    """Start a run, SIGKILL its process group once it has a checkpoint inside round 1's training."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        killed_at = None
        while proc.poll() is None and time.perf_counter() - start < limit:
            if any(e.get("round") == 1 for e in events(run_dir, "train")):
                killed_at = time.perf_counter() - start
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        proc.wait()
    return {"killed_after_s": killed_at, "rc": proc.returncode}


def step_smoke(out: Path, work: Path, device: str = "cuda") -> dict:
    """device=cpu rehearses this step on a machine without a GPU (the kill/resume logic too)."""
    shards = build_smoke_shards(work / "shards")
    smoke = SMOKE + [f"dist.device={device}"]
    result = {}
    for name, extra in (("plain", []), ("compiled", ["model.compile=true"])):
        run_dir = work / name
        res = run(torchrun(smoke + [f"run_dir={run_dir}", f"data.train={shards}"] + extra), 240,
                  out / f"smoke_{name}.log")
        res["losses"] = final_losses(run_dir) if res["rc"] == 0 else None
        result[name] = res
    killed_dir = work / "killed"
    cmd = torchrun(smoke + [f"run_dir={killed_dir}", f"data.train={shards}"])
    result["kill"] = kill_when_training(cmd, killed_dir, out / "smoke_killed.log", 240)
    resumed = run(cmd, 240, out / "smoke_resumed.log")
    resumed["losses"] = final_losses(killed_dir) if resumed["rc"] == 0 else None
    result["resumed"] = resumed
    plain = result["plain"]["losses"]
    if plain and resumed["losses"]:
        result["resume_max_abs_loss_diff"] = max(abs(a - b) for x, y in zip(plain, resumed["losses"][-len(plain):])
                                                 for a, b in zip(x, y))
    return result


def step_kmeans(out: Path) -> dict:
    result = {}
    for name, extra in (("fp32", []), ("tf32", ["--tf32"])):
        json_out = out / f"kmeans_{name}.json"
        res = run([PY, "bench/kmeans.py", "--device", "cuda", "--out", str(json_out), *extra], 150,
                  out / f"kmeans_{name}.log")
        if json_out.exists():
            table = json.loads(json_out.read_text())["table"]
            res["total_s"] = [row["total_s"] for row in table]
        result[name] = res
    return result


def step_train(out: Path) -> dict:
    json_out = out / "train_vgg16.json"
    res = run([PY, *TRAIN_BENCH, "--out", str(json_out)], 300, out / "train_vgg16.log")
    if json_out.exists():
        res["bench"] = json.loads(json_out.read_text())
    return res


STEPS = {"pytest": step_pytest, "smoke": step_smoke, "kmeans": step_kmeans, "train": step_train}


def dry_run(wheels: Path) -> int:
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
    print("steps (each in its own time limit):")
    print(f"  pytest  {PY} -m pytest -m gpu -q tests   ({count} tests)")
    print(f"  smoke   {shlex.join(torchrun(SMOKE + ['dist.device=cuda', 'run_dir=WORK/plain', 'data.train=WORK/shards']))}")
    print("          ... again with model.compile=true; again killed with -9 in round 1 and resumed")
    print(f"  kmeans  {PY} bench/kmeans.py --device cuda [--tf32]")
    print(f"  train   {shlex.join([PY, *TRAIN_BENCH])}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-results"))
    parser.add_argument("--work", default="/tmp/dist_cluster_gpu_check")
    parser.add_argument("--only", default=",".join(STEPS), help="comma list of steps")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--wheels", default=os.environ.get("GPU_WHEELS_DIR") or str(ROOT / ".whl"))
    parser.add_argument("--smoke-device", default="cuda", help="cpu: rehearse the smoke step without a GPU")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run(Path(args.wheels))
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    record = {"torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "steps": {}}
    for name in args.only.split(","):
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            record["steps"][name] = STEPS[name](out) if name != "smoke" else step_smoke(out, work, args.smoke_device)
        except Exception as err:  # noqa: BLE001 - a broken step is a result; the others still run
            record["steps"][name] = {"error": repr(err)}
        record["steps"][name]["step_seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
        print(json.dumps(record["steps"][name], default=str)[:1500], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
