"""Packaging: the faiss extras exclude each other, the Dockerfile's CUDA majors agree with the
faiss-gpu pin, and scripts/gpu_wheels.sh fetches what the offline GPU machine lacks."""
import configparser
import importlib.metadata
import os
import re
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
GPU_WHEELS = ROOT / "scripts" / "gpu_wheels.sh"
MAX_WHEEL_BYTES = 20_000_000  # the script's limit: .whl/ is carried to the GPU machine

# The CUDA major each faiss-gpu pin is built for, read from the wheel's METADATA
# (faiss_gpu-1.15.1-cp310-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl on PyPI):
# "Classifier: Environment :: GPU :: NVIDIA CUDA :: 12", "Requires-Dist: nvidia-cuda-runtime-cu12<13,>=12.6",
# nvidia-cublas-cu12<13,>=12.6, nvidia-curand-cu12<11,>=10.3.7. A new pin needs a new entry here.
FAISS_GPU_CUDA_MAJOR = {"faiss-gpu==1.15.1": 12}

# What the GPU machine has (Python 3.12.3, torch 2.11 cu130, no network): gpu_wheels.txt adds the rest.
GPU_MACHINE_HAS = {"numpy", "pyyaml", "cloudpickle", "typing-extensions", "tqdm", "tensorboard",
                   "matplotlib", "scikit-learn", "pytest", "pillow", "packaging", "torch", "torchvision"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(text):
    """Requirement lines of a setup.cfg list value (one per line, comments and blanks dropped)."""
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def req_name(req):
    return norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))


def faiss_reqs(reqs):
    return [r for r in reqs if req_name(r).startswith("faiss")]


@pytest.fixture(scope="module")
def setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_faiss_only_in_mutually_exclusive_extras(setup_cfg):
    assert faiss_reqs(requirements(setup_cfg["options"]["install_requires"])) == []
    extras = setup_cfg["options.extras_require"]
    cpu = faiss_reqs(requirements(extras["cpu"]))
    assert [req_name(r) for r in cpu] == ["faiss-cpu"], cpu
    gpu = faiss_reqs(requirements(extras["gpu"]))
    assert gpu == ["faiss-gpu==1.15.1"], gpu
    assert gpu[0] in FAISS_GPU_CUDA_MAJOR, f"{gpu[0]}: add its CUDA major (wheel METADATA) to this test"
    # no other extra may pull faiss in next to one of these
    for name, value in extras.items():
        if name not in ("cpu", "gpu"):
            assert faiss_reqs(requirements(value)) == [], name


def dockerfile_args():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M)), text


def docker_run_commands(text):
    """RUN instructions with Docker's line continuations joined."""
    joined = re.sub(r"\\\n", "", text)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_dockerfile_cuda_majors_match_faiss_gpu(setup_cfg):
    args, text = dockerfile_args()
    gpu_pin = faiss_reqs(requirements(setup_cfg["options.extras_require"]["gpu"]))[0]
    want = FAISS_GPU_CUDA_MAJOR[gpu_pin]
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+(\.\d+)?-\S+", args["BASE_IMAGE"])
    assert base, args["BASE_IMAGE"]
    # the index's cuXY: XY = major then one minor digit (cu118 -> 11, cu128 -> 12, cu130 -> 13)
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)\d/?", args["TORCH_INDEX_URL"])
    assert index, args["TORCH_INDEX_URL"]
    majors = {"CUDA_MAJOR": int(args["CUDA_MAJOR"]), "BASE_IMAGE": int(base.group(1)),
              "TORCH_INDEX_URL": int(index.group(1)), gpu_pin: want}
    assert set(majors.values()) == {want}, majors


def test_dockerfile_installs_the_gpu_extra_only():
    _, text = dockerfile_args()
    runs = docker_run_commands(text)
    assert any(re.search(r"pip install \"?\.\[gpu\]\"?", r) for r in runs), runs
    for r in runs:
        assert "faiss-cpu" not in r and not re.search(r"\[[a-z,]*cpu", r), r
        # faiss comes from setup.cfg's pin only, never from a second package name here
        assert not re.search(r"pip install[^&]*\bfaiss", r), r
    # the build itself compares the image's CUDA majors with CUDA_MAJOR
    assert any("CUDA_MAJOR" in r and "torch.version.cuda" in r and "faiss-gpu" in r for r in runs)


def test_setup_sh_installs_the_cpu_extra():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    extras = re.findall(r"pip\"? install[^\n]*-e '?\.\[([a-z,]+)\]", text)
    assert extras, "setup.sh installs no extras"
    for found in extras:
        assert "cpu" in found.split(",") and "gpu" not in found.split(","), found


def gpu_pins():
    lines = [line.split("#")[0].strip() for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!]+", p) for p in pins), pins
    return dict(p.split("==") for p in pins)


def test_gpu_wheel_pins_match_this_environment():
    # the GPU machine should run the same versions as the tests here
    for name, version in gpu_pins().items():
        try:
            here = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert here == version, f"{name}: {version} pinned in scripts/gpu_wheels.txt, {here} installed here"


def run_gpu_wheels(directory, *args, timeout=120):
    # few retries and a short socket timeout: without network the download fails in seconds
    env = dict(os.environ, GPU_WHEELS_DIR=str(directory), PIP_RETRIES="1", PIP_DEFAULT_TIMEOUT="15")
    try:
        return subprocess.run(["bash", str(GPU_WHEELS), *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a network that drops packets: a failed run, not a hang
        return subprocess.CompletedProcess(e.cmd, 124, str(e.stdout or ""), f"timed out after {timeout} s")


def test_gpu_wheels_check_offline(tmp_path):
    pins = gpu_pins()
    r = run_gpu_wheels(tmp_path, "--check")
    assert r.returncode == 1
    for name, version in pins.items():
        assert f"missing: {name}=={version}" in r.stdout + r.stderr
    # --check looks at names only (no network, no unzip): empty files stand in for the wheels
    for name, version in pins.items():
        (tmp_path / f"{norm(name).replace('-', '_')}-{version}-py3-none-any.whl").touch()
    r = run_gpu_wheels(tmp_path, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    name, version = next(iter(pins.items()))
    (tmp_path / f"{name}-0.0.1-py3-none-any.whl").touch()
    r = run_gpu_wheels(tmp_path, "--check")
    assert r.returncode == 1 and f"ambiguous: {name}=={version}" in r.stderr, r.stderr


def pypi_reachable():
    try:
        for host in ("pypi.org", "files.pythonhosted.org"):
            socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_gpu_wheels_download(tmp_path):
    """The real download (PyPI); with pip's cache warm it takes a few seconds."""
    directory = tmp_path / "whl"
    r = run_gpu_wheels(directory)
    if r.returncode != 0 and not pypi_reachable():
        reason = f"no network to PyPI, gpu_wheels.sh failed: {r.stderr.strip()[-300:]}"
        skip_unless_ci(reason)
    assert r.returncode == 0, r.stdout + r.stderr
    check = run_gpu_wheels(directory, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    wheels = sorted(directory.glob("*.whl"))
    assert len(wheels) == len(gpu_pins())
    total = sum(w.stat().st_size for w in wheels)
    assert 0 < total < MAX_WHEEL_BYTES
    # every runtime requirement is carried or already on the GPU machine
    provided = {norm(n) for n in gpu_pins()} | GPU_MACHINE_HAS
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for req in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M):
            if re.search(r"\bextra\s*==", req):
                continue
            assert req_name(req) in provided, f"{wheel.name} requires {req}: add it to scripts/gpu_wheels.txt"
