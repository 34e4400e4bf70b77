"""DistBatchNorm on CPU ranks equals BatchNorm on the concatenated batch (outputs, input and
parameter grads, running stats): torch's own nn.BatchNorm on one process is the reference.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_syncbn.py
"""
import pytest
import torch
from torch import nn

from dist_cluster.runtime.syncbn import DistBatchNorm, convert_sync_batchnorm
from tests.dist_utils import run_ranks

SIZES = [5, 3, 8, 4]  # unequal local batches: the count must be reduced, not assumed
CASES = {  # name: (per-sample shape, offset, scale, affine, channels_last)
    "2d": ((3, 4, 4), 1.0, 2.0, True, False),
    "2d channels_last": ((3, 4, 4), 1.0, 2.0, True, True),
    "1d (the feature layer)": ((6,), 0.5, 1.0, True, False),
    "offset 1000, std 0.5": ((3, 4, 4), 1000.0, 0.5, True, False),  # float32 E[x^2] - E[x]^2 would fail
    "no affine": ((3, 4, 4), -2.0, 3.0, False, False),
}


def _data(case):
    shape, offset, scale, _, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), *shape, generator=g, dtype=torch.float64).float() * scale + offset
    w = torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g)
    u = torch.randn(sum(SIZES), *shape, generator=g)  # a linear term: sum(dy) is not ~0
    return x, (w, u)


def _bn(case):
    shape, _, _, affine, _ = CASES[case]
    return (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(shape[0], affine=affine)


def _layout(x, case):
    return x.contiguous(memory_format=torch.channels_last) if CASES[case][4] else x


def _rank_fn(rank, world, case):
    x, (w, u) = _data(case)
    bounds = [0] + torch.tensor(SIZES[:world]).cumsum(0).tolist()
    u = u[bounds[rank]:bounds[rank + 1]]
    mine = _layout(x[bounds[rank]:bounds[rank + 1]].clone(), case).requires_grad_(True)
    bn = convert_sync_batchnorm(nn.Sequential(_bn(case)), torch.device("cpu"))
    assert isinstance(bn[0], DistBatchNorm)
    for _ in range(2):  # twice: the running statistics' momentum is applied step after step
        mine.grad = None
        bn.zero_grad()
        y = bn(mine)
        ((y * w).pow(2) + y * u).sum().backward()
    grads = (bn[0].weight.grad, bn[0].bias.grad) if bn[0].affine else (None, None)
    return y.detach(), mine.grad, grads, bn[0].running_mean, bn[0].running_var


def _check(world, case):
    x_all, (w, u) = _data(case)
    n = sum(SIZES[:world])
    u = u[:n]
    bn = _bn(case).double()  # the reference in float64, from the same float32 inputs
    x = _layout(x_all[:n].double(), case).requires_grad_(True)
    w, u = w.double(), u.double()
    for _ in range(2):
        x.grad = None
        bn.zero_grad()
        y = bn(x)
        ((y * w).pow(2) + y * u).sum().backward()
    results = run_ranks(_rank_fn, world, args=(case,))
    _, offset, scale, _, _ = CASES[case]
    # float32 arithmetic on x ~ offset carries |offset| * 1.2e-7 of rounding, / std in y
    slack = max(1.0, 8 * 1.2e-7 * abs(offset) / scale / 1e-5)
    tol = dict(atol=1e-4 * slack, rtol=1e-4 * slack, check_dtype=False)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), y.detach(), atol=1e-5 * slack, rtol=1e-5,
                               check_dtype=False)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x.grad, **tol)
    if bn.affine:  # each rank holds its share; DDP would average them, so the sum is the reference
        torch.testing.assert_close(sum(r[2][0] for r in results), bn.weight.grad, **tol)
        torch.testing.assert_close(sum(r[2][1] for r in results), bn.bias.grad, **tol)
    for r in results:
        torch.testing.assert_close(r[3], bn.running_mean, atol=1e-5, rtol=1e-5, check_dtype=False)
        torch.testing.assert_close(r[4], bn.running_var, atol=1e-5, rtol=1e-5, check_dtype=False)


@pytest.mark.parametrize("case", list(CASES))
def test_distbatchnorm_2_ranks(case):
    _check(2, case)


def test_distbatchnorm_4_ranks():
    _check(4, "2d")
