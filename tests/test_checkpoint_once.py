"""Checkpoints hold one copy of every tensor: each sub head with its momentum in its group leader's
file only, the replicated part in the shared file only; a resume puts every head and its momentum
back on every owner, and a resumed run's losses equal an uninterrupted run's.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_checkpoint_once.py
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn as nn

from dist_cluster.checkpoint import store
from dist_cluster.checkpoint.durable import tensor_bytes
from dist_cluster.train import checkpoint_state
from tests.dist_utils import run_ranks

D, C = 8, 3  # feature dim, sub classes per head
CASES = {"W > S": 2, "W = S": 4, "W < S": 6}  # heads over 4 ranks: groups of 2, of 1, 1 or 2 heads per rank


class _Trunk(nn.Module):
    feature_dim = D

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, D)

    def forward(self, x):
        return self.fc(x)


def _build(num_heads: int, seed: int):
    """Module, heads and optimisers as rounds.Run builds them, from `seed`."""
    from dist_cluster.config import TrainConfig
    from dist_cluster.train.heads import RoutedHeads, TrunkAndSuperHead
    from dist_cluster.train.trainer import sgd
    torch.manual_seed(seed)
    module = TrunkAndSuperHead(_Trunk(), num_heads, seed=seed)
    heads = RoutedHeads(D, num_heads, C, seed=seed)
    cfg = TrainConfig(momentum=0.9)
    head_opt = sgd([*module.super_head.parameters(), *heads.parameters()], cfg)
    return module, heads, sgd(module.trunk.parameters(), cfg), head_opt


def _step(module, heads, trunk_opt, head_opt, k: int) -> None:
    """One SGD step with gradients that depend on the parameter only (the same on every owner of a
    head, as sync_grads makes them)."""
    named = [*module.named_parameters(), *((f"head{s}.{n}", p) for s in heads.owned
                                           for n, p in heads.heads[str(s)].named_parameters())]
    for name, p in named:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))  # not hash(): salted per process
        p.grad = torch.randn(p.shape, generator=gen)
    trunk_opt.step()
    head_opt.step()


def _state(heads, head_opt) -> dict:
    """{head: {param: (weight, momentum)}} of the heads this rank owns."""
    return {s: {n: (p.detach().clone(), head_opt.state[p]["momentum_buffer"].clone())
                for n, p in heads.heads[str(s)].named_parameters()} for s in heads.owned}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for s in a for n in a[s] for x, y in zip(a[s][n], b[s][n]))


def _what_is_on_disk(run_dir, world: int, step: int) -> dict:
    """Per file: which heads it holds and their tensor bytes; the shared file's keys."""
    files = {r: torch.load(store.rank_file(run_dir, r, step), weights_only=True) for r in range(world)}
    shared = torch.load(store.shared_file(run_dir, step), weights_only=True)
    return {"heads": {r: sorted(f["heads"]) for r, f in files.items()},
            "head_keys": {r: {s: sorted(h) for s, h in f["heads"].items()} for r, f in files.items()},
            "head_bytes": sum(tensor_bytes(f["heads"]) for f in files.values()),
            "rank_keys": {r: sorted(f) for r, f in files.items()},
            "shared_model": sorted(shared["model"]), "super_head_optim": sorted(shared["super_head_optim"])}


def _save_and_resume(rank, world, tmp):
    from dist_cluster.checkpoint.writer import CheckpointWriter
    from dist_cluster.runtime import comm
    out = {}
    for name, num_heads in CASES.items():
        run_dir = tmp / name.replace(" ", "")
        module, heads, trunk_opt, head_opt = _build(num_heads, seed=1)
        for k in range(2):
            _step(module, heads, trunk_opt, head_opt, k)
        before, super_before = _state(heads, head_opt), checkpoint_state.param_state(head_opt, module.super_head)
        writer = CheckpointWriter(run_dir)
        shared = checkpoint_state.shared_record(module, trunk_opt, head_opt, {"global_step": 2}, "seed: 0\n")
        own = checkpoint_state.rank_record(heads, head_opt, torch.device("cpu"))
        writer.save(shared if rank == 0 else None, own, 2)
        writer.wait()
        comm.barrier()
        disk = _what_is_on_disk(run_dir, world, 2) if rank == 0 else None
        # a fresh process's objects (another seed), restored as Run.resume and Run.restore_heads do
        module2, heads2, trunk_opt2, head_opt2 = _build(num_heads, seed=2)
        loaded = store.load(run_dir)
        module2.load_state_dict(loaded.shared["model"])
        trunk_opt2.load_state_dict(loaded.shared["trunk_opt"])
        checkpoint_state.restore_from(loaded, run_dir, torch.device("cpu"), module2, heads2, head_opt2)
        restored = _equal(_state(heads2, head_opt2), before)
        super_restored = all(torch.equal(super_before[n]["momentum_buffer"], v["momentum_buffer"])
                             for n, v in checkpoint_state.param_state(head_opt2, module2.super_head).items())
        _step(module, heads, trunk_opt, head_opt, 2)  # one more step: the momentum is really the same
        _step(module2, heads2, trunk_opt2, head_opt2, 2)
        same_after = _equal(_state(heads2, head_opt2), _state(heads, head_opt)) and all(
            torch.equal(a, b) for a, b in zip(module.parameters(), module2.parameters()))
        out[name] = dict(owners=heads.owners, disk=disk, restored=restored, super_restored=super_restored,
                         same_after=same_after, owned=heads.owned)
    return out


def test_each_head_and_its_momentum_once_on_disk_and_back_on_every_owner(tmp_path):
    world = 4
    results = run_ranks(_save_and_resume, world, (tmp_path,), timeout=300)
    for name, num_heads in CASES.items():
        owners, disk = results[0][name]["owners"], results[0][name]["disk"]
        leaders = {s: group[0] for s, group in enumerate(owners)}
        assert any(len(g) > 1 for g in owners) == (name == "W > S")
        # every head in exactly one file, its leader's, with its weights and momentum
        holders = {s: [r for r, held in disk["heads"].items() if s in held] for s in range(num_heads)}
        assert holders == {s: [leaders[s]] for s in range(num_heads)}, (name, holders)
        for r, held in disk["head_keys"].items():
            for s, keys in held.items():
                assert keys == ["bias", "optim", "weight"], (name, r, s, keys)
        one_copy = num_heads * (D * C + C) * 4 * 2  # weights + momentum, float32
        assert disk["head_bytes"] == one_copy, name
        for r in range(world):  # a rank that leads nothing writes its random stream only
            assert disk["rank_keys"][r] == ["global_step", "heads", "rng"]
        # the shared file: trunk and super head, the super head's momentum; no sub head
        assert disk["shared_model"] == ["super_head.bias", "super_head.weight", "trunk.fc.bias", "trunk.fc.weight"]
        assert disk["super_head_optim"] == ["bias", "weight"]
        for rank, per_rank in enumerate(results):
            seen = per_rank[name]
            assert seen["owned"], (name, rank)
            assert seen["restored"] and seen["super_restored"] and seen["same_after"], (name, rank, seen)


def _old_layout(rank, world):
    """A rank file of the layout before (every owner's heads, the head optimiser by position) still
    restores heads and momentum."""
    module, heads, trunk_opt, head_opt = _build(3, seed=1)
    _step(module, heads, trunk_opt, head_opt, 0)
    before = _state(heads, head_opt)
    shared = {"model": module.state_dict()}  # no "format"
    per_rank = {"heads": heads.state_dict(), "head_opt": head_opt.state_dict()}
    module2, heads2, _, head_opt2 = _build(3, seed=2)
    checkpoint_state.restore_heads(module2, heads2, head_opt2, shared, per_rank, read_rank_file=None)
    return _equal(_state(heads2, head_opt2), before)


def test_a_checkpoint_of_the_layout_before_still_restores():
    assert run_ranks(_old_layout, 1) == [True]


# ---------------------------------------------------------------- a real run on 2 ranks


class Crash(Exception):
    pass


def _run_losses(rank, world, tmp, shards, mode, crash_at):
    """Train losses per step of a run (2 rounds of 3 steps, a save after every step), and with
    crash_at, of the same run crashed right after saving that step (its write still pending) and
    run again; plus the resume events."""
    from dist_cluster.checkpoint.writer import join_abandoned
    from dist_cluster.run.rounds import Run
    from dist_cluster.runtime import comm
    from dist_cluster.runtime.logger import read_metrics
    from tests.test_rounds import small_run_config

    class Crashing(Run):
        def maybe_checkpoint(self, state, save=False):
            due = super().maybe_checkpoint(state, save)
            if save and state["global_step"] == crash_at:
                raise Crash()  # no wait(): the save of this step is neither joined nor published
            return due

    run_dir = tmp / f"{mode}-{crash_at}"
    cfg = small_run_config(mode, run_dir, shards, 2, ckpt_every_steps=1)
    if crash_at is not None:
        with pytest.raises(Crash):
            Crashing(cfg).run()
        join_abandoned()  # as if the processes had died after their writes, before the restart
        comm.barrier()
    Run(cfg).run()
    losses = {e["step"]: (e["loss_super"], e["loss_sub"]) for e in read_metrics(run_dir, "train")}
    resumes = [(e["step"], e["phase"]) for e in read_metrics(run_dir, "resume")]
    return losses, resumes, read_metrics(run_dir, "checkpoint")


def _both(rank, world, tmp, shards):
    return {(mode, crash): _run_losses(rank, world, tmp, shards, mode, crash)
            for mode in ("deepcluster", "deepercluster") for crash in (None, 4)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.shard_fixtures import make_shards
    return make_shards(tmp_path_factory.mktemp("shards"), 2, 96, size=28).root


def test_a_resumed_run_matches_an_uninterrupted_one_with_shared_and_several_heads(shards, tmp_path):
    """2 ranks: deepcluster has 1 sub head owned by both (a group of 2: only rank 0 saves it),
    deepercluster 8 heads, 4 per rank. The crash comes mid-round 1, right after the save of step 4
    returned: that step, written but never published (last.pt still names step 3), is complete on
    both ranks, so the run resumes there, with round 1's heads and momentum, and matches."""
    result = run_ranks(_both, 2, (tmp_path, shards), timeout=900, daemon=False)[0]
    for mode in ("deepcluster", "deepercluster"):
        reference, no_resume, events = result[mode, None]
        resumed, resumes, _ = result[mode, 4]
        assert no_resume == [] and resumes == [(4, "train")], mode
        assert sorted(resumed) == sorted(reference) == list(range(1, 7))
        for step in reference:  # bit for bit: same ranks, same order of operations
            assert resumed[step] == reference[step], (mode, step, resumed[step], reference[step])
        # every save published: a round's start, mid-epoch steps, the epoch's end, the round's end
        assert [e["step"] for e in events] == [0, 1, 2, 3, 3, 3, 4, 5, 6, 6]
        assert all(e["background"] and e["bytes"] > 0 and e["write_s"] >= 0 and e["copy_s"] >= 0 for e in events)


def test_the_plan_counts_one_copy_per_save():
    """The paper's run (64 GPUs, 16 heads of Linear(4096, 80000) in groups of 4): ~43 GB a save, not
    the ~168 GB of every owner writing its copy."""
    from dist_cluster.plan.planner import PlanInputs, plan
    train = plan(PlanInputs(images=96_000_000, gpus=64))[-1]
    (note,) = [n for n in train.notes if n.startswith("checkpoint")]
    assert note.startswith("checkpoint 43.0 GB per save: one copy of each parameter and its momentum")
