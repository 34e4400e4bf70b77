"""Runs side by side: their evaluations, training times, config differences and training curves.

    python launch/compare.py RUN [RUN ...] [--out DIR]
    python launch/compare.py bench/runs/*            # after bench/quality.py or a sweep

Prints the tables and writes DIR/compare.md (+ DIR/compare_curves.png) and DIR/compare.html (the
same, self-contained: the figure inline as base64 PNG). DIR defaults to the runs' common parent.
Per run directory (config.yaml, metrics.jsonl, and RUN/eval*.json once evaluated):
  evaluations  one row per evaluation of a run (eval.json on its own data, eval-<name>.json on others):
               linear top-1, kNN top-1, NMI k=C, the linear probe of every conv block, the train and
               eval wall times (train: the stage times in metrics.jsonl: extract, PCA, k-means, epochs)
  config       the keys (flattened: train.lr) whose values differ between the runs' config.yaml;
               run_dir is left out (it is the row's name)
  curves       loss_super and loss_sub per logged step and per epoch, every run on the same axes
"""
from __future__ import annotations

import argparse
import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dist_cluster.config import flatten
from dist_cluster.evaluation.evalsets import list_evaluations
from dist_cluster.evaluation.figures import plot_runs_curves, stage_seconds
from dist_cluster.runtime.logger import read_metrics

MISSING = "-"


@dataclass
class Run:
    label: str  # the path as given
    config: dict  # flattened config.yaml ({} when absent)
    events: list  # metrics.jsonl
    evaluations: list  # [(stem, results)] from evalsets.list_evaluations


def load_run(path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run directory")
    config = {}
    if (path / "config.yaml").exists():
        from omegaconf import OmegaConf
        config = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True))
    return Run(str(path).rstrip("/") or str(path), config, read_metrics(path), list_evaluations(path))


def config_differences(runs: Sequence[Run]) -> dict:
    """{key: [value per run]} for every key whose value is not the same in all runs (absent: MISSING)."""
    keys = sorted({k for run in runs for k in run.config} - {"run_dir"})
    table = {k: [run.config.get(k, MISSING) for run in runs] for k in keys}
    return {k: values for k, values in table.items() if len({repr(v) for v in values}) > 1}


def train_seconds(events: list) -> Optional[float]:
    """Sum of the stage wall times of a run (extract, PCA, k-means, epochs); None without any."""
    table = stage_seconds(events)
    return sum(t for per_round in table.values() for t in per_round.values()) if table else None


def _layers(runs: Sequence[Run]) -> list:
    seen: dict = {}
    for run in runs:
        for _, results in run.evaluations:
            seen.update(dict.fromkeys(results.get("linear_by_layer") or {}))
    return list(seen)


def evaluation_rows(runs: Sequence[Run]) -> tuple[list, list]:
    """(header, rows): one row per (run, evaluation); a run never evaluated gets one row of MISSING."""
    layers = _layers(runs)
    header = ["run", "evaluation", "linear top-1", "kNN top-1", "NMI k=C", "NMI own clusters",
              *[f"linear {name}" for name in layers], "train images", "train s", "eval s"]
    rows = []
    for run in runs:
        train_s = train_seconds(run.events)
        for stem, r in run.evaluations or [("(none)", {})]:
            k = r.get("num_classes", r.get("kmeans_k"))
            by_layer = r.get("linear_by_layer") or {}
            seconds = r.get("seconds") or {}
            eval_s = seconds.get("total")
            rows.append([run.label, stem, r.get("linear_top1"), r.get("knn_top1"), r.get(f"nmi_k{k}"),
                         r.get("nmi_clusters_train"), *[by_layer.get(name) for name in layers], r.get("n_train"),
                         train_s, eval_s])
    return header, rows


def _cell(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows])


def _diff_rows(runs: Sequence[Run], diffs: dict) -> tuple[list, list]:
    # config values as written (str), not rounded like the metrics
    return ["key", *[run.label for run in runs]], [[key, *map(str, values)] for key, values in diffs.items()]


def write_markdown(path: Path, runs: Sequence[Run], curves: Optional[Path]) -> str:
    """DIR/compare.md; returns its text (also what the command prints)."""
    header, rows = evaluation_rows(runs)
    diffs = config_differences(runs)
    parts = ["# Runs compared", "", "## Evaluations", "", markdown_table(header, rows), "", "## Config differences", ""]
    parts.append(markdown_table(*_diff_rows(runs, diffs)) if diffs else "(the configs are identical, run_dir aside)")
    parts += ["", "## Training curves", "", f"![training curves]({curves.name})" if curves else "(no training events)"]
    text = "\n".join(parts) + "\n"
    path.write_text(text)
    return text


def _html_table(header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(path: Path, runs: Sequence[Run], curves: Optional[Path]) -> Path:
    """DIR/compare.html, self-contained: the curves inline as a base64 PNG."""
    from dist_cluster.evaluation.report import STYLE
    diffs = config_differences(runs)
    figure = "<p>no training events</p>"
    if curves is not None:
        data = base64.b64encode(curves.read_bytes()).decode("ascii")
        figure = f'<img alt="training curves" src="data:image/png;base64,{data}">'
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Runs compared</title><style>{STYLE}</style>"
            f"</head><body><h1>Runs compared</h1><h2>Evaluations</h2>{_html_table(*evaluation_rows(runs))}"
            f"<h2>Config differences</h2>"
            + (_html_table(*_diff_rows(runs, diffs)) if diffs else "<p>the configs are identical, run_dir aside</p>")
            + f"<h2>Training curves</h2>{figure}</body></html>")
    path.write_text(page)
    return path


def default_out(paths: Sequence) -> Path:
    """The runs' common parent directory (the current one when they share none)."""
    parents = [str(Path(p).resolve().parent) for p in paths]
    common = Path(os.path.commonpath(parents)) if parents else Path.cwd()
    return common if common != Path(common.anchor) else Path.cwd()


def compare(paths: Sequence, out: Optional[Path] = None) -> tuple[str, Path, Path]:
    """(markdown text, compare.md, compare.html) for the run directories `paths`."""
    runs = [load_run(p) for p in paths]
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_runs_curves({run.label: run.events for run in runs}, out / "compare_curves.png")
    text = write_markdown(out / "compare.md", runs, curves)
    return text, out / "compare.md", write_html(out / "compare.html", runs, curves)


def main(argv=None) -> tuple[str, Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", help="where compare.md / compare.html go (default: the runs' common parent)")
    args = parser.parse_args(argv)
    text, md, page = compare(args.runs, args.out)
    print(text)
    print(f"wrote {md} and {page}")
    return text, md, page
