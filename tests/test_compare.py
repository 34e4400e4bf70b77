"""launch/compare.py on two small fake run directories, against the values the test wrote.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_compare.py
"""
import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dist_cluster.evaluation.compare import compare, config_differences, flatten, load_run, train_seconds

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {"mode": "deepercluster", "seed": 0, "data": {"train": "data/fmnist/train", "batch_size": 128},
          "cluster": {"k": 100, "m": 2}, "train": {"epochs": 2, "lr": 0.05}}


def _write_run(path: Path, lr: float, k: int, losses: list, seconds: dict, evals: dict) -> Path:
    path.mkdir(parents=True)
    config = json.loads(json.dumps(CONFIG))
    config["run_dir"], config["train"]["lr"], config["cluster"]["k"] = str(path), lr, k
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    events = [{"stage": "extract", "round": 0, "seconds": seconds["extract"]},
              {"stage": "pca", "round": 0, "seconds": seconds["pca"]},
              {"stage": "kmeans", "round": 0, "summary": True, "seconds_total": seconds["kmeans"]}]
    events += [{"stage": "train", "step": 10 * (i + 1), "round": 0, "loss_super": v, "loss_sub": 2 * v}
               for i, v in enumerate(losses)]
    events += [{"stage": "epoch", "round": 0, "epoch": 0, "seconds": seconds["epoch"], "loss_super": losses[-1],
                "loss_sub": 2 * losses[-1]}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for stem, results in evals.items():
        (path / f"{stem}.json").write_text(json.dumps(results))
    return path


def _results(linear, knn, nmi, layers, total):
    return {"linear_top1": linear, "knn_top1": knn, "nmi_k10": nmi, "num_classes": 10, "nmi_clusters_train": 0.5,
            "linear_by_layer": layers, "n_train": 60000, "seconds": {"total": total}}


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(tmp_path / "runs" / "a", 0.05, 100, [2.0, 1.5, 1.2], dict(extract=10, pca=1, kmeans=2, epoch=100),
                   {"eval": _results(0.8681, 0.8562, 0.5738, {"conv1": 0.81, "conv2": 0.9078}, 61.5),
                    "eval-mnist": _results(0.9512, 0.9433, 0.7011, {"conv1": 0.93, "conv2": 0.97}, 40.0)})
    b = _write_run(tmp_path / "runs" / "b", 0.1, 200, [2.5, 1.9, 1.1], dict(extract=12, pca=1.5, kmeans=3, epoch=90),
                   {"eval": _results(0.8543, 0.8401, 0.6101, {"conv1": 0.80, "conv2": 0.9011}, 58.0)})
    return a, b


def _table_rows(text: str, heading: str) -> list:
    section = text.split(f"## {heading}")[1].split("##")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_flatten_and_config_differences(two_runs):
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}
    runs = [load_run(p) for p in two_runs]
    assert config_differences(runs) == {"cluster.k": [100, 200], "train.lr": [0.05, 0.1]}  # run_dir left out
    assert train_seconds(runs[0].events) == pytest.approx(113.0)
    assert train_seconds(runs[1].events) == pytest.approx(106.5)


def test_compare_writes_the_table_the_diffs_and_self_contained_html(two_runs, tmp_path):
    a, b = two_runs
    text, md, page = compare([a, b], out=tmp_path / "out")
    assert md.read_text() == text
    rows = _table_rows(text, "Evaluations")
    assert [r[:2] for r in rows] == [[str(a), "eval"], [str(a), "eval-mnist"], [str(b), "eval"]]
    header = [c.strip() for c in text.split("## Evaluations")[1].splitlines()[2].strip("|").split("|")]
    col = {name: i for i, name in enumerate(header)}
    assert rows[0][col["linear top-1"]] == "0.8681" and rows[0][col["kNN top-1"]] == "0.8562"
    assert rows[0][col["NMI k=C"]] == "0.5738" and rows[0][col["linear conv2"]] == "0.9078"
    assert rows[1][col["linear top-1"]] == "0.9512" and rows[2][col["NMI k=C"]] == "0.6101"
    assert rows[0][col["train s"]] == "113" and rows[2][col["train s"]] == "106"  # 106.5 rounds to even
    assert rows[0][col["eval s"]] == "62" and rows[1][col["eval s"]] == "40"
    diffs = {r[0]: r[1:] for r in _table_rows(text, "Config differences")}
    assert diffs == {"cluster.k": ["100", "200"], "train.lr": ["0.05", "0.1"]}
    html = page.read_text()
    assert re.findall(r'src="([^"]*)"', html) and all(s.startswith("data:image/png;base64,")
                                                      for s in re.findall(r'src="([^"]*)"', html))
    data = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.width > 300 and image.height > 200
    for value in ("0.8681", "0.9512", "0.6101", "cluster.k"):
        assert value in html
    assert (tmp_path / "out" / "compare_curves.png").exists()


def test_compare_defaults_to_the_common_parent_and_the_command_prints(two_runs):
    a, b = two_runs
    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), str(a), str(b)], check=True,
                          capture_output=True, text=True, cwd=str(ROOT))
    assert "| run | evaluation | linear top-1" in proc.stdout and "0.8681" in proc.stdout
    assert (a.parent / "compare.md").exists() and (a.parent / "compare.html").exists()


def test_a_run_never_evaluated_still_gets_a_row(tmp_path):
    run = _write_run(tmp_path / "r", 0.05, 100, [1.0], dict(extract=1, pca=1, kmeans=1, epoch=1), {})
    text, _, _ = compare([run], out=tmp_path)
    assert _table_rows(text, "Evaluations")[0][:3] == [str(run), "(none)", "-"]
