"""scripts/gpu_check.sh on a machine without a GPU: the dry run names every step and checks the
wheels and files the GPU machine needs; `pytest -m gpu` is collected (>= 10 tests) and skips cleanly.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_gpu_check.py
"""
import os
import subprocess
import sys
from pathlib import Path

from tests.test_packaging import gpu_pins, norm

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_WHEELS_DIR": str(wheels), "PYTHON": sys.executable}
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_lists_the_steps_and_checks_the_wheels(tmp_path):
    missing = _dry_run(tmp_path)
    assert missing.returncode == 1 and "PROBLEM: wheels" in missing.stdout, missing.stdout + missing.stderr
    for name, version in gpu_pins().items():  # --check reads names only: empty files stand in
        (tmp_path / f"{norm(name).replace('-', '_')}-{version}-py3-none-any.whl").touch()
    ok = _dry_run(tmp_path)
    assert ok.returncode == 0 and "dry run: ok" in ok.stdout, ok.stdout + ok.stderr
    for step in ("pytest", "smoke", "kmeans", "train"):
        assert f"  {step} " in ok.stdout
    assert "model.compile=true" in ok.stdout and "killed with -9" in ok.stdout
    assert "bench/kmeans.py --device cuda" in ok.stdout and "model.arch=vgg16_bn" in ok.stdout


def test_gpu_tests_are_collected_and_skip_cleanly_without_cuda():
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0 and "skipped" in last and "failed" not in last, run.stdout[-2000:]
    assert int(last.split()[0]) >= 10 and "needs CUDA" in run.stdout
