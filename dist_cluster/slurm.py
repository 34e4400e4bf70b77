"""Alias of dist_cluster.run.slurm, for one release (remove after 2027-03): jobs queued with submitit
before the re-layout of 2026-12-04 pickled `dist_cluster.slurm.Trainer` and unpickle it by that name.
The same module object is registered under both names, so a job (or a test's monkeypatch) sees one
module, never a copy (tests/test_layout.py loads such a pickle).
"""
import sys

from dist_cluster.run import slurm as _slurm

sys.modules[__name__] = _slurm
