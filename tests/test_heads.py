"""Routed rotation x cluster heads: exact gradients against a single-process reference.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_heads.py

Each rank holds a replicated Linear trunk and its slice of a global batch; the loss (super CE +
routed sub CE, weighted or not), DDP-style trunk averaging and RoutedHeads.sync_grads must give
the loss and every gradient of one process holding all heads and the whole batch.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cluster.heads import (HEAD_INIT_STD, RoutedHeads, SuperHead, TrunkAndSuperHead,
                                make_targets, scaled_local_sum)
from tests.dist_utils import run_ranks

IN_DIM, FEAT_DIM = 6, 5


def _case_data(num_super, sub_classes, sizes, weighted, seed, skip_head):
    """Global batch (inputs, super, sub, weight) split by rank sizes; `skip_head` never appears."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n = sum(sizes)
    x = torch.randn(n, IN_DIM, generator=gen)
    heads = [s for s in range(num_super) if s != skip_head]
    sup = torch.tensor(heads)[torch.randint(len(heads), (n,), generator=gen)]
    sub = torch.randint(sub_classes, (n,), generator=gen)
    weight = torch.rand(n, generator=gen) * 2 + 0.1 if weighted else None
    return x, sup, sub, weight


def _trunk(seed):
    torch.manual_seed(seed)  # the same trunk on every rank and in the reference
    return torch.nn.Linear(IN_DIM, FEAT_DIM)


def _distributed_step(rank, world, case, use_ddp=False):
    """One training step; trunk + super head averaged by real DDP or by all_reduce / W."""
    num_super, sub_classes, sizes, weighted, seed, skip_head = case
    x, sup, sub, weight = _case_data(*case[:5], skip_head)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    trunk = _trunk(seed)
    trunk.feature_dim = FEAT_DIM
    model = TrunkAndSuperHead(trunk, num_super, seed=seed)
    heads = RoutedHeads(FEAT_DIM, num_super, sub_classes, seed=seed)
    w_local = None if weight is None else weight[lo:hi]

    wrapped = DDP(model) if use_ddp else model  # keep a reference: a dropped DDP removes its hooks
    feats, super_logits = wrapped(x[lo:hi])
    sub_term, stats = heads.loss(feats, sup[lo:hi], sub[lo:hi], w_local, global_batch=sum(sizes))
    super_ce = F.cross_entropy(super_logits, sup[lo:hi], reduction="none")
    loss = scaled_local_sum(super_ce, w_local, stats["global_weight_sum"]) + sub_term
    loss.backward()
    if not use_ddp:
        for p in model.parameters():  # what DDP does
            dist.all_reduce(p.grad)
            p.grad /= world
    heads.sync_grads()
    # numpy, not tensors: torch.multiprocessing would pass tensors through shared memory that
    # disappears when the rank exits before the parent has read them
    return dict(loss=loss.item(), trunk=[p.grad.numpy() for p in trunk.parameters()],
                super=[p.grad.numpy() for p in model.super_head.parameters()],
                heads={s: [p.grad.numpy() for p in heads.heads[str(s)].parameters()] for s in heads.owned},
                correct=stats["correct"].numpy(), rows=stats["rows"].numpy())


def _reference(case):
    """One process, all heads, whole batch: plain autograd on the global weighted mean."""
    num_super, sub_classes, sizes, weighted, seed, skip_head = case
    x, sup, sub, weight = _case_data(*case[:5], skip_head)
    weight = torch.ones(len(x)) if weight is None else weight
    trunk = _trunk(seed)
    super_w = torch.randn(num_super, FEAT_DIM, generator=torch.Generator().manual_seed(seed * 1_000_003))
    super_w = (super_w * HEAD_INIT_STD).requires_grad_()
    super_b = torch.zeros(num_super, requires_grad=True)
    head_w = torch.stack([torch.randn(sub_classes, FEAT_DIM, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + s + 1)) for s in range(num_super)]) * HEAD_INIT_STD
    head_w.requires_grad_()
    head_b = torch.zeros(num_super, sub_classes, requires_grad=True)

    feats = F.relu(trunk(x))
    super_ce = F.cross_entropy(feats @ super_w.T + super_b, sup, reduction="none")
    sub_logits = torch.einsum("nd,ncd->nc", feats, head_w[sup]) + head_b[sup]
    sub_ce = F.cross_entropy(sub_logits, sub, reduction="none")
    loss = ((super_ce + sub_ce) * weight).sum() / weight.sum()
    loss.backward()
    correct = torch.bincount(sup[sub_logits.argmax(1) == sub], minlength=num_super)
    return dict(loss=loss.item(), trunk=[p.grad for p in trunk.parameters()], super=[super_w.grad, super_b.grad],
                heads={s: [head_w.grad[s], head_b.grad[s]] for s in range(num_super)},
                correct=correct, rows=torch.bincount(sup, minlength=num_super))


def _run_cases(rank, world, cases):
    # the last case runs again under real DDP: its all_reduces interleave with the routed backward
    return [_distributed_step(rank, world, case) for case in cases] + [
        _distributed_step(rank, world, cases[-1], use_ddp=True)]


def _close(a, b):
    return torch.allclose(torch.as_tensor(a), b, atol=1e-5, rtol=1e-4)


def _check(results, case, world):
    ref = _reference(case)
    assert abs(sum(r["loss"] for r in results) / world - ref["loss"]) < 1e-5
    for r in results:  # the averaged trunk / super grads are the same on every rank
        assert all(_close(a, b) for a, b in zip(r["trunk"], ref["trunk"])), case
        assert all(_close(a, b) for a, b in zip(r["super"], ref["super"])), case
    owners_seen = set()
    for r in results:
        for s, grads in r["heads"].items():
            owners_seen.add(s)
            assert all(_close(a, b) for a, b in zip(grads, ref["heads"][s])), (case, s)
    assert owners_seen == set(range(case[0]))
    assert sum(r["rows"] for r in results).tolist() == ref["rows"].tolist()
    assert sum(r["correct"] for r in results).tolist() == ref["correct"].tolist()
    return results


# (S heads, k/m sub classes, rows per rank, weighted, seed, head that never appears or -1)
# the last case of each list runs a second time under real DDP
CASES_W2 = [(4, 3, [5, 7], False, 0, -1),    # W < S: 2 heads per rank
            (2, 1, [4, 4], True, 2, -1),     # one sub class: CE 0, still routed
            (3, 4, [9, 0], True, 1, 1)]      # W < S, uneven; one rank without rows, one head without rows
CASES_W4 = [(4, 3, [3, 5, 4, 6], False, 3, -1),  # W = S
            (2, 3, [6, 2, 7, 5], True, 4, -1),   # W > S: groups of 2 ranks per head
            (3, 2, [4, 4, 0, 8], True, 5, 0),    # groups [0], [1], [2, 3]; head 0 never seen
            (8, 3, [5, 6, 7, 9], True, 6, -1)]   # W < S


def test_routed_heads_exact_single_rank():
    case = (4, 3, [7], True, 7, -1)
    for results in zip(*run_ranks(_run_cases, 1, ([case],))):
        _check(results, case, 1)


def _bad_input_and_checkpoint(rank, world):
    heads = RoutedHeads(FEAT_DIM, 3, 2, seed=7)
    feats = torch.zeros(2, FEAT_DIM, requires_grad=True)
    errors = []
    sup = torch.tensor([0, 5]) if rank == 1 else torch.tensor([0, 1])  # only rank 1 is wrong
    for kwargs in (dict(super_target=sup), dict(super_target=torch.tensor([0, 1]), global_batch=99)):
        try:
            heads.loss(feats, sub_target=torch.tensor([0, 1]), **kwargs)
        except ValueError as err:
            errors.append(str(err))
    # checkpoint: each head saved once (by its first owner), merged, loaded into other heads
    saved = [None] * world
    dist.all_gather_object(saved, heads.state_dict_owned())
    merged = {s: sd for part in saved for s, sd in part.items()}
    other = RoutedHeads(FEAT_DIM, 3, 2, seed=8)
    other.load_state_dict_owned(merged)
    same = all(torch.equal(a, b) for a, b in zip(heads.parameters(), other.parameters()))
    return errors, sorted(merged), [len(part) for part in saved], same


def _two_rank_checks(rank, world):
    return _run_cases(rank, world, CASES_W2), _bad_input_and_checkpoint(rank, world)


def test_two_ranks_exact_grads_bad_targets_and_checkpoint():
    """One 2-rank run (process start-up dominates): exact grads, errors on every rank, checkpoints."""
    results = run_ranks(_two_rank_checks, 2)
    for case, per_rank in zip(CASES_W2 + CASES_W2[-1:], zip(*[r[0] for r in results])):
        _check(per_rank, case, 2)
    for errors, merged_keys, per_rank, same in [r[1] for r in results]:
        assert len(errors) == 2 and "1 bad rows" in errors[0] and "global_batch=99" in errors[1]
        assert merged_keys == [0, 1, 2] and sum(per_rank) == 3 and same


def test_routed_heads_exact_four_ranks_and_group_balance():
    for case, results in zip(CASES_W4 + CASES_W4[-1:], zip(*run_ranks(_run_cases, 4, (CASES_W4,)))):
        _check(results, case, 4)
        if case[0] == 2:  # rows of a head spread over its 2 owners within the number of senders
            for s, members in enumerate([[0, 1], [2, 3]]):
                counts = [int(results[r]["rows"][s]) for r in members]
                assert sum(counts) > 0 and max(counts) - min(counts) <= 4


def test_make_targets():
    rot, z1, z2 = torch.tensor([0, 3, 1]), torch.tensor([1, 0, 1]), torch.tensor([5, 2, 3])
    sup, local = make_targets(rot, z1, z2, m=2, k=6)  # k/m = 3 sub-clusters per super-cluster
    assert sup.tolist() == [1, 6, 3] and local.tolist() == [2, 2, 0]
    with pytest.raises(ValueError):
        make_targets(rot, z1, torch.tensor([1, 2, 3]), m=2, k=6)
