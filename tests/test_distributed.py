"""The runtime module: rank detection, ownership for any W against the number of items, groups."""
import itertools
import random

import pytest
import torch
import torch.distributed as dist

from dist_cluster.runtime import distributed
from dist_cluster.runtime.distributed import detect_ranks, first_slurm_host, imbalance, ownership
from tests.dist_utils import run_ranks


def test_detect_ranks_torchrun_slurm_single():
    assert detect_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[012-015]", "SLURM_JOB_ID": "4242"}
    assert detect_ranks(slurm) == (5, 16, 1)
    assert slurm["MASTER_ADDR"] == "gpu012" and slurm["MASTER_PORT"] == str(20000 + 4242)
    single = {}
    assert detect_ranks(single) == (0, 1, 0) and "MASTER_PORT" in single


def test_first_slurm_host():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[1-3,8],b2") == "a1"


def test_ownership_covers_every_item_and_rank():
    for items in range(1, 9):
        for world in range(1, 9):
            owners = ownership(items, world)
            assert len(owners) == items and all(owners)
            assert sorted({r for o in owners for r in o}) == list(range(world))
            if world >= items:  # disjoint groups, sizes within one of each other
                flat = [r for o in owners for r in o]
                assert sorted(flat) == list(range(world))
                assert max(map(len, owners)) - min(map(len, owners)) <= 1


def _best_max_rows_per_rank(loads, world):
    """Brute force over every split of `world` ranks into len(loads) groups of >= 1: the smallest
    possible largest rows-per-rank (the reference D'Hondt must reach)."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, world), len(loads) - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (world,))]
        best = min(best, max(load / size for load, size in zip(loads, sizes)))
    return best


def test_ownership_by_rows_minimises_the_busiest_rank():
    rng = random.Random(0)
    for _ in range(200):
        items, world = rng.randint(1, 5), rng.randint(1, 9)
        loads = [rng.choice([0, 1, 3, 10, 40]) + rng.random() for _ in range(items)]
        owners = ownership(items, world, loads)
        assert len(owners) == items and all(owners)
        assert sorted({r for o in owners for r in o}) == list(range(world))
        if world >= items:  # contiguous disjoint groups, the busiest rank as light as possible
            assert [r for o in owners for r in o] == list(range(world))
            worst = max(load / len(o) for load, o in zip(loads, owners))
            assert worst == pytest.approx(_best_max_rows_per_rank(loads, world))
        else:  # LPT: one owner each, the busiest rank within Graham's 4/3 of the best assignment
            assert all(len(o) == 1 for o in owners)
            per_rank = [sum(l for l, o in zip(loads, owners) if o == [r]) for r in range(world)]
            best = min(max(sum(l for l, r in zip(loads, a) if r == q) for q in range(world))
                       for a in itertools.product(range(world), repeat=items))
            assert max(per_rank) <= 4 / 3 * best + 1e-9
    assert ownership(3, 4, [5, 5, 5]) == ownership(3, 4)  # equal rows: the even split
    assert ownership(2, 4, [30, 10]) == [[0, 1, 2], [3]]
    assert imbalance(ownership(2, 4), [30, 10], 4) == pytest.approx(1.5)  # the static split: 15 vs 10
    assert imbalance(ownership(2, 4, [30, 10]), [30, 10], 4) == pytest.approx(1.0)


def _group_cache_evicts(rank, world):
    """Three partitions through a cache of two: the oldest is destroyed, the live ones still reduce."""
    cache = distributed.GroupCache(capacity=2)
    partitions = [ownership(2, world), ownership(2, world, [3, 1]), ownership(2, world, [1, 3])]
    sums = []
    for owners in partitions:
        for ranks, group in zip(owners, cache.groups(owners)):
            if group is not None:
                t = torch.tensor([float(rank)])
                dist.all_reduce(t, group=group)
                sums.append(t.item())
    first_again = cache.groups(partitions[0])  # evicted: rebuilt, and it works
    mine = [g for g in first_again if g is not None]
    t = torch.ones(1)
    dist.all_reduce(t, group=mine[0])
    return sums, len(cache), t.item()


def test_group_cache_keeps_the_latest_partitions():
    results = run_ranks(_group_cache_evicts, 4)
    assert [r[0] for r in results] == [[1.0, 3.0, 0.0], [1.0, 3.0, 6.0], [5.0, 3.0, 6.0], [5.0, 3.0, 6.0]]
    assert all(r[1] == 2 and r[2] == 2.0 for r in results)


def _groups_allreduce(rank, world):
    groups = distributed.new_groups(ownership(2, world))
    out = []
    for ranks, group in zip(ownership(2, world), groups):
        if group is not None:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            out.append(t.item())
    return out


def test_subgroup_allreduce_4_ranks():
    results = run_ranks(_groups_allreduce, 4)
    assert results == [[1.0], [1.0], [5.0], [5.0]]


def _init_in_attempt(rank, port, attempt, queue):
    """One rank of torchrun attempt `attempt`: the agent's store, no prefix of torchrun's own."""
    import os
    import time
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                      TORCHELASTIC_RESTART_COUNT=str(attempt))
    time.sleep(1.5 * rank)  # rank 0 publishes its address and reads rank 1's before rank 1 rewrites it
    try:
        distributed.init(backend="gloo", timeout_s=20, device="cpu")
        t = torch.ones(1)
        dist.all_reduce(t)
        queue.put((rank, t.item()))
        distributed.shutdown()
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, repr(err)[:300]))


def test_torchrun_restart_attempts_do_not_read_each_others_addresses():
    """torchrun keeps one store for all attempts of a run (TORCHELASTIC_USE_AGENT_STORE): attempt 1
    must not connect to the addresses attempt 0 published there (the restart hang of kill -9)."""
    import queue as queue_module

    import torch.multiprocessing as mp
    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    for attempt in range(2):
        results = ctx.Queue()
        procs = [ctx.Process(target=_init_in_attempt, args=(r, agent_store.port, attempt, results))
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            got = dict(results.get(timeout=60) for _ in procs)
        except queue_module.Empty:
            got = "no answer within 60 s (blocked in init_process_group)"
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        assert got == {0: 2.0, 1: 2.0}, f"attempt {attempt}: {got}"
