"""Scratch memmaps (extracted and whitened features): created exclusively in a private folder, never
through a planted symlink, and nothing left in cluster.memmap_dir after use or after an exception.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_scratch.py
"""
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dist_cluster.cluster import stage
from dist_cluster.cluster.extract import extract_features, feature_buffer
from dist_cluster.config import ClusterConfig
from dist_cluster.runtime import preemption
from dist_cluster.runtime.logger import MetricLogger

CPU = torch.device("cpu")


def _plant(folder, name):
    """A symlink at `name` in the shared folder, to a file another user cares about."""
    victim = folder.parent / f"victim-{name}"
    victim.write_bytes(b"precious")
    (folder / name).symlink_to(victim)
    return victim


@pytest.fixture
def shared(tmp_path):
    folder = tmp_path / "shared_tmp"
    folder.mkdir()
    return folder


def test_private_memmap_is_exclusive_private_and_leaves_nothing(shared, monkeypatch):
    from dist_cluster.runtime import scratch
    seen, real = [], np.memmap

    def spying_memmap(f, *args, **kwargs):  # what the folder and file look like while mapped
        folder = os.path.dirname(f.name)
        seen.append((stat.S_IMODE(os.stat(folder).st_mode), os.path.basename(folder), os.listdir(folder)))
        return real(f, *args, **kwargs)
    monkeypatch.setattr(scratch.np, "memmap", spying_memmap)
    array = scratch.private_memmap(shared, "x.f32", (50, 3))
    monkeypatch.undo()
    [(mode, folder_name, files)] = seen
    assert mode == 0o700 and folder_name.startswith("dist_cluster.") and files == ["x.f32"]
    assert os.listdir(shared) == []  # already gone from disk, yet usable
    array[:] = np.arange(150, dtype=np.float32).reshape(50, 3)
    assert np.array_equal(np.asarray(array), np.arange(150, dtype=np.float32).reshape(50, 3))
    # O_EXCL: a file (or symlink) already at the name is never opened, whatever the folder
    planted = shared / "fixed"
    planted.mkdir()
    victim = _plant(planted, "x.f32")
    monkeypatch.setattr(scratch.tempfile, "mkdtemp", lambda prefix, dir: str(planted))
    with pytest.raises(FileExistsError):
        scratch.private_memmap(shared, "x.f32", (50, 3))
    assert victim.read_bytes() == b"precious" and (planted / "x.f32").is_symlink()


def test_feature_buffer_ignores_a_symlink_at_the_old_name(shared):
    victim = _plant(shared, f"dist_cluster_feats.round0.rank0.{os.getpid()}.f32")
    feats, path = feature_buffer(100, 8, 0.0, str(shared), "round0")
    feats[:] = 1.0
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(shared)) == [f"dist_cluster_feats.round0.rank0.{os.getpid()}.f32"]  # only the plant


def test_whitened_buffer_ignores_a_symlink_at_the_old_name(shared):
    victim = _plant(shared, f"dist_cluster_white.round2.rank0.{os.getpid()}.f32")
    cfg = SimpleNamespace(memmap_gb=0.0, memmap_dir=str(shared))
    buf, _ = stage._whitened_buffer(100, 8, CPU, cfg, 2)
    buf[:] = 1.0
    assert victim.read_bytes() == b"precious" and len(os.listdir(shared)) == 1


class _Batches:
    def __init__(self, n_batches, fail_at=None):
        self.n, self.fail_at = n_batches, fail_at

    def __len__(self):
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in range(self.n):
            if i == self.fail_at:
                raise preemption.StopRequested("test")
            yield torch.rand(4, 3, 2, 2, generator=gen), [f"k{i}_{j}" for j in range(4)], torch.zeros(4)


def _trunk():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))


def test_extracted_features_leave_no_file_after_a_round_or_an_exception(shared):
    """The feature memmap used to stay in memmap_dir after every successful round (nobody deleted it)."""
    cfg = SimpleNamespace(memmap_gb=0.0, memmap_dir=str(shared))
    trunk = _trunk()
    feats, keys, stats = extract_features(trunk, _Batches(3), 12, 5, CPU, cfg, bf16=False)
    assert os.listdir(shared) == [] and stats["memmap"]
    with torch.no_grad():
        expected = torch.cat([trunk(images) for images, _, _ in _Batches(3)])
    assert torch.equal(feats, expected) and len(keys) == 12
    with pytest.raises(preemption.StopRequested):
        extract_features(trunk, _Batches(3, fail_at=2), 12, 5, CPU, cfg, bf16=False)
    assert os.listdir(shared) == []


def test_clustering_memmap_leaves_no_file_on_preemption(shared, tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        assert len(os.listdir(shared)) == 0  # the whitened features exist only as a mapping
        raise preemption.StopRequested("test")
    monkeypatch.setattr(stage, "hierarchical_kmeans", stopped)
    cfg = OmegaConf.structured(ClusterConfig(k=4, m=2, pca_dim=3, niter=2, memmap_gb=0.0, memmap_dir=str(shared)))
    feats = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    logger = MetricLogger(tmp_path / "run", tensorboard=False)
    try:
        with pytest.raises(preemption.StopRequested):
            stage.run_clustering(feats, np.arange(40).astype(str), cfg, 0, tmp_path / "run", logger, seed=0,
                                 device=CPU)
    finally:
        logger.close()
    assert os.listdir(shared) == []
