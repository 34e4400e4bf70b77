"""bench/ranks.py: results come back in rank order; a rank that raises or dies fails the benchmark
at once (with its error or exit code) instead of leaving the parent waiting."""
import os
import time

import pytest

from bench.ranks import run_ranks


def _square(rank, offset):
    return rank * rank + offset


def _raise_on_rank1(rank):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    time.sleep(60)  # the healthy rank would outlive the test if the parent waited for it


def _die_on_rank0(rank):
    if rank == 0:
        os._exit(7)  # no traceback, no result: what an OOM kill or a segfault looks like
    time.sleep(60)


def test_results_in_rank_order():
    assert run_ranks(_square, 3, (10,)) == [10, 11, 14]


@pytest.mark.parametrize("target, message", [(_raise_on_rank1, "rank 1 failed: ValueError"),
                                             (_die_on_rank0, r"died without a result .*\(0, 7\)")])
def test_a_failing_rank_fails_fast(target, message):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        run_ranks(target, 2, ())
    assert time.monotonic() - start < 30  # not the sleeping rank's 60 s, not the 3600 s timeout
