"""Where an evaluation's results go: one file per evaluation set, never one over another.

    stem = result_stem(run_dir, cfg.data, train_dir, test_dir, name=None)   # 'eval' or 'eval-<name>'
    check_free(run_dir / f"{stem}.json", train_dir, test_dir)               # before any work
    for stem, results in list_evaluations(run_dir): ...                     # eval first, then eval-*

RUN/eval.json holds the evaluation on the run's own data (its config's data.train / data.test, the
default of launch/eval.py); any other labelled train/test pair (a transfer evaluation) goes to
RUN/eval-<name>.json, the name given by --name or else taken from the shards' manifests ('fmnist-train'
and 'fmnist-test' give 'fmnist'). An existing eval-<name>.json of another pair is never replaced:
the evaluation stops before extracting and asks for a --name. Re-evaluating the same pair updates
its file (a re-run of the Quickstart re-evaluates).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from dist_cluster.data.manifest import load_manifest

OWN = "eval"


def _same_dir(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def is_own_data(cfg_data, train_dir, test_dir) -> bool:
    """The run's own data: train and test are the directories of its config's data.train / data.test."""
    return _same_dir(train_dir, cfg_data.train) and _same_dir(test_dir, cfg_data.test)


def clean_name(name: str) -> str:
    """A name usable in a file name: letters, digits and . _ + - (runs of others become _)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._+-")
    if not cleaned:
        raise ValueError(f"evaluation set name {name!r} has no letter or digit")
    return cleaned


def manifest_set_name(train_dir, test_dir) -> str:
    """The words ('-', '_', '.' apart) the two manifests' names start with, else 'train+test'."""
    train, test = load_manifest(train_dir).name, load_manifest(test_dir).name
    common = []
    for a, b in zip(re.split(r"[-_.]", train), re.split(r"[-_.]", test)):
        if a != b:
            break
        common.append(a)
    return clean_name("-".join(common) if train != test and common else f"{train}+{test}")


def result_stem(run_dir, cfg_data, train_dir, test_dir, name: Optional[str] = None) -> str:
    """'eval' for the run's own data without --name, else 'eval-<name>' (module doc)."""
    if name:
        return f"{OWN}-{clean_name(name)}"
    if is_own_data(cfg_data, train_dir, test_dir):
        return OWN
    return f"{OWN}-{manifest_set_name(train_dir, test_dir)}"


def check_free(path: Path, train_dir, test_dir) -> None:
    """ValueError if `path` holds the results of another train/test pair (it would be overwritten)."""
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} exists and is not valid JSON: move it away or pass --name") from None
    old_train, old_test = old.get("train_dir", old.get("train")), old.get("test_dir", old.get("test"))
    if not (_same_dir(old_train, train_dir) and _same_dir(old_test, test_dir)):
        raise ValueError(f"{path} holds the evaluation on --train {old_train} --test {old_test}; this one "
                         f"(--train {train_dir} --test {test_dir}) would overwrite it: pass --name NAME "
                         f"to write {path.parent}/{OWN}-NAME.json")


def list_evaluations(run_dir) -> list[tuple[str, dict]]:
    """[(stem, results)] of RUN/eval.json first, then every RUN/eval-*.json by name; unreadable files skipped."""
    run_dir = Path(run_dir)
    paths = [run_dir / f"{OWN}.json"] + sorted(run_dir.glob(f"{OWN}-*.json"))
    out = []
    for path in paths:
        try:
            out.append((path.stem, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out
