"""A reused run_dir never mixes runs: the config is compared with the one inside the checkpoint
before any work; keys that change results fail, named with both values, and leave config.yaml as it
was; the keys of config.RESUMABLE_KEYS may change and are logged (`config_change`).

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_resume_config.py
"""
from __future__ import annotations

import shutil
import signal

import pytest
import torch
from omegaconf import OmegaConf

from dist_cluster.config import RESUMABLE_KEYS, Config, ConfigError, load_config, resume_changes
from tests.dist_utils import run_ranks
from tests.shard_fixtures import make_shards

BASE = ["data.batch_size=32", "data.num_workers=0", "data.max_samples=48", "data.image_size=28", "data.resize=28",
        "model.sobel=false", "model.feature_dim=16", "cluster.k=8", "cluster.m=2", "cluster.pca_dim=8",
        "cluster.niter=3", "train.reassign=1", "train.ckpt_every_steps=0", "train.log_every_steps=1"]
CHANGED = {"cluster.k": (8, 4), "train.lr": (0.05, 0.1)}  # and data.train: the other shard folder


def _config(run_dir, shards, *more):
    return load_config(None, [*BASE, f"run_dir={run_dir}", f"data.train={shards}", "train.epochs=1", *more])


# ---------------------------------------------------------------- the comparison


def test_every_resumable_key_exists():
    keys = set(_flat_keys(OmegaConf.to_container(OmegaConf.structured(Config))))
    assert set(RESUMABLE_KEYS) <= keys
    assert not {"data.num_workers", "data.shuffle_buffer", "train.lr", "cluster.k", "seed"} & set(RESUMABLE_KEYS)


def _flat_keys(node, prefix=""):
    for k, v in node.items():
        yield from _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def test_keys_that_change_results_are_named_with_both_values(tmp_path):
    saved = OmegaConf.to_yaml(_config(tmp_path, "/data/a"))
    new = _config(tmp_path / "moved", "/data/b", "cluster.k=4", "train.lr=0.1", "train.epochs=3", "dist.timeout_s=60",
                  "data.num_workers=1")
    with pytest.raises(ConfigError) as err:
        resume_changes(saved, new)
    message = str(err.value)
    for line in ("cluster.k: 8 in the checkpoint, 4 now", "train.lr: 0.05 in the checkpoint, 0.1 now",
                 "data.train: '/data/a' in the checkpoint, '/data/b' now", "data.num_workers: 0 in the checkpoint, 1 now"):
        assert line in message
    assert "train.epochs:" not in message and "dist.timeout_s:" not in message
    allowed = _config(tmp_path / "moved", "/data/a", "train.epochs=3", "dist.timeout_s=60")
    assert sorted(resume_changes(saved, allowed)) == [("dist.timeout_s", 600, 60), ("run_dir", str(tmp_path),
                                                                                    str(tmp_path / "moved")),
                                                      ("train.epochs", 1, 3)]


@pytest.mark.parametrize("progress, epochs, why", [
    (dict(round=2, epoch=2, step=0, phase="cluster"), 1, "below the 2 epochs"),
    (dict(round=1, epoch=1, step=2, phase="train"), 1, "below the 2 epochs"),  # mid-epoch 2
    (dict(round=2, epoch=3, step=0, phase="cluster"), 5, "its last round ended early, after epoch 3"),
])
def test_train_epochs_moves_only_where_the_rounds_allow(progress, epochs, why, tmp_path):
    saved = OmegaConf.to_yaml(_config(tmp_path, "/d", "train.epochs=3", "train.reassign=2"))
    with pytest.raises(ConfigError, match=f"config key 'train.epochs': {epochs} .*{why}"):
        resume_changes(saved, _config(tmp_path, "/d", f"train.epochs={epochs}", "train.reassign=2"), progress)
    finished_even = dict(round=2, epoch=4, step=0, phase="cluster")  # 4 epochs in 2 full rounds: extensible
    saved = OmegaConf.to_yaml(_config(tmp_path, "/d", "train.epochs=4", "train.reassign=2"))
    assert resume_changes(saved, _config(tmp_path, "/d", "train.epochs=6", "train.reassign=2"), finished_even)


# ---------------------------------------------------------------- through rounds.train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_shards(root / "a", 2, 48, size=28).root, make_shards(root / "b", 2, 48, size=28).root


def _state(run_dir):
    from dist_cluster.runtime.logger import read_metrics
    return (run_dir / "config.yaml").read_bytes(), len(read_metrics(run_dir)), \
        sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _train(rank, world, run_dir, shards):
    from dist_cluster.run.rounds import train
    train(_config(run_dir, shards))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run on 2 ranks, through rounds.train."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_ranks(_train, 2, (run_dir, data[0]), timeout=300)
    return run_dir


@pytest.fixture
def keep_usr2():
    handler = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, handler)  # train() installs the preemption handler first


def test_other_keys_fail_before_any_work_naming_both_values(finished, data, keep_usr2):
    """In this process: rounds.train refuses before torch.distributed (and before the loader, the
    model, config.yaml, metrics.jsonl)."""
    from dist_cluster.run.rounds import train
    shards, other = data
    before = _state(finished)
    for key, (old, new) in {**CHANGED, "data.train": (str(shards), str(other))}.items():
        with pytest.raises(ConfigError) as err:
            train(_config(finished, shards, f"{key}={new}"))
        assert f"{key}: {old!r} in the checkpoint, {new!r} now" in str(err.value)
    with pytest.raises(ConfigError) as err:  # all at once: every key listed
        train(_config(finished, other, "cluster.k=4", "train.lr=0.1"))
    assert all(f"{key}: " in str(err.value) for key in ("cluster.k", "train.lr", "data.train"))
    assert not torch.distributed.is_initialized() and _state(finished) == before


def test_launch_train_names_the_keys_and_exits_2(finished, data, capsys):
    from launch.train import main
    before = _state(finished)
    with pytest.raises(SystemExit) as stop:
        main([*BASE, f"run_dir={finished}", f"data.train={data[0]}", "train.epochs=1", "cluster.k=4"])
    assert stop.value.code == 2 and "cluster.k: 8 in the checkpoint, 4 now" in capsys.readouterr().err
    assert not torch.distributed.is_initialized() and _state(finished) == before


def _extend(rank, world, run_dir, shards):
    """Run itself refuses too (for callers that skip train()); then train.epochs=2 extends the run."""
    from dist_cluster.run.rounds import Run, train
    from dist_cluster.runtime.logger import read_metrics
    try:
        Run(_config(run_dir, shards, "cluster.k=4")).run()
        refused = None
    except ConfigError as err:
        refused = str(err)
    train(_config(run_dir, shards, "train.epochs=2"))
    return refused, [e["epoch"] for e in read_metrics(run_dir, "epoch")], read_metrics(run_dir, "config_change")


def test_train_epochs_extends_a_finished_run_and_is_logged(finished, data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    for refused, epochs, changes in run_ranks(_extend, 2, (run_dir, data[0]), timeout=300):
        assert "cluster.k: 8 in the checkpoint, 4 now" in refused  # before a tensor size mismatch
        assert epochs == [0, 1]  # the extension trained epoch 1, once
        assert [(c["key"], c["old"], c["new"]) for c in changes] == [  # the copied run_dir: moved
            ("run_dir", str(finished), str(run_dir)), ("train.epochs", 1, 2)]
    assert OmegaConf.load(run_dir / "config.yaml").train.epochs == 2
