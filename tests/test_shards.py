"""Shard builders: every source round-trips through tar files read back with plain tarfile.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_shards.py

References are independent of the builder: pixels generated here with numpy (or parsed from the
IDX files with numpy), PIL for decoding, tarfile/webdataset for reading.
"""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shards.sources
import shards.yfcc
from dist_cluster.data.manifest import load_manifest
from shards import FMNIST_CLASSES, path_to_key, zip_location
from shards.build import main as build_main
from tests.ci import skip_unless_ci

REPO = Path(__file__).resolve().parent.parent
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------ helpers
def read_dir(out_dir: Path) -> tuple[dict, dict]:
    """({key: {ext: bytes}}, {shard name: [keys]}) read with tarfile; every key must occur once."""
    manifest = load_manifest(out_dir)
    samples, per_shard = {}, {}
    for shard in manifest.shards:
        keys = []
        with tarfile.open(out_dir / shard.name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if key not in keys:
                    assert key not in samples, f"key {key} in two shards"
                    keys.append(key)
                    samples[key] = {}
                assert ext not in samples[key], f"{member.name} twice"
                samples[key][ext] = tar.extractfile(member).read()
        assert len(keys) == shard.num_samples
        per_shard[shard.name] = keys
    assert sum(len(k) for k in per_shard.values()) == manifest.num_samples
    return samples, per_shard


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def random_image(rng, height=20, width=30, channels=3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """A small Fashion-MNIST in the Debian package's file layout."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 37, dtype=np.uint8)
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root, images, labels


def run_build(*args) -> None:
    assert build_main([str(a) for a in args]) == 0


# ------------------------------------------------------------------------------------- fmnist
def test_fmnist_round_trip(fake_fmnist, tmp_path):
    root, images, labels = fake_fmnist
    out = tmp_path / "out"
    run_build("fmnist", "--split", "train", "--out", out, "--fmnist-dir", root, "--limit", 23, "--shard-size", 10)
    manifest = load_manifest(out)
    assert [s.name for s in manifest.shards] == [f"fmnist-train-00000{i}.tar" for i in range(3)]
    assert [s.num_samples for s in manifest.shards] == [10, 10, 3]
    assert manifest.has_labels and manifest.classes == FMNIST_CLASSES and manifest.image_ext == "png"
    samples, _ = read_dir(out)
    assert sorted(samples) == [f"fmnist-train-{i:08d}" for i in range(23)]
    for i in range(23):
        sample = samples[f"fmnist-train-{i:08d}"]
        assert Image.open(io.BytesIO(sample["png"])).mode == "L"
        np.testing.assert_array_equal(pixels(sample["png"]), images[i])  # lossless
        assert int(sample["cls"]) == labels[i]
        assert json.loads(sample["json"])["label_name"] == FMNIST_CLASSES[labels[i]]


def test_fmnist_class_subset_is_relabelled_in_the_given_order(fake_fmnist, tmp_path):
    """--classes 7,2: only those images, labelled 0 (class 7) and 1 (class 2), names kept: the
    transfer protocol's pre-training and evaluation sets."""
    root, images, labels = fake_fmnist
    out = tmp_path / "subset"
    run_build("fmnist", "--split", "train", "--out", out, "--fmnist-dir", root, "--classes", "7,2")
    manifest = load_manifest(out)
    assert manifest.classes == [FMNIST_CLASSES[7], FMNIST_CLASSES[2]]
    samples, _ = read_dir(out)
    kept = [i for i in range(len(labels)) if labels[i] in (7, 2)]
    assert sorted(samples) == [f"fmnist-train-{i:08d}" for i in kept] and manifest.num_samples == len(kept)
    for i in kept:
        sample = samples[f"fmnist-train-{i:08d}"]
        np.testing.assert_array_equal(pixels(sample["png"]), images[i])
        assert int(sample["cls"]) == (0 if labels[i] == 7 else 1)
        assert json.loads(sample["json"])["label_name"] == FMNIST_CLASSES[labels[i]]
    with pytest.raises(SystemExit, match="distinct class ids"):
        run_build("fmnist", "--split", "train", "--out", tmp_path / "bad", "--fmnist-dir", root, "--classes", "3,3")


def test_fmnist_real_files_via_script(tmp_path):
    """The real command line (python shards/build.py), compared with a numpy parse of the IDX files."""
    if not REAL_FMNIST.exists():
        skip_unless_ci(f"{REAL_FMNIST} is missing: apt-get install dataset-fashion-mnist")
    out = tmp_path / "real"
    done = subprocess.run([sys.executable, "shards/build.py", "fmnist", "--split", "test", "--out", str(out),
                           "--limit", "40", "--shard-size", "16"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "written 40, skipped {}, shards 3" in done.stdout
    with gzip.open(REAL_FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        reference = np.frombuffer(f.read(16 + 40 * 784), np.uint8, offset=16).reshape(40, 28, 28)
    with gzip.open(REAL_FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        reference_labels = np.frombuffer(f.read(8 + 40), np.uint8, offset=8)
    samples, _ = read_dir(out)
    for i in range(40):
        np.testing.assert_array_equal(pixels(samples[f"fmnist-test-{i:08d}"]["png"]), reference[i])
        assert int(samples[f"fmnist-test-{i:08d}"]["cls"]) == reference_labels[i]


def test_fmnist_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.sources, "FMNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(SystemExit) as exit_info:
        build_main(["fmnist", "--split", "train", "--out", str(tmp_path / "out")])
    assert "apt-get install dataset-fashion-mnist" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_webdataset_reads_the_shards(fake_fmnist, tmp_path):
    import webdataset as wds
    root, images, labels = fake_fmnist
    run_build("fmnist", "--split", "test", "--out", tmp_path / "o", "--fmnist-dir", root, "--shard-size", 16)
    urls = load_manifest(tmp_path / "o").shard_paths(tmp_path / "o")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls")
    got = {key: (np.asarray(image), label) for key, image, label in dataset}
    assert len(got) == len(images)
    for i, (image, label) in enumerate(zip(images, labels)):
        np.testing.assert_array_equal(got[f"fmnist-test-{i:08d}"][0], image)
        assert got[f"fmnist-test-{i:08d}"][1] == label


# ------------------------------------------------------------------------------------- folder
def make_tree(root: Path, rng) -> dict:
    """Two classes (created out of order), nested folders, dotted names, bad files; {relpath: array}."""
    good = {}
    for rel, fmt in [("zebra/a.png", "PNG"), ("zebra/sub/b.v2.png", "PNG"), ("ant/c.png", "PNG"),
                     ("ant/deep/er/d.jpg", "JPEG"), ("ant/e.png", "PNG")]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = random_image(rng)
        path.write_bytes(encode(array, fmt))
        good[rel] = array
    jpeg = encode(random_image(rng, 64, 64), "JPEG")
    (root / "ant/truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (root / "zebra/garbage.png").write_bytes(b"not an image at all")
    (root / "zebra/notes.txt").write_text("ignored: not an image extension")
    (root / "zebra/.hidden.png").write_bytes(b"ignored: hidden")
    return good


def test_folder_with_labels(tmp_path):
    rng = np.random.default_rng(1)
    good = make_tree(tmp_path / "src", rng)
    out = tmp_path / "out"
    run_build("folder", tmp_path / "src", "--labels", "--out", out, "--shard-size", 3)
    manifest = load_manifest(out)
    assert manifest.classes == ["ant", "zebra"] and manifest.has_labels
    assert manifest.image_ext == "png"  # the majority format, kept lossless
    assert manifest.skipped == {"undecodable": 2}
    assert manifest.num_samples == len(good)
    samples, _ = read_dir(out)
    assert sorted(samples) == sorted(path_to_key(rel) for rel in good)
    for rel, array in good.items():
        sample = samples[path_to_key(rel)]
        assert "." not in path_to_key(rel) and "/" not in path_to_key(rel)
        assert int(sample["cls"]) == manifest.classes.index(rel.split("/")[0])
        assert json.loads(sample["json"])["source"] == rel
        assert set(sample) == {"png", "cls", "json"}
        if rel.endswith(".png"):
            assert sample["png"] == (tmp_path / "src" / rel).read_bytes()  # stored byte for byte
            np.testing.assert_array_equal(pixels(sample["png"]), array)
        else:  # the JPEG was re-encoded once to PNG: equal to the decoded JPEG
            np.testing.assert_array_equal(pixels(sample["png"]), pixels((tmp_path / "src" / rel).read_bytes()))


def test_keys_are_unique_and_stable():
    paths = ["a.b/c.png", "a_b/c.png", "x/y.tar.gz.png", "x/y.png"]
    keys = shards.unique_keys(paths)
    assert len(set(keys)) == 4 and all("." not in k and "/" not in k for k in keys)
    assert keys == shards.unique_keys(paths)
    assert path_to_key("cats/img.001.jpg") == "cats__img_001"


def test_resize_reencode_and_min_side(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/wide.png").write_bytes(encode(random_image(rng, 20, 40), "PNG"))
    (tmp_path / "src/small.png").write_bytes(encode(random_image(rng, 8, 8), "PNG"))
    out = tmp_path / "out"
    run_build("folder", tmp_path / "src", "--out", out, "--max-side", 16, "--min-side", 10, "--reencode", "jpg")
    manifest = load_manifest(out)
    assert manifest.image_ext == "jpg" and not manifest.has_labels
    assert manifest.skipped == {"too_small": 1}
    samples, _ = read_dir(out)
    image = Image.open(io.BytesIO(samples["wide"]["jpg"]))
    assert image.format == "JPEG" and image.size == (16, 8)
    assert set(samples["wide"]) == {"jpg", "json"}
    info = json.loads(samples["wide"]["json"])
    assert (info["width"], info["height"], info["stored_size"]) == (40, 20, [16, 8])


# --------------------------------------------------------------------------------------- yfcc
def yfcc_line(line: int, photo_id, url: str = "", video: bool = False) -> str:
    fields = [f"col{i}" for i in range(25)]
    fields[0], fields[1], fields[16], fields[24] = str(line), str(photo_id), url, "1" if video else "0"
    return "\t".join(fields)


def check_yfcc(out: Path, expected: dict, skipped: dict) -> None:
    manifest = load_manifest(out)
    assert manifest.skipped == skipped and not manifest.has_labels and manifest.image_ext == "jpg"
    samples, _ = read_dir(out)
    assert sorted(samples) == sorted(str(pid) for pid in expected)
    for pid, data in expected.items():
        assert samples[str(pid)]["jpg"] == data  # JPEG stored byte for byte
        assert json.loads(samples[str(pid)]["json"])["photo_id"] == str(pid)


def test_yfcc_tree(tmp_path):
    rng = np.random.default_rng(3)
    images = tmp_path / "images"
    images.mkdir()
    expected = {}
    lines = []
    for line, pid in enumerate([101, 202, 303, 404]):
        expected[pid] = encode(random_image(rng), "JPEG")
        (images / f"{pid}.jpg").write_bytes(expected[pid])
        lines.append(yfcc_line(line, pid))
    (images / "505.jpg").write_bytes(b"\xff\xd8\xff corrupt")
    lines += [yfcc_line(4, 505), yfcc_line(5, 606, video=True), yfcc_line(6, 707), "too\tfew\tcolumns"]
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
    run_build("yfcc", tmp_path / "meta.tsv", "--images", images, "--out", tmp_path / "out", "--shard-size", 3)
    check_yfcc(tmp_path / "out", expected, {"bad_line": 1, "missing": 1, "undecodable": 1, "video": 1})


def test_yfcc_zip_opens_each_archive_once_per_shard(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    root = tmp_path / "zips"
    line_numbers = [997, 998, 999, 1000, 1001, 1002, 1003, 5_000_000]
    archives = defaultdict(dict)
    expected, lines = {}, []
    for line in line_numbers:
        pid = 7_000_000 + line
        lines.append(yfcc_line(line, pid, video=(line == 1002)))
        if line in (1002, 1003, 5_000_000):
            continue  # a video, a member missing from its archive, an archive that does not exist
        archive, member = zip_location(line)
        expected[pid] = archives[archive][member] = encode(random_image(rng), "JPEG")
    assert zip_location(998) == ("00/000.zip", "998.jpg") and zip_location(1000) == ("00/001.zip", "000.jpg")
    for archive, members in archives.items():
        (root / archive).parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / archive, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
    (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")

    opened = []

    class CountingZipFile(zipfile.ZipFile):
        def __init__(self, file, *args, **kwargs):
            opened.append(Path(file).relative_to(root).as_posix())
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(shards.yfcc.zipfile, "ZipFile", CountingZipFile)
    run_build("yfcc", tmp_path / "meta.tsv", "--images", root, "--layout", "zip", "--out", tmp_path / "out",
              "--shard-size", 4)
    check_yfcc(tmp_path / "out", expected, {"missing": 2, "video": 1})
    # shards hold photo lines [997, 998, 999, 1000] and [1001, 1003, 5000000]
    assert Counter(opened) == {"00/000.zip": 1, "00/001.zip": 2, "05/000.zip": 1}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_yfcc_url_from_local_server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    rng = np.random.default_rng(5)
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        expected, lines = {}, []
        for line, pid in enumerate([11, 22, 33]):
            expected[pid] = encode(random_image(rng), "JPEG")
            (served / f"p{pid}.jpg").write_bytes(expected[pid])
            lines.append(yfcc_line(line, pid, f"{base}/p{pid}.jpg"))
        lines += [yfcc_line(3, 44, f"{base}/absent.jpg"), yfcc_line(4, 55, f"{base}/v.mp4", video=True)]
        (tmp_path / "meta.tsv").write_text("\n".join(lines) + "\n")
        run_build("yfcc", tmp_path / "meta.tsv", "--layout", "url", "--out", tmp_path / "out",
                  "--fetch-retries", 0, "--fetch-timeout", 5)
    finally:
        server.shutdown()
        server.server_close()
    check_yfcc(tmp_path / "out", expected, {"fetch_error": 1, "video": 1})
    assert json.loads(read_dir(tmp_path / "out")[0]["11"]["json"])["url"] == f"{base}/p11.jpg"


# ------------------------------------------------------------------------- re-runs and workers
def test_rerun_reuses_complete_shards(tmp_path):
    rng = np.random.default_rng(6)
    make_tree(tmp_path / "src", rng)
    out = tmp_path / "out"
    args = ["folder", tmp_path / "src", "--labels", "--out", out, "--shard-size", 2]
    run_build(*args)
    tars = sorted(out.glob("*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tars}
    manifest_before = (out / "manifest.json").read_text()
    run_build(*args)
    assert {p.name: p.stat().st_mtime_ns for p in tars} == {k: v[0] for k, v in before.items()}
    assert (out / "manifest.json").read_text() == manifest_before  # skip counts survive the reuse
    tars[1].unlink()  # a lost shard is rebuilt, identical; the others are untouched
    (out / f".{tars[0].name}.tmp").write_bytes(b"debris of a killed run")
    run_build(*args)
    assert tars[1].read_bytes() == before[tars[1].name][1]
    assert tars[0].stat().st_mtime_ns == before[tars[0].name][0]
    run_build(*args, "--max-side", 8)  # other settings: nothing is reused
    assert all(p.stat().st_mtime_ns != before[p.name][0] for p in tars)
    assert all(pixels(s["png"]).shape[1] == 8 for s in read_dir(out)[0].values())


def test_two_workers_write_the_same_shards(fake_fmnist, tmp_path):
    root, _, _ = fake_fmnist
    common = ["fmnist", "--split", "train", "--fmnist-dir", root, "--shard-size", 8]
    run_build(*common, "--out", tmp_path / "one")
    run_build(*common, "--out", tmp_path / "two", "--workers", 2)
    _, one = read_dir(tmp_path / "one")
    _, two = read_dir(tmp_path / "two")
    assert one == two and len(one) == 5
    for name in one:  # fixed member headers: byte-identical whatever the worker count
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
