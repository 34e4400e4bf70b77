"""One results file per evaluation set: eval.json for the run's own data, eval-<name>.json for others.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_evalsets.py
"""
import json
from types import SimpleNamespace

import pytest

from dist_cluster.data.manifest import Manifest, ShardInfo
from dist_cluster.evaluation.evalsets import check_free, clean_name, list_evaluations, manifest_set_name, result_stem


def _shards(root, name):
    root.mkdir(parents=True)
    Manifest(name=name, shards=[ShardInfo(f"{name}-000000.tar", 10)], has_labels=True).save(root)
    return root


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's config holds paths relative to where it was trained
    return SimpleNamespace(train=_shards(tmp_path / "data/fmnist/train", "fmnist-train"),
                           test=_shards(tmp_path / "data/fmnist/test", "fmnist-test"),
                           mnist_train=_shards(tmp_path / "data/mnist/train", "mnist-train"),
                           mnist_test=_shards(tmp_path / "data/mnist/test", "mnist-test"),
                           cfg=SimpleNamespace(train="data/fmnist/train", test="data/fmnist/test"))


def test_own_data_is_eval_json_whatever_the_spelling(dirs):
    assert result_stem("run", dirs.cfg, dirs.train, dirs.test) == "eval"
    assert result_stem("run", dirs.cfg, "./data/fmnist/train/", "data/../data/fmnist/test") == "eval"


def test_other_data_is_named_by_its_manifests_or_by_name(dirs):
    assert result_stem("run", dirs.cfg, dirs.mnist_train, dirs.mnist_test) == "eval-mnist"
    assert result_stem("run", dirs.cfg, dirs.train, dirs.mnist_test) == "eval-fmnist-train+mnist-test"
    assert result_stem("run", dirs.cfg, dirs.mnist_train, dirs.mnist_test, name="MNIST v2") == "eval-MNIST_v2"
    assert result_stem("run", dirs.cfg, dirs.train, dirs.test, name="probe10k") == "eval-probe10k"
    assert manifest_set_name(dirs.train, dirs.test) == "fmnist"
    assert clean_name("a/b c..d") == "a_b_c..d"
    with pytest.raises(ValueError):
        clean_name("///")


def test_a_file_of_another_pair_is_never_overwritten(dirs, tmp_path):
    path = tmp_path / "eval-mnist.json"
    check_free(path, dirs.mnist_train, dirs.mnist_test)  # absent: free
    path.write_text(json.dumps({"train": "data/mnist/train", "test": "data/mnist/test"}))
    check_free(path, dirs.mnist_train, dirs.mnist_test)  # the same pair: re-evaluation updates it
    with pytest.raises(ValueError, match="--name"):
        check_free(path, dirs.mnist_test, dirs.mnist_train)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--name"):
        check_free(path, dirs.mnist_train, dirs.mnist_test)


def test_list_evaluations_own_first_then_by_name(tmp_path):
    for stem, value in (("eval-zeta", 3), ("eval", 1), ("eval-alpha", 2)):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"linear_top1": value}))
    (tmp_path / "eval-broken.json").write_text("{")
    (tmp_path / "evaluation.json").write_text("{}")  # not an evaluation file
    assert list_evaluations(tmp_path) == [("eval", {"linear_top1": 1}), ("eval-alpha", {"linear_top1": 2}),
                                          ("eval-zeta", {"linear_top1": 3})]
