"""The runtime module: rank detection, ownership for any W against the number of items, groups."""
import torch
import torch.distributed as dist

from dist_cluster import distributed
from dist_cluster.distributed import detect_ranks, first_slurm_host, ownership
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
