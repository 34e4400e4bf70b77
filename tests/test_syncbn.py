"""DistBatchNorm on CPU ranks equals BatchNorm on the concatenated batch (outputs, grads, running stats)."""
import torch
from torch import nn

from dist_cluster.runtime.syncbn import convert_sync_batchnorm
from tests.dist_utils import run_ranks

SIZES = [5, 3, 8, 4]  # unequal local batches: the count must be reduced, not assumed


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), 3, 4, 4, generator=g) * 2 + 1
    w = torch.randn(3, 1, 1, generator=g)
    return x, w


def _rank_fn(rank, world):
    x, w = _data()
    bounds = [0] + torch.tensor(SIZES[:world]).cumsum(0).tolist()
    mine = x[bounds[rank]:bounds[rank + 1]].clone().requires_grad_(True)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
    y = bn(mine)
    (y * w).pow(2).sum().backward()
    return y.detach(), mine.grad, bn[0].weight.grad, bn[0].running_mean, bn[0].running_var


def _check(world):
    x_all, w = _data()
    n = sum(SIZES[:world])
    bn = nn.BatchNorm2d(3)
    x = x_all[:n].clone().requires_grad_(True)
    y = bn(x)
    (y * w).pow(2).sum().backward()
    results = run_ranks(_rank_fn, world)
    y_d = torch.cat([r[0] for r in results])
    g_d = torch.cat([r[1] for r in results])
    torch.testing.assert_close(y_d, y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_d, x.grad, atol=1e-4, rtol=1e-4)
    # parameter grads: each rank holds its share; DDP would average them, so the sum is the reference
    torch.testing.assert_close(sum(r[2] for r in results), bn.weight.grad, atol=1e-4, rtol=1e-4)
    for r in results:
        torch.testing.assert_close(r[3], bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r[4], bn.running_var, atol=1e-5, rtol=1e-5)


def test_distbatchnorm_2_ranks():
    _check(2)


def test_distbatchnorm_4_ranks():
    _check(4)
