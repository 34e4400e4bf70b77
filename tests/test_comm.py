"""The collective rule, by construction: only dist_cluster/runtime/comm.py calls torch.distributed
collectives; every stage takes the run's device; comm returns results where the caller asks.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_comm.py

Why a source test: gloo accepts CPU tensors and NCCL does not, so no CPU test can see a CPU tensor
handed to a collective. Walking the AST of every module makes the one place that handles devices
the only place that can call one.
"""
import ast
from pathlib import Path

import torch

from dist_cluster.runtime import comm
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "gather", "gather_object", "scatter", "scatter_object_list",
               "reduce", "send", "recv", "isend", "irecv", "monitored_barrier"}
ALLOWED = {ROOT / "dist_cluster" / "runtime" / "comm.py"}


def _distributed_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed or one of its submodules in this module."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch.distributed"):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full.startswith("torch.distributed"):
                    aliases.add(a.asname or a.name)
    return aliases


def collective_calls(path: Path) -> list[str]:
    """'file:line name' for every call of a torch.distributed collective, or import of one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [f"{path}:{node.lineno} import {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in aliases or base.startswith("torch.distributed") or base.split(".")[0] in aliases:
                found.append(f"{path}:{node.lineno} {base}.{node.func.attr}")
    return found


def _sources():
    for folder in ("dist_cluster", "launch", "bench", "shards"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_only_comm_calls_collectives():
    offenders = [hit for path in _sources() if path not in ALLOWED for hit in collective_calls(path)]
    assert offenders == [], "collectives outside dist_cluster/runtime/comm.py:\n" + "\n".join(offenders)


def test_the_source_test_sees_what_it_must(tmp_path):
    """The checker itself: every spelling of a collective call is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nimport torch.distributed.nn.functional as F\n"
                   "from torch.distributed import all_reduce\nfrom torch import distributed as d2\n"
                   "dist.all_reduce(x)\nF.all_to_all_single(a, b)\ntorch.distributed.barrier()\n"
                   "d2.broadcast(t, 0)\ncomm.all_reduce(x)\n")
    hits = collective_calls(bad)
    assert len(hits) == 5, hits  # the import, four calls; comm.all_reduce is the allowed spelling


def test_every_stage_takes_the_device_explicitly():
    """No stage infers its device from its input: the device is a required argument."""
    import inspect

    from dist_cluster.cluster.extract import extract_features
    from dist_cluster.cluster.hierarchy import hierarchical_kmeans
    from dist_cluster.cluster.kmeans import initial_centroids, kmeans
    from dist_cluster.cluster.pca import PCAWhitening, fit_pca
    from dist_cluster.cluster.stage import run_clustering
    from dist_cluster.data.loader import make_loader
    for fn in (fit_pca, PCAWhitening.apply, kmeans, initial_centroids, hierarchical_kmeans, run_clustering,
               extract_features, make_loader):
        param = inspect.signature(fn).parameters.get("device")
        assert param is not None and param.default is inspect.Parameter.empty, fn.__qualname__
    sources = "\n".join(p.read_text() for p in (ROOT / "dist_cluster").rglob("*.py"))
    assert "data_device" not in sources and "_compute_device" not in sources


def _comm_on_ranks(rank, world):
    out = {}
    t = torch.tensor([float(rank + 1)])
    out["sum"] = comm.all_reduce(t.clone()).item()
    out["max"] = comm.all_reduce(t.clone(), op=comm.MAX).item()
    started = [comm.all_reduce_async(t * k) for k in (1.0, 10.0)]  # two in flight at once
    out["async"] = [p.wait().item() for p in started]
    counts = torch.tensor([rank + 1, 2 * rank + 1], dtype=torch.int64)  # to rank 0, to rank 1
    out["counts"] = comm.exchange_counts(counts).tolist()
    rows = torch.arange(sum(counts.tolist()) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    recv, recv_counts = comm.all_to_all_rows(rows, counts.tolist(), out_device=torch.device("meta"))
    out["meta_device"] = recv.device.type  # where the caller asked, not where the collective ran
    recv, _ = comm.all_to_all_rows(rows, counts.tolist())
    out["rows"], out["recv_counts"] = recv.tolist(), recv_counts
    x = torch.tensor([float(rank + 2)], requires_grad=True)
    y = comm.all_reduce_autograd(x * 3)
    y.backward()
    out["autograd"] = (y.item(), x.grad.item())  # d(sum over ranks of 3 x_r)/dx summed over ranks
    out["gathered"] = comm.all_gather_object(rank * 10)
    return out


def test_comm_collectives_on_two_gloo_ranks():
    r0, r1 = run_ranks(_comm_on_ranks, 2)
    assert r0["sum"] == r1["sum"] == 3.0 and r0["max"] == 2.0
    assert r0["async"] == r1["async"] == [3.0, 30.0]
    assert r0["counts"] == [1, 2] and r1["counts"] == [1, 3]  # from rank 0, from rank 1
    assert r0["meta_device"] == "meta"
    # rank 0 receives its own first block (1 row) then rank 1's first block (2 rows)
    assert r0["rows"] == [[0.0, 1.0], [100.0, 101.0], [102.0, 103.0]] and r0["recv_counts"] == [1, 2]
    assert r0["autograd"] == (15.0, 6.0) and r1["gathered"] == [0, 10]


def test_comm_without_a_process_group_is_the_identity():
    t = torch.tensor([1.0, 2.0])
    assert comm.all_reduce(t) is t and comm.group_size() == 1
    assert comm.all_reduce_async(t).wait() is t
    rows, counts = comm.all_to_all_rows(torch.ones(3, 2), [3])
    assert counts == [3] and rows.shape == (3, 2)
