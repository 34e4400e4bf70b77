"""YFCC100M at scale: one metadata file, T job-array tasks, one merged shard directory.

    python shards/ingest.py plan yfcc100m_dataset.bz2 --tasks 200 --out /data/yfcc \
        --images /data/yfcc_zips --layout zip --workers 8 --min-side 64 --max-side 512
    python shards/ingest.py plan ... --submit --partition cpu --time 600 [--dry-run]   # the job array
    python shards/ingest.py run /data/yfcc --task-id 17        # or from SLURM_ARRAY_TASK_ID
    python shards/ingest.py merge /data/yfcc

plan   counts the metadata lines once and writes DIR/ingest_plan.json: T contiguous slices
       [start, stop) covering every line exactly once (empty slices when T > lines), and every
       build option (the same options as `shards/build.py yfcc`), so `run` needs only DIR and I,
       except --fetcher: the plan holds data, never code (whoever can write DIR must not choose
       what the tasks import), so a custom fetcher is given on each task's own command line,
       `run DIR --fetcher module:function`; a plan naming one is refused.
       --submit sends `run` for every task as one submitit job array (--dry-run prints it); the
       --fetcher of the `plan` command then travels with the submitted job, not in the plan.
run    builds slice I into DIR/part-<I>/ (yfcc-<I>-NNNNNN.tar + manifest.json) with shards.build;
       running it again reuses the complete shards, so a requeued or repeated task resumes.
       Undecodable, missing, too small (--min-side) images are counted in the part's manifest.
merge  drops repeated photo ids across all parts, keeping the first (in part, shard, sample order),
       rewrites only the shards holding a dropped sample, as part-<I>/dedup-<shard>.tar (the part's
       own files stay as build() wrote them, so `run` still reuses them), and writes
       DIR/manifest.json listing `part-<I>/<shard>` names with the summed skip counts of all parts
       plus `duplicate`. Memory: 12 bytes per sample (photo id + shard index), sized from the parts'
       manifests, plus the sort (about 1.2 GB + 0.8 GB for 96M images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_cluster.data.manifest import Manifest, ShardInfo, load_manifest  # noqa: E402
from dist_cluster.run.slurm import ResumableJob  # noqa: E402
from shards.build import load_fetcher, url_fetcher  # noqa: E402
from shards.build import parse_args as build_parse_args
from shards.images import ImageSettings  # noqa: E402
from shards.pipeline import BuildReport, build  # noqa: E402
from shards.sources import BuildError  # noqa: E402
from shards.writer import sample_key  # noqa: E402
from shards.yfcc import YfccColumns, YfccSource, open_text  # noqa: E402

PLAN_FILE = "ingest_plan.json"
DEDUP_PREFIX = "dedup-"
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- plan


def count_lines(metadata: str | Path) -> int:
    """Lines as YfccSource reads them (text mode, decompressed), so slices match its records."""
    with open_text(Path(metadata)) as lines:
        return sum(1 for _ in lines)


def make_slices(lines: int, tasks: int) -> list[tuple[int, int]]:
    """T contiguous [start, stop) slices of 0..lines, sizes within one of each other."""
    if tasks < 1 or lines < 0:
        raise BuildError(f"--tasks must be >= 1 (got {tasks}) and lines >= 0 (got {lines})")
    bounds = [i * lines // tasks for i in range(tasks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def write_plan(out_dir: str | Path, build_args: argparse.Namespace, tasks: int) -> dict:
    """Count the metadata once and write DIR/ingest_plan.json; returns the plan."""
    if build_args.layout in ("tree", "zip") and not (build_args.images and Path(build_args.images).is_dir()):
        raise BuildError(f"--images ROOT (an existing folder) is required for layout {build_args.layout!r}")
    metadata = Path(build_args.metadata).resolve()
    if not metadata.is_file():
        raise BuildError(f"YFCC metadata file {metadata} not found")
    lines = count_lines(metadata)
    if build_args.limit is not None:
        lines = min(lines, build_args.limit)
    options = dict(vars(build_args), metadata=str(metadata), out=str(Path(out_dir).resolve()),
                   images=str(Path(build_args.images).resolve()) if build_args.images else None)
    options.pop("fetcher", None)  # code is named on the tasks' command lines only (module docstring)
    plan = {"metadata": str(metadata), "lines": lines, "tasks": tasks, "slices": make_slices(lines, tasks),
            "name": build_args.name or "yfcc", "build": options}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, out / PLAN_FILE)
    return plan


def load_plan(out_dir: str | Path) -> dict:
    path = Path(out_dir) / PLAN_FILE
    if not path.exists():
        raise BuildError(f"{path} not found: run `python shards/ingest.py plan METADATA --tasks T --out {out_dir}`")
    plan = json.loads(path.read_text())
    named = plan.get("build", {}).pop("fetcher", None)  # null in plans written before: harmless
    if named:  # refused, not ignored: a plan that names code was written by an old version or tampered with
        raise BuildError(f"{path} names a fetcher ({named!r}): a plan never chooses code to import. Remove "
                         f"the key and pass `--fetcher {named}` to each `shards/ingest.py run` if you trust it")
    return plan


# ----------------------------------------------------------------------------- run


def slice_source(options: argparse.Namespace, start: int, stop: int, fetcher: Optional[str] = None) -> YfccSource:
    """fetcher: module:function from the task's command line (never from the plan)."""
    columns = YfccColumns(options.col_line, options.col_photo_id, options.col_url, options.col_marker)
    return YfccSource(options.metadata, images=options.images, layout=options.layout, columns=columns,
                      fetch=url_fetcher(options, fetcher), limit=stop - start, start=start,
                      fetch_workers=getattr(options, "fetch_workers", 1))


def _empty_part(part: Path, name: str, settings: ImageSettings, skipped: dict, source: dict) -> Manifest:
    """A part whose slice holds no line, or only skipped ones: a manifest without shards."""
    part.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(name=name, shards=[], image_ext=settings.image_ext, skipped=dict(sorted(skipped.items())),
                        source=source)
    manifest.save(part)
    return manifest


def run_task(out_dir: str | Path, task_id: int, workers: Optional[int] = None,
             fetcher: Optional[str] = None) -> Manifest:
    """Build slice `task_id` of the plan into DIR/part-<task_id>/ (complete shards are reused);
    fetcher: the task's --fetcher module:function (layout url), else the built-in fetcher."""
    plan = load_plan(out_dir)
    if not 0 <= task_id < plan["tasks"]:
        raise BuildError(f"--task-id {task_id} is outside the plan's 0..{plan['tasks'] - 1}")
    options = argparse.Namespace(**plan["build"])
    start, stop = plan["slices"][task_id]
    part, name = Path(out_dir) / f"part-{task_id}", f"{plan['name']}-{task_id}"
    settings = ImageSettings(image_ext=options.reencode or YfccSource.image_ext, reencode=bool(options.reencode),
                             max_side=options.max_side, min_side=options.min_side, jpeg_quality=options.jpeg_quality)
    described = {"type": "yfcc", "metadata": plan["metadata"], "slice": [start, stop]}
    if stop == start:
        return _empty_part(part, name, settings, {}, described)
    source = slice_source(options, start, stop, fetcher)
    try:
        report: BuildReport = build(source, part, name=name, shard_size=options.shard_size, settings=settings,
                                    workers=workers or options.workers)
    except BuildError as err:
        if not str(err).startswith("no samples to write"):  # pipeline.build's words for an empty source
            raise
        return _empty_part(part, name, settings, dict(source.skipped), {**source.describe(), "slice": [start, stop]})
    print(f"part {task_id} (lines {start}..{stop}): {report.summary()}", flush=True)
    return report.manifest


class IngestTask(ResumableJob):
    """One array task: `run DIR --task-id I [--fetcher F]`; a requeue re-runs it, reusing the complete
    shards. The fetcher spec is the submitting command's, carried by the job, not by the plan."""

    def __init__(self, out_dir: str, workers: Optional[int] = None, fetcher: Optional[str] = None):
        self.out_dir, self.workers, self.fetcher = out_dir, workers, fetcher

    def __call__(self, task_id: int) -> int:
        manifest = run_task(self.out_dir, int(task_id), self.workers, self.fetcher)
        return manifest.num_samples


# ----------------------------------------------------------------------------- merge


def sample_members(path: Path) -> list[list[tarfile.TarInfo]]:
    """The members of each sample of a tar, in order. A sample is a run of members with one key;
    a key that repeats right after itself (the same photo written twice) starts a new sample
    when a member extension repeats."""
    samples: list[list[tarfile.TarInfo]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = sample_key(member.name), member.name.split(".", 1)[-1]
            current = samples[-1] if samples else None
            if current is None or sample_key(current[0].name) != key or \
                    ext in {m.name.split(".", 1)[-1] for m in current}:
                samples.append([member])
            else:
                current.append(member)
    return samples


def photo_id(key: str, where: str) -> int:
    if not (key.isdigit() and len(key) <= 18):  # fits int64
        raise BuildError(f"{where}: sample key {key!r} is not a YFCC photo id; merge deduplicates photo ids")
    return int(key)


def duplicate_positions(ids: np.ndarray) -> np.ndarray:
    """Sorted positions of every repeat of an id (its first position is kept)."""
    order = np.argsort(ids, kind="stable")  # stable: among equal ids, earlier positions first
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[1:] = ids[order][1:] == ids[order][:-1]
    return np.sort(order[repeat])


def rewrite_without(src: Path, dst: Path, drop: set[int]) -> int:
    """Copy the tar `src` to `dst` without the samples at positions `drop` (atomic); returns samples kept."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    kept = 0
    with tarfile.open(src) as tar_in, tarfile.open(tmp, "w") as tar_out:
        for position, members in enumerate(sample_members(src)):
            if position in drop:
                continue
            for member in members:
                tar_out.addfile(member, tar_in.extractfile(member))
            kept += 1
    os.replace(tmp, dst)
    return kept


@dataclass
class MergeReport:
    manifest: Manifest
    duplicates: int
    rewritten: list  # relative names of the dedup- shards written


def _load_parts(out: Path, tasks: int) -> list[tuple[int, Manifest]]:
    parts, missing = [], []
    for task_id in range(tasks):
        try:
            parts.append((task_id, load_manifest(out / f"part-{task_id}")))
        except FileNotFoundError:
            missing.append(task_id)
    if missing:
        raise BuildError(f"{len(missing)} of {tasks} parts are not built (no manifest.json): task ids "
                         f"{missing[:20]}{' ...' if len(missing) > 20 else ''}; run `python shards/ingest.py run "
                         f"{out} --task-id I` for each, or submit them again")
    return parts


def merge(out_dir: str | Path) -> MergeReport:
    """Deduplicate photo ids across the parts and write DIR/manifest.json (see the module doc)."""
    out = Path(out_dir)
    plan = load_plan(out)
    parts = _load_parts(out, plan["tasks"])
    exts = {m.image_ext for _, m in parts if m.shards}
    if len(exts) > 1:
        raise BuildError(f"parts store different image formats {sorted(exts)}: rebuild them with one --reencode")
    total = sum(m.num_samples for _, m in parts)
    ids, shard_of = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int32)
    shards, position = [], 0  # (part id, shard name, samples, first position)
    for task_id, manifest in parts:
        for info in manifest.shards:
            rel = f"part-{task_id}/{info.name}"
            keys = [sample_key(s[0].name) for s in sample_members(out / rel)]
            if len(keys) != info.num_samples:
                raise BuildError(f"{rel} holds {len(keys)} samples but part {task_id}'s manifest says "
                                 f"{info.num_samples}: run that task again")
            ids[position:position + len(keys)] = [photo_id(k, rel) for k in keys]
            shard_of[position:position + len(keys)] = len(shards)
            shards.append((task_id, info.name, len(keys), position))
            position += len(keys)
    dropped = duplicate_positions(ids)
    drops_per_shard: dict[int, set[int]] = {}
    for pos in dropped.tolist():
        drops_per_shard.setdefault(int(shard_of[pos]), set()).add(pos - shards[int(shard_of[pos])][3])

    infos, rewritten = [], []
    for index, (task_id, name, count, _) in enumerate(shards):
        rel = f"part-{task_id}/{name}"
        if index in drops_per_shard:
            rel = f"part-{task_id}/{DEDUP_PREFIX}{name}"
            count = rewrite_without(out / f"part-{task_id}" / name, out / rel, drops_per_shard[index])
            rewritten.append(rel)
        if count:
            infos.append(ShardInfo(rel, count))
    for stale in out.glob(f"part-*/{DEDUP_PREFIX}*.tar"):  # from an earlier merge of other parts
        if f"{stale.parent.name}/{stale.name}" not in rewritten:
            stale.unlink()

    skipped = Counter()
    for _, manifest in parts:
        skipped.update(manifest.skipped)
    skipped["duplicate"] = len(dropped)
    manifest = Manifest(name=plan["name"], shards=infos, has_labels=False, image_ext=exts.pop() if exts else "jpg",
                        skipped=dict(sorted(skipped.items())),
                        source={"type": "yfcc-ingest", "metadata": plan["metadata"], "lines": plan["lines"],
                                "tasks": plan["tasks"], "duplicates_dropped": len(dropped),
                                "rewritten": rewritten, "build": parts[0][1].source.get("build", {})})
    manifest.save(out)
    return MergeReport(manifest, len(dropped), rewritten)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="count lines, write DIR/ingest_plan.json [and submit the array]",
                          epilog="Every other option goes to `shards/build.py yfcc` (--out, --images, --layout, "
                                 "--workers, --shard-size, --min-side, --max-side, --reencode, --col-*, ...).")
    plan.add_argument("metadata", help="yfcc100m_dataset file (plain, .bz2 or .gz)")
    plan.add_argument("--tasks", type=int, required=True, help="number of array tasks (slices)")
    plan.add_argument("--submit", action="store_true", help="submit `run` for every task as one job array")
    plan.add_argument("--dry-run", action="store_true", help="with --submit: print the sbatch script only")
    plan.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    plan.add_argument("--partition")
    plan.add_argument("--time", type=int, default=720, help="minutes per task")
    plan.add_argument("--cpus-per-task", type=int, help="default: --workers")
    plan.add_argument("--mem-gb", type=float)
    plan.add_argument("--account")
    plan.add_argument("--qos")
    plan.add_argument("--constraint")
    plan.add_argument("--array-parallelism", type=int, default=64, help="tasks running at once")
    run = sub.add_parser("run", help="build one slice into DIR/part-<I>/")
    run.add_argument("dir")
    run.add_argument("--task-id", type=int, help="default: $SLURM_ARRAY_TASK_ID")
    run.add_argument("--workers", type=int, help="override the plan's --workers")
    run.add_argument("--fetcher", help="module:function fetching the URLs of layout url (default: the built-in "
                                       "fetcher with the plan's limits); never read from the plan")
    merge_cmd = sub.add_parser("merge", help="deduplicate photo ids, write DIR/manifest.json")
    merge_cmd.add_argument("dir")
    return parser.parse_known_args(argv)


def submit_array(plan: dict, args: argparse.Namespace, workers: int, fetcher: Optional[str] = None) -> None:
    """`run` for every task id as one submitit job array (printed only with --dry-run)."""
    from dist_cluster.run import slurm
    out = plan["build"]["out"]
    # the job unpickles shards.ingest.IngestTask: the checkout must be importable there
    setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]
    params = slurm.slurm_parameters(
        nodes=1, gpus_per_node=0, time_min=args.time, cpus_per_task=args.cpus_per_task or workers,
        mem_gb=args.mem_gb, partition=args.partition, constraint=args.constraint, account=args.account,
        qos=args.qos, job_name="yfcc-ingest", setup=setup, array_parallelism=args.array_parallelism)
    folder = str(Path(out) / "submitit" / "%j")
    if args.dry_run:
        print(slurm.render_sbatch(folder, params, array_size=plan["tasks"]))
        print(f"# job: shards.ingest.IngestTask({out!r}, fetcher={fetcher!r})(task_id) "
              f"for task_id in 0..{plan['tasks'] - 1}")
        return
    executor = slurm.make_executor(folder, params, cluster=args.cluster)
    jobs = executor.map_array(IngestTask(out, fetcher=fetcher), list(range(plan["tasks"])))
    print(f"submitted {len(jobs)} tasks ({jobs[0].job_id} ...), logs in {folder}; then: "
          f"python shards/ingest.py merge {out}")


def task_id_from(args: argparse.Namespace) -> int:
    if args.task_id is not None:
        return args.task_id
    if os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
        return int(os.environ["SLURM_ARRAY_TASK_ID"])
    raise BuildError("--task-id is required outside a SLURM job array (no SLURM_ARRAY_TASK_ID)")


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    if rest and args.command != "plan":
        sys.exit(f"error: unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "plan":
            build_args = build_parse_args(["yfcc", args.metadata, *rest])
            if build_args.fetcher:
                load_fetcher(build_args.fetcher)  # fail now, not in every task; this command line is trusted
            plan = write_plan(build_args.out, build_args, args.tasks)
            sizes = [stop - start for start, stop in plan["slices"]]
            print(f"{plan['lines']} metadata lines in {plan['tasks']} slices of {min(sizes)}-{max(sizes)} lines "
                  f"-> {Path(build_args.out) / PLAN_FILE}")
            if args.submit:
                submit_array(plan, args, build_args.workers, build_args.fetcher)
            elif build_args.fetcher:
                print(f"note: --fetcher is not stored in the plan: pass `--fetcher {build_args.fetcher}` to "
                      f"every `shards/ingest.py run`", file=sys.stderr)
        elif args.command == "run":
            manifest = run_task(args.dir, task_id_from(args), args.workers, args.fetcher)
            print(f"part-{task_id_from(args)}: {manifest.num_samples} samples, skipped {manifest.skipped}")
        else:
            report = merge(args.dir)
            m = report.manifest
            print(f"merged {m.source['tasks']} parts: {m.num_samples} samples in {len(m.shards)} shards, dropped "
                  f"{report.duplicates} duplicates ({len(report.rewritten)} shards rewritten), skipped "
                  f"{m.skipped} -> {Path(args.dir) / 'manifest.json'}")
    except (BuildError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    return 0


if __name__ == "__main__":
    main()
