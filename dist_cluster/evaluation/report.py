"""Static HTML report of a run: RUN/report/index.html + PNGs, viewable offline.

    python -m dist_cluster.evaluation.report --run RUN --train data/fmnist/train [--checkpoint PATH] [--seed 0]

Also written by launch/eval.py. Sections (each replaced by a one-line reason when its inputs are
missing, never failing the whole report): every evaluation of the run side by side (RUN/eval.json
on its own data, RUN/eval-<name>.json on others); training curves, clustering per
round and stage wall times from RUN/metrics.jsonl; the last round's cluster sizes; galleries of
member images (largest, smallest and random clusters; images read from the train shards by key);
Grad-CAM maps of the super-class head on gallery images (cam.py says why Grad-CAM).
"""
from __future__ import annotations

import argparse
import html
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from dist_cluster.cluster.stage import last_complete_round, load_assignments
from dist_cluster.data.manifest import load_manifest
from dist_cluster.data.transforms import extract_transform
from dist_cluster.data.worker import IMAGE_EXTS
from dist_cluster.evaluation import figures
from dist_cluster.evaluation.cam import grad_cam, overlay
from dist_cluster.evaluation.evalsets import list_evaluations
from dist_cluster.evaluation.features import load_backbone, read_members
from dist_cluster.evaluation.stages import Stage
from dist_cluster.runtime.logger import read_metrics

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
         "img{image-rendering:pixelated;max-width:100%}.note{color:#777}figure{margin:0.6em 0}")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _img(path: Optional[Path], missing: str) -> str:
    return f'<img src="{html.escape(path.name)}">' if path is not None else _note(missing)


def _table(rows) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


# ---------------------------------------------------------------- sections


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _scalar_rows(evaluations: list) -> list:
    """Metric names in first-seen order: the scalar keys, then linear_by_layer[<block>]."""
    names: dict = {}
    for _, results in evaluations:
        for key, value in results.items():
            if isinstance(value, (int, float, str)) or value is None:
                names.setdefault(key, None)
    for _, results in evaluations:
        for block in results.get("linear_by_layer") or {}:
            names.setdefault(f"linear_by_layer[{block}]", None)
    return list(names)


def _value(results: dict, name: str):
    if name.startswith("linear_by_layer["):
        return (results.get("linear_by_layer") or {}).get(name[len("linear_by_layer["):-1])
    return results.get(name)


def eval_section(run_dir: Path) -> str:
    """Every evaluation of the run side by side: RUN/eval.json (own data) first, then RUN/eval-*.json."""
    evaluations = list_evaluations(run_dir)
    if not evaluations:
        return "<h2>Evaluations</h2>" + _note("no RUN/eval.json yet: run launch/eval.py")
    head = "".join(f"<th>{html.escape(stem)}.json</th>" for stem, _ in evaluations)
    body = "".join(f"<tr><td>{html.escape(name)}</td>"
                   + "".join(f"<td>{html.escape(_fmt(_value(r, name)))}</td>" for _, r in evaluations) + "</tr>"
                   for name in _scalar_rows(evaluations))
    listing = _note(f"{len(evaluations)} evaluation(s): " + "; ".join(
        f"{stem}.json = {r.get('eval_set', '?')} (train {r.get('train', '?')}, test {r.get('test', '?')})"
        for stem, r in evaluations))
    return f"<h2>Evaluations</h2>{listing}<table><tr><th>metric</th>{head}</tr>{body}</table>"


def curves_section(events: list, out: Path) -> str:
    parts = ["<h2>Training</h2>",
             _img(figures.plot_training_curves(events, out / "curves.png"), "no 'train' events in metrics.jsonl"),
             _img(figures.plot_cluster_rounds(events, out / "clustering.png"), "no k-means summary events"),
             _img(figures.plot_stage_times(events, out / "stages.png"), "no stage wall times")]
    return "".join(parts)


def sizes_section(clusters: Optional[dict], out: Path) -> str:
    if clusters is None:
        return "<h2>Clusters</h2>" + _note("no complete RUN/clusters/round_*")
    meta = clusters["meta"]
    sizes = np.asarray(meta["sub_sizes"])
    path = figures.plot_sizes(sizes, out / "sizes.png", f"round {meta['round']}: {meta['k']} sub-clusters, "
                                                        f"{meta['m']} super-clusters")
    return f"<h2>Clusters (round {meta['round']})</h2>" + _img(path, "")


def _cluster_caption(c: int, why: str, clusters: dict, labels: list, class_names: list) -> str:
    meta = clusters["meta"]
    text = f"sub-cluster {c} (super {c // (meta['k'] // meta['m'])}), {meta['sub_sizes'][c]} images, {why}"
    known = [lab for lab in labels if lab is not None]
    if known:
        top = max(set(known), key=known.count)
        name = class_names[top] if top < len(class_names) else str(top)
        text += f"; shown: {known.count(top)}/{len(known)} of class '{name}'"
    return text


def _label(member: dict) -> Optional[int]:
    try:
        return int(member["cls"].decode("ascii").strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _gallery_keys(clusters: dict, chosen: list, per_cluster: int, seed: int) -> dict:
    """{cluster: [member keys]}: a seeded sample of every chosen cluster's members."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, _ in chosen:
        members = clusters["keys"][clusters["sub"] == c]
        out[c] = sorted(rng.choice(members, min(per_cluster, len(members)), replace=False).tolist())
    return out


def gallery_section(clusters: Optional[dict], train_dir, out: Path, seed: int, shown: int, per_cluster: int):
    """(html, {key: PIL image} of the shown members, for the CAM section)."""
    if clusters is None or train_dir is None:
        return "<h2>Galleries</h2>" + _note("needs a complete clustering round and --train shards"), {}
    manifest = load_manifest(train_dir)
    sizes = np.asarray(clusters["meta"]["sub_sizes"])
    chosen = figures.choose_clusters(sizes, largest=3, smallest=3, others=max(0, shown - 6), seed=seed)
    keys = _gallery_keys(clusters, chosen, per_cluster, seed)
    members = read_members(train_dir, [k for ks in keys.values() for k in ks], set(IMAGE_EXTS) | {manifest.image_ext, "cls"})
    images, parts = {}, ["<h2>Galleries</h2>"]
    for c, why in chosen:
        found = [k for k in keys[c] if any(e in members.get(k, {}) for e in IMAGE_EXTS)]
        for key in found:
            data = next(members[key][e] for e in IMAGE_EXTS if e in members[key])
            images[key] = figures.decode_rgb(data)
        labels = [_label(members[k]) for k in found]
        path = figures.image_strip([images[k] for k in found], out / f"gallery_{c}.png")
        caption = _cluster_caption(c, why, clusters, labels, manifest.classes)
        if len(found) < len(keys[c]):
            caption += f" ({len(keys[c]) - len(found)} members not found in {train_dir})"
        parts.append(f"<figure>{_img(path, '')}<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "".join(parts), images


def _one_per_cluster(keys: list, cluster_of: dict, count: int) -> list:
    """Up to `count` keys taking one per cluster in turn, so the maps cover several clusters."""
    groups: dict = {}
    for key in keys:
        groups.setdefault(cluster_of.get(key), []).append(key)
    out = []
    for depth in range(max(map(len, groups.values()), default=0)):
        out += [g[depth] for g in groups.values() if depth < len(g)]
    return out[:count]


def cam_section(backbone, images: dict, clusters: Optional[dict], out: Path, count: int) -> str:
    """Grad-CAM of every shown image's own super-class (upright), or of the prediction when unknown."""
    if backbone is None or backbone.super_head is None:
        return "<h2>Class activation maps</h2>" + _note("needs a checkpoint with the super-class head")
    if not images or clusters is None:
        return "<h2>Class activation maps</h2>" + _note("no gallery images to show")
    d, m = backbone.cfg.data, clusters["meta"]["m"]
    assigned = dict(zip(clusters["keys"].tolist(), clusters["super"].tolist()))
    keys = _one_per_cluster(list(images), dict(zip(clusters["keys"].tolist(), clusters["sub"].tolist())), count)
    crop = v2.Compose([v2.Resize(d.resize, antialias=True), v2.CenterCrop(d.image_size)])
    normalise = extract_transform(d.resize, d.image_size)
    raw = [torch.from_numpy(np.array(images[k])).permute(2, 0, 1) for k in keys]
    device = next(backbone.trunk.parameters()).device
    batch = torch.stack([normalise(x) for x in raw]).to(device)
    targets = torch.tensor([assigned[k] for k in keys])  # super-class of rotation 0 = the super-cluster id
    if int(targets.max()) >= backbone.super_head.out_features:
        return "<h2>Class activation maps</h2>" + _note("the checkpoint's head does not match the clusters' m")
    cams, explained, predicted = grad_cam(backbone.trunk, backbone.super_head.to(device), batch, targets)
    rows = []
    for i, key in enumerate(keys):
        shown = crop(raw[i]).permute(1, 2, 0).numpy()
        heat = overlay(shown, cams[i].cpu().numpy())
        path = figures.image_strip([Image.fromarray(shown), Image.fromarray(heat)], out / f"cam_{i}.png")
        p = int(predicted[i])
        rows.append(f"<figure>{_img(path, '')}<figcaption>{html.escape(key)}: explained super-cluster "
                    f"{int(explained[i])} (upright, its assignment); head's prediction: rotation {p // m}, "
                    f"super-cluster {p % m}</figcaption></figure>")
    note = _note("Grad-CAM on the last conv block of the super-class logit 'upright, own super-cluster' "
                 "(see evaluation/cam.py)")
    return "<h2>Class activation maps</h2>" + note + "".join(rows)


# ---------------------------------------------------------------- the page


def load_last_clusters(run_dir: Path) -> Optional[dict]:
    round_dir = last_complete_round(run_dir)
    return None if round_dir is None else load_assignments(round_dir)


def write_report(run_dir, train_dir=None, backbone=None, seed: int = 0, checkpoint: Optional[str] = None,
                 clusters_shown: int = 12, per_cluster: int = 10, cam_images: int = 8) -> Path:
    """Write RUN/report/index.html and its PNGs; returns the index path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    if backbone is None:
        try:
            backbone = load_backbone(run_dir, checkpoint)
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"no backbone: {err}")
    events = read_metrics(run_dir)
    clusters = load_last_clusters(run_dir)
    with Stage("report: evaluations, training curves, cluster sizes"):
        sections = [eval_section(run_dir), curves_section(events, out), sizes_section(clusters, out)]
    with Stage("report: galleries (member images read from the train shards)"):
        gallery, images = gallery_section(clusters, train_dir, out, seed, clusters_shown, per_cluster)
    with Stage("report: class activation maps"):
        sections += [gallery, cam_section(backbone, images, clusters, out, cam_images)]
    title = f"dist_cluster report: {run_dir.resolve().name}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + _note(f"written {time.strftime('%Y-%m-%d %H:%M:%S')}; {len(events)} events")
            + "".join(_note(n) for n in notes) + "".join(sections) + "</body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--train", help="train shards, for the galleries (default: the run's data.train)")
    parser.add_argument("--checkpoint", help="weights for the CAMs (default RUN/checkpoints/last.pt)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train = args.train
    if train is None and (Path(args.run) / "config.yaml").exists():
        from omegaconf import OmegaConf
        train = OmegaConf.load(Path(args.run) / "config.yaml").data.train
    path = write_report(args.run, train, seed=args.seed, checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
