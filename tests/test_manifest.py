"""The reader no longer trusts the manifest: schema errors name the file and field, shard names stay
inside the folder, a missing shard fails before training, a short shard fails the epoch.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_manifest.py
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dist_cluster.config import ConfigError, load_config, validate_against_data
from dist_cluster.data.loader import ShardLoader
from dist_cluster.data.manifest import ManifestError, load_manifest
from dist_cluster.data.worker import ShortShardError
from tests.shard_fixtures import make_shards, truncate_file

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@pytest.fixture
def shards(tmp_path):
    """4 shards x 20 samples of 8 px."""
    return make_shards(tmp_path / "shards", 4, 20, size=8)


def _edit_manifest(root: Path, edit) -> Path:
    path = root / "manifest.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path


def _collect_keys(loader) -> list[str]:
    return [k for _, keys, _ in loader for k in keys]


# ---------------------------------------------------------------- schema


def _set(path: str, value):
    """An edit that sets record[...] along `path` ('shards.1.num_samples'); value None deletes."""
    def edit(record):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            record = record[part]
        if value is None:
            del record[last]
        else:
            record[last] = value
    return edit


@pytest.mark.parametrize("edit, field, why", [
    (_set("shards", None), "shards", "missing"),
    (_set("shards.1.num_samples", None), "shards[1].num_samples", "missing"),
    (_set("shards.1.num_samples", -3), "shards[1].num_samples", "integer >= 0"),
    (_set("shards.1.num_samples", "12"), "shards[1].num_samples", "integer >= 0"),
    (_set("shards.1.num_samples", True), "shards[1].num_samples", "integer >= 0"),
    (_set("shards.1.num_samples", 1.5), "shards[1].num_samples", "integer >= 0"),
    (_set("shards.0.name", "../other/x.tar"), "shards[0].name", "leaves the shard folder"),
    (_set("shards.0.name", "a/../../x.tar"), "shards[0].name", "leaves the shard folder"),
    (_set("shards.0.name", "/etc/passwd"), "shards[0].name", "leaves the shard folder"),
    (_set("shards.0.name", ""), "shards[0].name", "non-empty string"),
    (_set("shards.0.size", 3), "shards[0].size", "unknown field"),
    (_set("shards.0", "x.tar"), "shards[0]", "must be an object"),
    (_set("has_labels", "yes"), "has_labels", "must be a bool"),
    (_set("shard", []), "shard", "unknown field"),
    (_set("num_samples", 800), "num_samples", "800, but the shards' counts sum to 80"),
])
def test_schema_errors_name_the_file_and_the_field(shards, edit, field, why):
    path = _edit_manifest(shards.root, edit)
    with pytest.raises(ManifestError, match=re.escape(f"{path}: {field}: ") + f".*{why}"):
        load_manifest(shards.root)


def test_duplicate_names_and_invalid_json(shards):
    path = _edit_manifest(shards.root, lambda r: r["shards"][2].update(name=r["shards"][0]["name"]))
    with pytest.raises(ManifestError, match=re.escape(f"{path}: shards[2].name: ") + ".*listed twice"):
        load_manifest(shards.root)
    path.write_text('{"name": "x", "shards": [')
    with pytest.raises(ManifestError, match=re.escape(f"{path}: not valid JSON")):
        load_manifest(shards.root)
    path.write_text("[]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        load_manifest(shards.root)


def test_valid_manifests_load(shards):
    assert load_manifest(shards.root) == shards.manifest  # what the builders write
    _edit_manifest(shards.root, _set("shards.0.name", "part-0/x.tar"))  # shards/ingest.py's layout
    assert load_manifest(shards.root).shards[0].name == "part-0/x.tar"


# ---------------------------------------------------------------- missing shards


def test_missing_shard_fails_before_training(shards):
    missing = shards.shard_path(2)
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing.name)):
        ShardLoader(shards.root, 0, 1, 4, 2)
    with pytest.raises(FileNotFoundError, match=f"1 shard.*{re.escape(missing.name)}"):
        shards.manifest.check_files(shards.root)
    cfg = load_config(SMOKE, [f"data.train={shards.root}", "cluster.k=16"])
    with pytest.raises(ConfigError, match=f"data.train.*{re.escape(missing.name)}"):
        validate_against_data(cfg)


# ---------------------------------------------------------------- short shards


def _over_count(shards, index: int, count: int) -> None:
    """The manifest lists `count` samples for a shard that holds 20."""
    def edit(record):
        record["shards"][index]["num_samples"] = count
        record["num_samples"] = sum(s["num_samples"] for s in record["shards"])
    _edit_manifest(shards.root, edit)


@pytest.mark.parametrize("workers", [0, 2])
def test_over_counting_manifest_fails_the_epoch_naming_the_shard(shards, workers):
    _over_count(shards, 1, 200)
    name = re.escape(shards.manifest.shards[1].name)
    extract = ShardLoader(shards.root, 0, 1, 4, workers, None, shuffle=False, equal_steps=False)
    with pytest.raises(ShortShardError, match=f"{name}: 20 complete samples where the manifest promises 200"):
        _collect_keys(extract)  # raised in a worker, re-raised here by the DataLoader
    train = ShardLoader(shards.root, 0, 1, 4, workers, None, equal_steps=True, shuffle_buffer=8)
    with pytest.raises(ShortShardError, match=f"{name}.*data.allow_short_shards"):
        _collect_keys(train)


def test_cut_tar_fails_the_epoch_naming_the_shard(shards):
    truncate_file(shards.shard_path(3), 0.5)
    loader = ShardLoader(shards.root, 0, 1, 4, 2, None, shuffle=False, equal_steps=False)
    with pytest.raises(ShortShardError, match=re.escape(shards.manifest.shards[3].name)):
        _collect_keys(loader)


def test_allow_short_shards_counts_and_goes_on(shards):
    _over_count(shards, 1, 200)
    loader = ShardLoader(shards.root, 0, 1, 4, 2, None, shuffle=False, equal_steps=False,
                         allow_short_shards=True)
    assert sorted(_collect_keys(loader)) == sorted(shards.keys)
    assert (loader.stats["truncated_shards"], loader.stats["lost_truncated"]) == (1, 180)
    assert load_config(SMOKE, ["data.allow_short_shards=true"]).data.allow_short_shards
