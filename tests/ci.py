"""Skips that CI must not take silently.

    skip_unless_ci("apt-get install dataset-fashion-mnist")   # skips here, fails where CI is set
    faiss = require_module("faiss")

A check that needs data or a tool this machine lacks is skipped on a laptop, but fails where the
CI environment variable is set (as CI services set it): a suite whose checks skipped for a missing
package would otherwise pass with nothing checked. tests/test_no_silent_skips.py makes every skip
in tests/ go through here, except those on hardware (CUDA: the GPU check runs them) or on a tool
being present (SLURM's srun).
"""
from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


def skip_unless_ci(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI is set: this check must run there, not skip)")
    pytest.skip(reason)


def require_module(name: str):
    """The imported module, or a skip (a failure under CI) naming it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_unless_ci(f"module {name} is not installed ({err}): bash scripts/setup.sh installs it")
