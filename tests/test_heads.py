"""The training step's gradients against the original DeeperCluster's, computed in one process.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_heads.py

The reference is written from the original code (facebookresearch/DeeperCluster, src/trainer.py),
not from ours: there each rank's loss is cross-entropy averaged over its own batch (sub-class +
super-class), the trunk and the super-class layer are DDP-averaged over ALL ranks, and each
sub-class layer is DDP-averaged over its OWN group of ranks. With equal batches per rank that is:
  trunk, super head: d/dtheta of  sum_i w_i (CE_super_i + CE_sub_i) / sum_i w_i   (global batch)
  sub head s:        d/dtheta of  sum_{i in s} w_i CE_sub_i / sum_{i in s} w_i     (its own rows)
(w_i: balancing weights, 1 without balancing). `_reference` computes exactly these with plain
autograd, one loss per head; `trainer.train_step` runs the distributed step on W real gloo ranks
(DDP, routed heads), for W < S, W = S and W > S, unequal rows per rank and head, with and
without weights. lr = 0 keeps the parameters, so the step's gradients are read afterwards.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cluster.runtime.distributed import ownership
from dist_cluster.train.head_grads import HeadGradSync
from dist_cluster.train.heads import HEAD_INIT_STD, RoutedHeads, TrunkAndSuperHead
from dist_cluster.train.targets import Targets
from dist_cluster.train.trainer import PendingStats, sgd, train_step
from tests.dist_utils import run_ranks

IN_DIM, FEAT_DIM = 6, 5
CPU = torch.device("cpu")
CFG = OmegaConf.create({"train": {"bf16": False, "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0}})


def _case_data(num_super, sub_classes, sizes, weighted, seed, skip_head):
    """Global batch (inputs, super, sub, super weight, sub weight) split by rank sizes; `skip_head`
    never appears."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n = sum(sizes)
    x = torch.randn(n, IN_DIM, generator=gen)
    heads = [s for s in range(num_super) if s != skip_head]
    sup = torch.tensor(heads)[torch.randint(len(heads), (n,), generator=gen)]
    sub = torch.randint(sub_classes, (n,), generator=gen)
    w_super = torch.rand(n, generator=gen) * 2 + 0.1 if weighted else torch.ones(n)
    w_sub = torch.rand(n, generator=gen) * 2 + 0.1 if weighted else torch.ones(n)
    return x, sup, sub, w_super, w_sub


def _trunk(seed):
    torch.manual_seed(seed)  # the same trunk on every rank and in the reference
    trunk = torch.nn.Linear(IN_DIM, FEAT_DIM)
    trunk.feature_dim = FEAT_DIM
    return trunk


def _setup(rank, case, overlap=True, sub_grad="own_rows"):
    """This rank's model, heads, optimisers and slice of the case's batch."""
    num_super, sub_classes, sizes, weighted, seed, skip_head, *loads = case
    x, sup, sub, w_super, w_sub = _case_data(*case[:5], skip_head)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    module = TrunkAndSuperHead(_trunk(seed), num_super, seed=seed)
    heads = RoutedHeads(FEAT_DIM, num_super, sub_classes, seed=seed, overlap=overlap,
                        loads=loads[0] if loads else None, sub_grad=sub_grad)
    opts = (sgd(module.trunk.parameters(), CFG.train),
            sgd(list(module.super_head.parameters()) + list(heads.parameters()), CFG.train))
    targets = Targets(images=x[lo:hi], super_class=sup[lo:hi], sub_local=sub[lo:hi],
                      super_weight=w_super[lo:hi], sub_weight=w_sub[lo:hi])
    return module, DDP(module), heads, opts, targets


def _distributed_step(rank, world, case, overlap=True, sub_grad="own_rows"):
    """trainer.train_step on this rank's slice; returns its gradients and logged statistics."""
    module, model, heads, (trunk_opt, head_opt), targets = _setup(rank, case, overlap, sub_grad)
    stats = PendingStats(train_step(model, heads, targets, trunk_opt, head_opt, 0.0, CFG, CPU)).result(world)
    # numpy, not tensors: torch.multiprocessing would pass tensors through shared memory that
    # disappears when the rank exits before the parent has read them
    return dict(loss_super=stats.loss_super, loss_sub=stats.loss_sub, acc_sub=stats.acc_sub, owners=heads.owners,
                trunk=[p.grad.numpy() for p in module.trunk.parameters()],
                super=[p.grad.numpy() for p in module.super_head.parameters()],
                heads={s: [p.grad.numpy() for p in heads.heads[str(s)].parameters()] for s in heads.owned})


def _reference(case):
    """One process, all heads, the whole batch: the original's losses (module docstring)."""
    num_super, sub_classes, sizes, weighted, seed, skip_head = case[:6]
    x, sup, sub, w_super, w_sub = _case_data(*case[:5], skip_head)
    trunk = _trunk(seed)
    super_w = torch.randn(num_super, FEAT_DIM, generator=torch.Generator().manual_seed(seed * 1_000_003))
    super_w = (super_w * HEAD_INIT_STD).requires_grad_()
    super_b = torch.zeros(num_super, requires_grad=True)
    head_w = torch.stack([torch.randn(sub_classes, FEAT_DIM, generator=torch.Generator().manual_seed(
        seed * 1_000_003 + s + 1)) for s in range(num_super)]) * HEAD_INIT_STD
    head_w.requires_grad_()
    head_b = torch.zeros(num_super, sub_classes, requires_grad=True)

    def sub_ce():
        feats = F.relu(trunk(x))
        logits = torch.einsum("nd,ncd->nc", feats, head_w[sup]) + head_b[sup]
        return feats, F.cross_entropy(logits, sub, reduction="none"), logits

    # trunk + super head: the global batch's weighted means (DDP average over all ranks)
    feats, ce_sub, logits = sub_ce()
    ce_super = F.cross_entropy(feats @ super_w.T + super_b, sup, reduction="none")
    loss_super = (ce_super * w_super).sum() / w_super.sum()
    loss_sub = (ce_sub * w_sub).sum() / w_sub.sum()
    (loss_super + loss_sub).backward()
    ref = dict(loss_super=loss_super.item(), loss_sub=loss_sub.item(),
               acc_sub=(logits.argmax(1) == sub).float().mean().item(),
               trunk=[p.grad.clone() for p in trunk.parameters()], super=[super_w.grad, super_b.grad], heads={})
    # each sub head: the weighted mean over its own rows (DDP average over its own group)
    for s in range(num_super):
        rows = sup == s
        head_w.grad = head_b.grad = None
        _, ce_sub, _ = sub_ce()
        if rows.any():
            ((ce_sub * w_sub)[rows].sum() / w_sub[rows].sum()).backward()
        ref["heads"][s] = [torch.zeros_like(head_w[s]) if head_w.grad is None else head_w.grad[s],
                           torch.zeros_like(head_b[s]) if head_b.grad is None else head_b.grad[s]]
    return ref


def _close(a, b):
    return torch.allclose(torch.as_tensor(a), b, atol=1e-5, rtol=1e-4)


def _check(results, case):
    ref = _reference(case)
    for r in results:  # statistics are summed over ranks: the same on every rank
        for key in ("loss_super", "loss_sub", "acc_sub"):
            assert abs(r[key] - ref[key]) < 1e-5, (case, key, r[key], ref[key])
        assert all(_close(a, b) for a, b in zip(r["trunk"], ref["trunk"])), case
        assert all(_close(a, b) for a, b in zip(r["super"], ref["super"])), case
    owners_seen = set()
    for r in results:
        for s, grads in r["heads"].items():
            owners_seen.add(s)
            assert all(_close(a, b) for a, b in zip(grads, ref["heads"][s])), (case, s)
    assert owners_seen == set(range(case[0]))
    loads = case[6] if len(case) > 6 else None  # the owners follow the expected rows per head
    assert all(r["owners"] == ownership(case[0], len(results), loads) for r in results)


def _run_cases(rank, world, cases):
    return [_distributed_step(rank, world, case) for case in cases]


# (S heads, k/m sub classes, rows per rank, weighted, seed, head that never appears or -1)
CASES_W2 = [(4, 3, [5, 7], False, 0, -1),    # W < S: 2 heads per rank
            (2, 1, [4, 4], True, 2, -1),     # W = S; one sub class: CE 0, still routed
            (3, 4, [9, 0], True, 1, 1),      # W < S, uneven; one rank without rows, one head without rows
            (1, 3, [1, 0], True, 9, -1)]     # W > S: one row, so one member of the head's group has none
CASES_W4 = [(4, 3, [3, 5, 4, 6], False, 3, -1),  # W = S
            (2, 3, [6, 2, 7, 5], True, 4, -1),   # W > S: groups of 2 ranks per head
            (3, 2, [4, 4, 0, 8], True, 5, 0),    # groups [0], [1], [2, 3]; head 0 never seen
            (8, 3, [5, 6, 7, 9], True, 6, -1),   # W < S
            (2, 3, [6, 2, 7, 5], True, 8, -1, [3, 1]),  # W > S, owners by rows: [0, 1, 2], [3]
            (8, 3, [5, 6, 7, 9], True, 9, -1, [8, 1, 1, 1, 5, 1, 1, 1]),  # W < S, largest first (LPT)
            (2, 3, [1, 0, 0, 0], True, 10, -1)]   # W > S, one row: one head with rows on one member only


def test_train_step_matches_the_original_single_rank():
    case = (4, 3, [7], True, 7, -1)
    _check(run_ranks(_run_cases, 1, ([case],))[0], case)


def _bad_input_and_checkpoint(rank, world):
    heads = RoutedHeads(FEAT_DIM, 3, 2, seed=7)
    feats = torch.zeros(2, FEAT_DIM, requires_grad=True)
    sup = torch.tensor([0, 5]) if rank == 1 else torch.tensor([0, 1])  # only rank 1 is wrong
    try:
        heads.loss(feats, sup, torch.tensor([0, 1]), torch.ones(2), torch.tensor(4.0), torch.ones(3))
        error = "no error"
    except ValueError as err:
        error = str(err)
    # checkpoint: each head saved once (by its first owner), merged, loaded into other heads
    saved = [None] * world
    dist.all_gather_object(saved, heads.state_dict_owned())
    merged = {s: sd for part in saved for s, sd in part.items()}
    other = RoutedHeads(FEAT_DIM, 3, 2, seed=8)
    other.load_state_dict_owned(merged)
    same = all(torch.equal(a, b) for a, b in zip(heads.parameters(), other.parameters()))
    return error, sorted(merged), [len(part) for part in saved], same


def _two_heads_one_group(rank, world):
    """HeadGradSync alone, on a layout `ownership` does not make today: both ranks own heads 0 and 1,
    over one group. Rank r has rows for head r only, so backward fires the hooks of head 0 on rank 0
    and of head 1 on rank 1: launched in hook order, rank 0's head 0 would be summed with rank 1's
    head 1. The ascending rule pairs them right. Returns {head: bias gradient}."""
    heads = {s: torch.nn.Linear(2, 2) for s in (0, 1)}
    sync = HeadGradSync(heads, {0: dist.group.WORLD, 1: dist.group.WORLD}, {0, 1}, world)
    routed = torch.ones(1, 2, requires_grad=True) * 1.0
    sync.arm(torch.full((2,), float(world)), [int(s == rank) for s in (0, 1)], routed)  # scale / W = 1
    (heads[rank](routed).sum() * 10 ** rank + routed.sum() * 0.0).backward()
    sync.finish()
    return {s: heads[s].bias.grad.tolist() for s in (0, 1)}


def _two_rank_checks(rank, world):
    return _run_cases(rank, world, CASES_W2), _bad_input_and_checkpoint(rank, world), _two_heads_one_group(rank, world)


def test_two_ranks_match_the_original_bad_targets_and_checkpoint():
    """One 2-rank run (process start-up dominates): gradients, errors on every rank, checkpoints, the
    order of head reduces over a group shared by two heads."""
    results = run_ranks(_two_rank_checks, 2)
    for case, per_rank in zip(CASES_W2, zip(*[r[0] for r in results])):
        _check(per_rank, case)
    for error, merged_keys, per_rank, same in [r[1] for r in results]:
        assert "1 bad rows over all ranks" in error
        assert merged_keys == [0, 1, 2] and sum(per_rank) == 3 and same
    for r in results:  # head 0: rank 0's [1, 1] + rank 1's zeros; head 1: zeros + rank 1's [10, 10]
        assert r[2] == {0: [1.0, 1.0], 1: [10.0, 10.0]}, r[2]


def _reduce_order(rank, world, case, overlap):
    """One train_step recording, in order: each head-gradient reduce started, the trunk's first
    layer's gradient accumulated (the last of backward), sync_grads called. Also this rank's rows
    per owned head and its head gradients."""
    from dist_cluster.runtime import comm
    module, model, heads, (trunk_opt, head_opt), targets = _setup(rank, case, overlap)
    events, rows, real_reduce, real_loss, real_sync = [], {}, comm.all_reduce_async, heads.loss, heads.sync_grads

    def reduce(tensor, group=None, op=None):
        events.append("reduce")
        return real_reduce(tensor, group, op)

    def loss(*args):
        out = real_loss(*args)
        rows.update({s: out[1]["rows"][s] for s in heads.owned})
        return out

    heads.loss, heads.sync_grads = loss, lambda: (events.append("sync"), real_sync())
    module.trunk.weight.register_post_accumulate_grad_hook(lambda p: events.append("trunk"))
    comm.all_reduce_async = reduce
    try:
        train_step(model, heads, targets, trunk_opt, head_opt, 0.0, CFG, CPU)
    finally:
        comm.all_reduce_async = real_reduce
    return events, rows, {s: [p.grad.numpy() for p in heads.heads[str(s)].parameters()] for s in heads.owned}


ONE_ROW = 6  # CASES_W4[6]: one row in all


def _four_rank_checks(rank, world):
    order = {(i, overlap): _reduce_order(rank, world, CASES_W4[i], overlap)
             for i in (1, ONE_ROW) for overlap in (True, False)}
    return _run_cases(rank, world, CASES_W4), order


def test_four_ranks_match_the_original_and_reduce_heads_during_backward():
    """Gradients against the original; and with W > S (groups of 2) the head reduces start inside
    backward, before the trunk's first layer has its gradient, on every member, the one without
    rows included (case ONE_ROW: a single row, so one member of one group scores it, the other none).
    overlap=False starts them after backward and ends with the same gradients."""
    results = run_ranks(_four_rank_checks, 4)
    for case, per_rank in zip(CASES_W4, zip(*[r[0] for r in results])):
        _check(per_rank, case)
    orders = [r[1] for r in results]
    for i in (1, ONE_ROW):
        for rank, order in enumerate(orders):
            (events, rows, grads), (late_events, _, late_grads) = order[(i, True)], order[(i, False)]
            assert events == ["reduce", "reduce", "trunk", "sync"], (i, rank, events)  # weight, bias
            assert late_events == ["trunk", "sync", "reduce", "reduce"], (i, rank, late_events)
            assert all(np.array_equal(a, b) for s in grads for a, b in zip(grads[s], late_grads[s]))
    rows = {rank: order[(ONE_ROW, True)][1] for rank, order in enumerate(orders)}
    assert sorted(sum(r.values()) for r in rows.values()) == [0, 0, 0, 1]  # three members without rows


def test_sub_head_gradient_is_not_divided_by_the_number_of_heads():
    """The departure this suite was written to catch: a sub head's gradient used to be the sum over
    its rows divided by the GLOBAL batch, S times smaller than the original's (lr / S on the heads)."""
    case = (4, 3, [24], False, 11, -1)
    ref = _reference(case)
    got = run_ranks(_run_cases, 1, ([case],))[0][0]
    x, sup, *_ = _case_data(*case[:5], -1)
    for s in range(4):
        share = float((sup == s).float().mean())  # about 1 / S
        old = ref["heads"][s][0] * share  # what sum-over-rows / global-batch gives
        assert _close(got["heads"][s][0], ref["heads"][s][0])
        assert not np.allclose(got["heads"][s][0], old.numpy(), atol=1e-6)


def _global_batch_steps(rank, world, cases):
    return [_distributed_step(rank, world, case, sub_grad="global_batch") for case in cases]


def test_the_ablation_scale_gives_each_sub_head_its_share_of_the_global_mean():
    """train.sub_grad=global_batch (bench/ablation.py): head s gets the original's gradient times its
    rows' share of the batch weight, sum_{i in s} w_i / sum_i w_i (the code before the fix); the trunk
    and the super head are unchanged. 2 ranks, W < S and W = S, weighted."""
    cases = [CASES_W2[0], CASES_W2[1], CASES_W2[2]]
    results = run_ranks(_global_batch_steps, 2, (cases,))
    for case, per_rank in zip(cases, zip(*results)):
        ref = _reference(case)
        _, sup, _, _, w_sub = _case_data(*case[:5], case[5])
        for r in per_rank:
            assert all(_close(a, b) for a, b in zip(r["trunk"], ref["trunk"])), case
            assert all(_close(a, b) for a, b in zip(r["super"], ref["super"])), case
            for s, grads in r["heads"].items():
                share = float(w_sub[sup == s].sum() / w_sub.sum())
                assert all(_close(a, b * share) for a, b in zip(grads, ref["heads"][s])), (case, s)


def test_head_init_default_is_nn_linears_law_and_seeded():
    """train.head_init=default draws what nn.Linear.reset_parameters draws (torch's own layer is the
    reference), from a generator keyed by (seed, head): the same values on every rank."""
    from torch import nn

    from dist_cluster.train.heads import _seeded_linear_
    torch.manual_seed(0)
    ref, ours, again = nn.Linear(256, 400), nn.Linear(256, 400), nn.Linear(256, 400)
    _seeded_linear_(ours, seed=3, index=1, init="default")
    _seeded_linear_(again, seed=3, index=1, init="default")
    assert torch.equal(ours.weight, again.weight) and torch.equal(ours.bias, again.bias)
    for got, want in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert got.abs().max() <= 256 ** -0.5 and want.abs().max() <= 256 ** -0.5
        assert abs(got.std() / want.std() - 1) < 0.1 and abs(got.mean()) < 3 * want.std() / got.numel() ** 0.5
    _seeded_linear_(ours, seed=3, index=1, init="normal")
    assert abs(ours.weight.std() - 0.01) < 1e-3 and not ours.bias.any()
