"""YFCC100M ingest as a job array: slices, per-task builds, and the deduplicating merge.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_ingest.py

References are independent of the code under test: the expected keys and skip counts follow from
how the metadata file and the image tree are generated here; tars are read back with tarfile.
"""
from __future__ import annotations

import bz2
import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_cluster.data.manifest import load_manifest
from shards.ingest import count_lines, duplicate_positions, main, make_slices
from shards.yfcc import YfccSource

VIDEO, BAD, MISSING, BROKEN, SMALL, DUP_ACROSS, DUP_PAIR = 3, 5, 7, 9, 11, 15, (17, 18)


def meta_line(line: int, photo_id: str, marker: str = "0") -> str:
    fields = [str(line), photo_id] + [f"f{i}" for i in range(2, 25)]
    fields[16], fields[24] = f"http://example.invalid/{photo_id}.jpg", marker
    return "\t".join(fields)


def jpeg(rng, height=20, width=30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def yfcc(tmp_path):
    """24 metadata lines (one blank) and ROOT/<id>.jpg; returns (metadata, root, expected keys, skips, bytes)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    lines, ids = [], {}
    for line in range(24):
        photo = {DUP_ACROSS: "1002", DUP_PAIR[0]: "2017", DUP_PAIR[1]: "2017"}.get(line, str(1000 + line))
        if line == BAD:
            lines.append("5\t1005\ttoo few columns")
        elif line == 20:
            lines.append("")
        else:
            lines.append(meta_line(line, photo, "1" if line == VIDEO else "0"))
            ids[line] = photo
        if line in (BAD, VIDEO, MISSING, 20) or (root / f"{photo}.jpg").exists():
            continue
        data = b"not a jpeg at all" if line == BROKEN else jpeg(rng, *((8, 8) if line == SMALL else (20, 30)))
        (root / f"{photo}.jpg").write_bytes(data)
    metadata = tmp_path / "meta.tsv"
    metadata.write_text("\n".join(lines) + "\n")
    bad_ids = {ids[VIDEO], ids[MISSING], ids[BROKEN], ids[SMALL]}
    keys = {p for p in ids.values() if p not in bad_ids}
    skipped = {"video": 1, "bad_line": 1, "missing": 1, "undecodable": 1, "too_small": 1, "duplicate": 2}
    images = {k: (root / f"{k}.jpg").read_bytes() for k in keys}
    return metadata, root, keys, skipped, images


def read_tar(path: Path) -> list[tuple[str, dict]]:
    """[(key, {ext: bytes})] per sample, a new sample whenever the key changes or an ext repeats."""
    samples = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key or ext in samples[-1][1]:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def plan_args(metadata, root, out, tasks, *extra) -> list[str]:
    return ["plan", str(metadata), "--tasks", str(tasks), "--out", str(out), "--images", str(root),
            "--shard-size", "5", "--min-side", "16", *extra]


# ------------------------------------------------------------------------------------ slices


@pytest.mark.parametrize("lines,tasks", [(24, 2), (10, 3), (10, 10), (3, 7), (0, 2), (100, 7), (1, 1)])
def test_slices_cover_every_line_exactly_once(lines, tasks):
    slices = make_slices(lines, tasks)
    assert len(slices) == tasks
    hits = np.zeros(lines, dtype=int)
    for start, stop in slices:
        assert 0 <= start <= stop <= lines
        hits[start:stop] += 1
    assert (hits == 1).all()
    assert [s[1] for s in slices[:-1]] == [s[0] for s in slices[1:]]  # contiguous, in order
    sizes = [stop - start for start, stop in slices]
    assert max(sizes) - min(sizes) <= 1


def test_sliced_sources_read_the_whole_file_once(yfcc, tmp_path):
    """Records of the slices, in order, are the records of the whole (bz2) file; skips add up."""
    metadata, root, *_ = yfcc
    packed = tmp_path / "meta.tsv.bz2"
    packed.write_bytes(bz2.compress(metadata.read_bytes()))
    lines = count_lines(packed)
    assert lines == len(metadata.read_text().splitlines()) == 24
    whole = YfccSource(str(packed), images=str(root))
    reference = [r.key for r in whole.records()]
    keys, skipped = [], Counter()
    for start, stop in make_slices(lines, 5):
        part = YfccSource(str(packed), images=str(root), start=start, limit=stop - start)
        keys += [r.key for r in part.records()]
        skipped.update(part.skipped)
    assert keys == reference and skipped == whole.skipped == Counter(video=1, bad_line=1)


# ------------------------------------------------------------------------------------ run + merge


def test_two_tasks_then_merge(yfcc, tmp_path, monkeypatch, capsys):
    metadata, root, keys, skipped, images = yfcc
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 2)) == 0
    plan = json.loads((out / "ingest_plan.json").read_text())
    assert (plan["lines"], plan["slices"]) == (24, [[0, 12], [12, 24]])
    assert main(["run", str(out), "--task-id", "0"]) == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # what a job array task sees
    assert main(["run", str(out)]) == 0
    originals = {p: p.read_bytes() for p in out.glob("part-*/*.tar")}
    assert main(["merge", str(out)]) == 0

    merged = load_manifest(out)
    seen = Counter()
    for info in merged.shards:
        samples = read_tar(out / info.name)
        assert len(samples) == info.num_samples, info.name  # the manifest's counts are the tars'
        for key, members in samples:
            seen[key] += 1
            assert members["jpg"] == images[key] and json.loads(members["json"])["photo_id"] == key
    assert dict(seen) == {k: 1 for k in keys}, "every valid photo exactly once"
    assert merged.num_samples == len(keys) and merged.skipped == skipped
    # only the shards holding a repeat were rewritten; the parts' own tars are untouched
    later = {"1002": 1, "2017": 1}  # occurrences to drop, found by reading the part tars in order
    expected_rewrites = set()
    for part in ("part-0", "part-1"):
        for info in load_manifest(out / part).shards:
            for key, _ in read_tar(out / part / info.name):
                if key in later and seen.get(f"first-{key}"):
                    expected_rewrites.add(f"{part}/dedup-{info.name}")
                seen[f"first-{key}"] = 1
    assert {s.name for s in merged.shards if "dedup-" in s.name} == expected_rewrites
    assert all(p.read_bytes() == data for p, data in originals.items())
    assert all(s.name.startswith(("part-0/", "part-1/")) for s in merged.shards)

    # resumable: the task reuses its complete shards; merging again gives the same manifest
    capsys.readouterr()
    assert main(["run", str(out), "--task-id", "0"]) == 0
    assert "reused" in capsys.readouterr().out
    first = (out / "manifest.json").read_text()
    assert main(["merge", str(out)]) == 0 and (out / "manifest.json").read_text() == first


def test_more_tasks_than_lines(yfcc, tmp_path):
    metadata, root, *_ = yfcc
    small = tmp_path / "three.tsv"
    small.write_text("\n".join(metadata.read_text().splitlines()[:3]) + "\n")  # ids 1000..1002
    out = tmp_path / "out"
    assert main(plan_args(small, root, out, 5)) == 0
    for task in range(5):
        assert main(["run", str(out), "--task-id", str(task)]) == 0
    assert main(["merge", str(out)]) == 0
    merged = load_manifest(out)
    assert sorted(k for s in merged.shards for k, _ in read_tar(out / s.name)) == ["1000", "1001", "1002"]
    assert merged.skipped == {"duplicate": 0}


def test_merge_names_the_missing_parts(yfcc, tmp_path):
    metadata, root, *_ = yfcc
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 3)) == 0
    assert main(["run", str(out), "--task-id", "0"]) == 0
    with pytest.raises(SystemExit, match=r"task ids \[1, 2\]"):
        main(["merge", str(out)])
    with pytest.raises(SystemExit, match="outside the plan"):
        main(["run", str(out), "--task-id", "3"])


def test_duplicate_positions_keep_the_first():
    ids = np.array([5, 3, 5, 7, 3, 5, 9], dtype=np.int64)
    assert duplicate_positions(ids).tolist() == [2, 4, 5]


# ------------------------------------------------------------------------------------ job array


def test_plan_submit_dry_run(yfcc, tmp_path, capsys):
    metadata, root, *_ = yfcc
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 3, "--workers", "3", "--submit", "--dry-run",
                          "--partition", "cpu", "--array-parallelism", "2")) == 0
    script = capsys.readouterr().out.splitlines()
    for expected in ("#SBATCH --array=0-2%2", "#SBATCH --cpus-per-task=3", "#SBATCH --partition=cpu",
                     "#SBATCH --ntasks-per-node=1"):
        assert expected in script
    assert not any("gpus" in line for line in script)
    assert any(line.startswith("export PYTHONPATH=") for line in script)
    assert (out / "ingest_plan.json").exists() and not list(out.glob("part-*"))


def test_plan_submit_runs_the_array_locally(yfcc, tmp_path):
    """The array through submitit's local executor: IngestTask pickles, runs, and builds each part."""
    metadata, root, keys, *_ = yfcc
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 2, "--submit", "--cluster", "local")) == 0
    deadline = time.monotonic() + 90
    while not all((out / f"part-{i}" / "manifest.json").exists() for i in range(2)):
        assert time.monotonic() < deadline, f"array tasks did not finish: {list(out.rglob('*.err'))}"
        time.sleep(0.2)
    assert main(["merge", str(out)]) == 0
    assert load_manifest(out).num_samples == len(keys)


# ------------------------------------------------------------------------------------ fetchers


def _module(tmp_path: Path, monkeypatch, name: str, text: str) -> None:
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(folder))


TREE_FETCHER = """import pathlib
def get(url):  # http://example.invalid/<id>.jpg -> ROOT/<id>.jpg: no network
    return (pathlib.Path({root!r}) / url.rsplit("/", 1)[1]).read_bytes()
"""


def test_the_fetcher_comes_from_the_task_command_line_not_the_plan(yfcc, tmp_path, monkeypatch, capsys):
    metadata, root, keys, skipped, _ = yfcc
    _module(tmp_path, monkeypatch, "treefetch_cmdline", TREE_FETCHER.format(root=str(root)))
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 2, "--layout", "url", "--fetcher", "treefetch_cmdline:get")) == 0
    assert "--fetcher treefetch_cmdline:get" in capsys.readouterr().err  # told where it must go instead
    plan_text = (out / "ingest_plan.json").read_text()
    assert "fetcher" not in json.loads(plan_text)["build"] and "treefetch" not in plan_text
    for task in ("0", "1"):
        assert main(["run", str(out), "--task-id", task, "--fetcher", "treefetch_cmdline:get"]) == 0
    assert main(["merge", str(out)]) == 0
    merged = load_manifest(out)
    assert merged.num_samples == len(keys)
    # the missing photo is now a failed fetch (FileNotFoundError in the fetcher), not a missing file
    assert merged.skipped == {**{k: v for k, v in skipped.items() if k != "missing"}, "fetch_error": 1}
    # submitted: the spec travels with the job (its command line), still not in the plan
    assert main(plan_args(metadata, root, out, 2, "--layout", "url", "--fetcher", "treefetch_cmdline:get",
                          "--submit", "--dry-run")) == 0
    assert "fetcher='treefetch_cmdline:get')" in capsys.readouterr().out
    assert "treefetch" not in (out / "ingest_plan.json").read_text()


def test_a_plan_naming_a_fetcher_is_refused_never_imported(yfcc, tmp_path, monkeypatch):
    """ingest_plan.json is data: whoever can write DIR must not make the tasks import code."""
    import sys
    metadata, root, keys, *_ = yfcc
    marker = tmp_path / "imported"
    _module(tmp_path, monkeypatch, "planted_fetcher", f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                                      f"def get(url):\n    return b''\n")
    _module(tmp_path, monkeypatch, "treefetch_plan", TREE_FETCHER.format(root=str(root)))
    out = tmp_path / "out"
    assert main(plan_args(metadata, root, out, 1, "--layout", "url")) == 0
    path = out / "ingest_plan.json"
    plan = json.loads(path.read_text())
    plan["build"]["fetcher"] = "planted_fetcher:get"
    path.write_text(json.dumps(plan))
    for extra in ([], ["--fetcher", "treefetch_plan:get"]):  # refused even when the command names one
        with pytest.raises(SystemExit, match="names a fetcher"):
            main(["run", str(out), "--task-id", "0", *extra])
    assert not marker.exists() and "planted_fetcher" not in sys.modules
    plan["build"]["fetcher"] = None  # what plans written before this change hold: accepted
    path.write_text(json.dumps(plan))
    assert main(["run", str(out), "--task-id", "0", "--fetcher", "treefetch_plan:get"]) == 0
    assert load_manifest(out / "part-0").num_samples == len(keys) + 2  # + the 2 repeats merge drops
