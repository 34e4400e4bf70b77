"""The package's plan, enforced: stage packages over one runtime, imports only downwards, no circle,
nothing loose at the root, torch-free entry points, the installed wheel complete, and what was
written before the re-layout of 2026-12-04 (a queued submitit job, a checkpoint) still loading.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_layout.py
"""
import ast
import io
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_cluster"
LAYERS = ("runtime", "models", "data", "checkpoint", "cluster", "train", "plan", "evaluation", "run")
# what each layer may import of ours (itself always); the brief's order, runtime and models at the bottom
MAY_IMPORT = {
    "runtime": set(), "models": set(),
    "data": {"runtime"}, "checkpoint": {"runtime"}, "cluster": {"runtime"},
    "train": {"data", "checkpoint", "runtime"},
    "plan": {"cluster", "runtime"},
    "evaluation": {"runtime", "models", "data", "checkpoint", "cluster", "train", "plan", "config"},
    "run": {"runtime", "models", "data", "checkpoint", "cluster", "train", "plan", "config"},
}
TORCH_FREE = {"dist_cluster.config", "dist_cluster.plan.costs", "dist_cluster.data.manifest", "dist_cluster.run.slurm"}
ROOT_MODULES = {"__init__.py", "config.py", "slurm.py"}  # slurm.py: the alias of run/slurm.py, one release


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports(path: Path) -> set[str]:
    """Modules of ours that `path` imports anywhere (top level or inside a function)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dist_cluster")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if not base.startswith("dist_cluster"):
                continue
            for a in node.names:  # `from pkg import module` names the module
                sub = f"{base}.{a.name}"
                found.add(sub if _exists(sub) else base)
    return found


def _exists(module: str) -> bool:
    path = ROOT / Path(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dist_cluster"


def graph() -> dict[str, set[str]]:
    return {module_name(p): our_imports(p) for p in sorted(PACKAGE.rglob("*.py")) if p.name != "slurm.py"
            or p.parent != PACKAGE}


def test_imports_only_go_down_the_layers():
    offenders = []
    for module, imports in graph().items():
        here = layer(module)
        for target in imports:
            there = layer(target)
            if here == "config":
                ok = target in TORCH_FREE
            elif here in MAY_IMPORT:
                ok = there == here or there in MAY_IMPORT[here]
            else:
                ok = False
            if not ok:
                offenders.append(f"{module} ({here}) imports {target} ({there})")
    assert not offenders, "imports against the layer order:\n" + "\n".join(sorted(offenders))


def test_no_import_circle():
    edges = graph()
    done, on_path, path = set(), set(), []

    def visit(node):
        on_path.add(node)
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in on_path:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in done:
                visit(nxt)
        on_path.discard(node)
        path.pop()
        done.add(node)
    for node in sorted(edges):
        if node not in done:
            visit(node)


def test_the_root_holds_no_stage_module_and_every_folder_is_a_package():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS)
    for folder in PACKAGE.rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), f"{folder} lacks __init__.py (setup.cfg: packages = find:)"
    for init in PACKAGE.glob("*/__init__.py"):  # empty but for a docstring: importing a sibling loads no torch
        body = ast.parse(init.read_text()).body
        assert init.parent.name == "models" or all(isinstance(n, ast.Expr) for n in body), init


BLOCK_TORCH = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "faiss"):
            raise ImportError(f"{name} imported (blocked)")
sys.meta_path.insert(0, Block())
sys.path.insert(0, %r)
for name in sys.argv[1:]:
    if name.endswith(".py"):
        runpy.run_path(name, run_name="not_main")
    else:
        __import__(name)
print("ok")
"""


def test_config_submit_and_shards_import_without_torch():
    targets = ["dist_cluster.config", "dist_cluster.slurm", "dist_cluster.run.slurm", "launch/submit.py",
               *sorted(f"shards.{p.stem}" for p in (ROOT / "shards").glob("*.py") if p.stem != "__init__")]
    run = subprocess.run([sys.executable, "-c", BLOCK_TORCH % str(ROOT), *targets], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_a_submitit_job_pickled_before_the_move_loads():
    import cloudpickle

    import dist_cluster.slurm
    from dist_cluster.run import slurm
    job = cloudpickle.loads((ROOT / "tests" / "fixtures" / "trainer_job_2026-12-04.pkl").read_bytes())
    assert sys.modules["dist_cluster.slurm"] is slurm and dist_cluster.slurm is slurm  # one module, no copy
    assert type(job.function) is slurm.Trainer and job.function.config == "configs/smoke.yaml"
    assert job.function.overrides == ["run_dir=runs/x"] and job.args == (["seed=1"],)


def _pickled_globals(data: bytes) -> set[str]:
    """Module names a pickle refers to (GLOBAL, and STACK_GLOBAL after two string pushes)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.split(" ")[0])
        elif op.name == "STACK_GLOBAL":
            found.add(strings[-2])
    return found


def test_checkpoints_name_no_module_of_ours(tmp_path):
    """A checkpoint holds tensors, numbers and strings only (loaded with weights_only=True), so moving
    modules cannot break one written before (checked by hand on 2026-12-04: a smoke run saved by the
    old layout resumed under the new one)."""
    from dist_cluster.checkpoint.writer import CheckpointWriter
    from dist_cluster.train.checkpoint_state import shared_record
    from dist_cluster.train.heads import TrunkAndSuperHead
    trunk = torch.nn.Linear(4, 3)
    trunk.feature_dim = 3
    model = TrunkAndSuperHead(trunk, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4))[1].sum().backward()
    opt.step()
    writer = CheckpointWriter(tmp_path)
    writer.save(shared_record(model, opt, opt, {"global_step": 1}, "seed: 0\n"), {"heads": {}}, 1)
    writer.wait()
    files = [p for p in (tmp_path / "checkpoints").glob("*.pt") if not p.is_symlink()]
    modules = set()
    for path in files:
        with zipfile.ZipFile(path) as z:
            modules |= _pickled_globals(z.read(next(n for n in z.namelist() if n.endswith("data.pkl"))))
    assert "torch._utils" in modules  # the scan sees the globals a tensor needs
    assert not any(m.startswith("dist_cluster") for m in modules), modules


def test_the_wheel_holds_every_package(tmp_path):
    """The Docker image installs from the wheel: a folder without __init__.py would be left out. Built
    from a copy of the checkout's files (an in-tree build/ could hold modules of an older layout)."""
    import shutil
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    with zipfile.ZipFile(next(tmp_path.glob("dist_cluster-*.whl"))) as z:
        in_wheel = {n for n in z.namelist() if n.endswith(".py")}
    assert in_wheel == {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
