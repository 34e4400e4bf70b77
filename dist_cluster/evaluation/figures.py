"""The report's pictures: training curves, clustering per round, stage times, cluster sizes, galleries.

Plots use matplotlib's object API (`Figure`, Agg canvas): no pyplot global state, no display.
Each `plot_*` returns the PNG path it wrote, or None when the events it needs are absent.
"""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

TILE = 64  # gallery tile side in pixels (small images are enlarged without smoothing)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    return path


def _figure(width: float, height: float, cols: int = 1):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def plot_training_curves(events: Sequence[dict], path: Path) -> Optional[Path]:
    """Losses and accuracies of the super- and sub-class heads against the global step."""
    train = [e for e in events if e.get("stage") == "train" and "step" in e]
    if not train:
        return None
    steps = [e["step"] for e in train]
    fig, (ax_loss, ax_acc) = _figure(10, 3.5, cols=2)
    for key in ("loss_super", "loss_sub"):
        ax_loss.plot(steps, [e.get(key, np.nan) for e in train], label=key)
    for key in ("acc_super", "acc_sub"):
        ax_acc.plot(steps, [e.get(key, np.nan) for e in train], label=key)
    for round_start in _round_starts(train):
        for ax in (ax_loss, ax_acc):
            ax.axvline(round_start, color="grey", lw=0.5, ls=":")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="training loss (dotted: new clustering)")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="training accuracy", ylim=(0, 1))
    ax_loss.legend(), ax_acc.legend()
    return _save(fig, path)


def _round_starts(train: Sequence[dict]) -> list:
    return [b["step"] for a, b in zip(train, train[1:]) if b.get("round") != a.get("round")]


def kmeans_summaries(events: Sequence[dict]) -> list[dict]:
    """The per-round clustering summaries (not the per-iteration events), in round order."""
    return sorted((e for e in events if e.get("stage") == "kmeans" and e.get("summary")), key=lambda e: e.get("round", 0))


def plot_cluster_rounds(events: Sequence[dict], path: Path) -> Optional[Path]:
    """Per round: NMI with the previous round's clusters, and min / median / max cluster size."""
    summaries = kmeans_summaries(events)
    if not summaries:
        return None
    rounds = [e.get("round", i) for i, e in enumerate(summaries)]
    fig, (ax_nmi, ax_size) = _figure(10, 3.5, cols=2)
    nmi = [e.get("nmi_prev") if isinstance(e.get("nmi_prev"), (int, float)) else np.nan for e in summaries]
    ax_nmi.plot(rounds, nmi, "o-")
    ax_nmi.set(xlabel="round", ylabel="NMI", title="NMI(round r-1, round r) sub-clusters", ylim=(0, 1), xticks=rounds)
    for key in ("size_min", "size_median", "size_max"):
        ax_size.plot(rounds, [max(e.get(key, np.nan), 0.5) for e in summaries], "o-", label=key)
    ax_size.set(xlabel="round", ylabel="images", title="sub-cluster sizes", yscale="log", xticks=rounds)
    ax_size.legend()
    return _save(fig, path)


def stage_seconds(events: Sequence[dict]) -> dict:
    """{stage: {round: wall seconds}}: extract, pca, cluster (k-means total), epoch (summed per round)."""
    table: dict = defaultdict(lambda: defaultdict(float))
    for e in events:
        stage, r = e.get("stage"), e.get("round", 0)
        if stage == "kmeans" and e.get("summary") and isinstance(e.get("seconds_total"), (int, float)):
            table["cluster"][r] += e["seconds_total"]
        elif stage in ("extract", "pca", "epoch") and isinstance(e.get("seconds"), (int, float)):
            table["train" if stage == "epoch" else stage][r] += e["seconds"]
    return {stage: dict(per_round) for stage, per_round in table.items()}


def plot_stage_times(events: Sequence[dict], path: Path) -> Optional[Path]:
    """Stacked bars: wall time of every stage, per round."""
    table = stage_seconds(events)
    if not table:
        return None
    rounds = sorted({r for per_round in table.values() for r in per_round})
    fig, (ax,) = _figure(6, 3.5)
    bottom = np.zeros(len(rounds))
    for stage, per_round in table.items():
        values = np.array([per_round.get(r, 0.0) for r in rounds])
        ax.bar(rounds, values, bottom=bottom, label=stage)
        bottom += values
    ax.set(xlabel="round", ylabel="seconds (rank 0)", title="stage wall times", xticks=rounds)
    ax.legend()
    return _save(fig, path)


def plot_sizes(sizes: np.ndarray, path: Path, title: str) -> Path:
    """Cluster sizes sorted (log scale, empty clusters shown at 0.5) and their histogram."""
    fig, (ax_sorted, ax_hist) = _figure(10, 3.5, cols=2)
    ordered = np.sort(sizes)[::-1]
    ax_sorted.plot(np.arange(len(ordered)), np.maximum(ordered, 0.5))
    ax_sorted.set(xlabel="cluster rank", ylabel="images", yscale="log", title=title)
    ax_hist.hist(sizes, bins=min(50, max(5, len(sizes) // 2)))
    ax_hist.set(xlabel="images per cluster", ylabel="clusters", title=f"{(sizes == 0).sum()} empty of {len(sizes)}")
    return _save(fig, path)


# ---------------------------------------------------------------- galleries


def choose_clusters(sizes: np.ndarray, largest: int, smallest: int, others: int, seed: int) -> list[tuple[int, str]]:
    """(cluster id, why shown): the largest, the smallest non-empty, and a seeded random sample."""
    order = np.argsort(-sizes, kind="stable")
    nonempty = order[sizes[order] > 0]
    chosen = [(int(c), "largest") for c in nonempty[:largest]]
    chosen += [(int(c), "smallest") for c in nonempty[::-1][:smallest] if int(c) not in dict(chosen)]
    rest = np.array([c for c in nonempty if int(c) not in dict(chosen)], dtype=np.int64)
    if len(rest) and others > 0:
        picks = np.random.default_rng(seed).choice(rest, min(others, len(rest)), replace=False)
        chosen += [(int(c), "random") for c in np.sort(picks)]
    return chosen


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def tile(image: Image.Image, side: int = TILE) -> Image.Image:
    """A side x side tile: enlarged without smoothing (small images) or shrunk, aspect kept, centred."""
    scale = side / max(image.size)
    resample = Image.NEAREST if scale > 1 else Image.BILINEAR
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def image_strip(images: Sequence[Image.Image], path: Path, side: int = TILE, gap: int = 2) -> Path:
    """One row of tiles (a cluster's members) as a PNG."""
    strip = Image.new("RGB", (max(1, len(images)) * (side + gap) - gap, side), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(tile(image, side), (i * (side + gap), 0))
    strip.save(path, format="PNG")
    return path


# ---------------------------------------------------------------- several runs (compare.py)


def plot_runs_curves(runs: dict, path: Path) -> Optional[Path]:
    """Every run's training losses on shared axes: per logged step ('train' events, top) and per epoch
    ('epoch' events: the epoch's mean, bottom); `runs` is {label: events}. None if no run has any."""
    if not any(e.get("stage") in ("train", "epoch") for events in runs.values() for e in events):
        return None
    fig, axes = _figure_grid(11, 7, rows=2, cols=2)
    for label, events in runs.items():
        train = [e for e in events if e.get("stage") == "train" and "step" in e]
        epochs = [e for e in events if e.get("stage") == "epoch"]
        for col, key in enumerate(("loss_super", "loss_sub")):
            line, = axes[0][col].plot([e["step"] for e in train], [e.get(key, np.nan) for e in train], label=label)
            axes[1][col].plot(np.arange(1, len(epochs) + 1), [e.get(key, np.nan) for e in epochs], "o-",
                              color=line.get_color(), label=label)
    for col, key in enumerate(("loss_super", "loss_sub")):
        axes[0][col].set(xlabel="step", ylabel="cross-entropy", title=f"{key} per logged step")
        axes[1][col].set(xlabel="epoch", ylabel="cross-entropy", title=f"{key}, epoch mean")
        axes[1][col].xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        for row in (0, 1):
            axes[row][col].legend(fontsize="small")
    return _save(fig, path)


def _figure_grid(width: float, height: float, rows: int, cols: int):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(rows, cols, squeeze=False)
