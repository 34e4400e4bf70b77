"""Loader throughput: images/s of read + decode + augment (train transform), per DataLoader worker count.

    ~/.cache/dist_cluster/venv/bin/python bench/loader.py                    # workers 0 1 2, ~1-2 min
    ~/.cache/dist_cluster/venv/bin/python bench/loader.py --workers 0 4 8 16 --num-jpeg 8000 --max-samples 0
    ~/.cache/dist_cluster/venv/bin/python bench/loader.py --decode cpu device --device cuda   # + nvjpeg rows

Datasets: (a) Fashion-MNIST 28 px PNG shards (--fmnist DIR; when DIR/manifest.json is missing a
10k subset is built into the cache with shards/build.py, or from the IDX files if that fails);
(b) 256 px JPEG shards of random crops of the photos shipped with scikit-image, built into the cache.
One rank (world 1), shuffle on, one pass (equal_steps=False) over at most --max-samples images.
--decode device adds rows for the JPEG set where the workers only read and the main process
decodes each batch on --device (data.decode=device; on a CPU device that is one core decoding).
The per-stage cost (tar read, decode, augment) is also timed in-process, the tar read also
through Python's tarfile beside it (what dist_cluster/data/tar_stream.py replaced). Prints a
table, writes bench/results/loader.json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is run as a script: the repo's tests/ helpers are importable

from dist_cluster.data.loader import ShardLoader, read_plan  # noqa: E402
from dist_cluster.data.manifest import load_manifest  # noqa: E402
from dist_cluster.data.transforms import train_transform  # noqa: E402
from dist_cluster.data.worker import _split_name, decode_sample, read_tar  # noqa: E402
from tests.shard_fixtures import encode_image, write_shards  # noqa: E402

CACHE = Path(os.environ.get("DIST_CLUSTER_CACHE", Path.home() / ".cache" / "dist_cluster")) / "bench"
FMNIST_IDX = Path("/usr/share/datasets/fashion-mnist")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_fmnist(out: Path, limit: int, per_shard: int = 1000) -> None:
    """The repo's builder when it runs, else the same format written here from the IDX files."""
    cmd = [sys.executable, str(ROOT / "shards/build.py"), "fmnist", "--split", "train", "--out", str(out),
           "--limit", str(limit)]
    if (ROOT / "shards/build.py").exists():
        if subprocess.run(cmd, cwd=ROOT).returncode == 0 and (out / "manifest.json").exists():
            return
        print(f"shards/build.py failed; writing the shards from {FMNIST_IDX} instead", flush=True)
    images = _read_idx(FMNIST_IDX / "train-images-idx3-ubyte.gz")[:limit]
    labels = _read_idx(FMNIST_IDX / "train-labels-idx1-ubyte.gz")[:limit]
    samples = [(f"fmnist-train-{i:06d}", encode_image(images[i], "png"), str(int(labels[i])).encode())
               for i in range(len(images))]
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    write_shards(out, shards, name="fmnist-train", fmt="png", has_labels=True)


def build_photo_jpegs(out: Path, count: int, side: int = 256, per_shard: int = 100, seed: int = 0) -> None:
    """`count` random side x side crops of the scikit-image photos, JPEG q90; label = source photo."""
    import skimage.data
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo pairs
        if min(image.shape[:2]) >= side:
            photos.append(image)
    samples = []
    for i in range(count):
        label = int(rng.integers(len(photos)))
        photo = photos[label]
        y, x = (int(rng.integers(0, photo.shape[d] - side + 1)) for d in (0, 1))
        samples.append((f"photo-{i:06d}", encode_image(np.ascontiguousarray(photo[y:y + side, x:x + side]), "jpg"),
                        str(label).encode()))
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    write_shards(out, shards, name="photos256", fmt="jpg", has_labels=True)


def time_loader(root: Path, workers: int, batch_size: int, crop: int, min_scale: float, max_samples: int,
                decode: str = "cpu", device: str = "cpu") -> dict:
    """One shuffled pass; steady rate counts from the first batch (worker start-up excluded)."""
    cuda = torch.device(device).type == "cuda"
    on_device = torch.device(device) if cuda or decode == "device" else None  # as make_loader does
    loader = ShardLoader(str(root), 0, 1, batch_size, workers, train_transform(crop, min_scale), seed=0,
                         epoch=0, shuffle=True, equal_steps=False, shuffle_buffer=1000, max_samples=max_samples,
                         decode=decode, device=on_device, pin_memory=cuda)
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    first, count = None, 0
    for images, _, _ in loader:
        if first is None:
            first, first_count = time.perf_counter(), len(images)
        count += len(images)
    if cuda:
        torch.cuda.synchronize()  # the last batch's decode + augment are queued, not done
    end = time.perf_counter()
    cpu = _cpu_seconds() - cpu_start  # workers are joined when the pass ends: their CPU time is in
    steady = (count - first_count) / max(end - first, 1e-9)
    return dict(workers=workers, decode=decode, images=count, seconds=round(end - start, 3),
                startup_s=round(first - start, 3),
                images_per_s=round(steady, 1), images_per_s_incl_startup=round(count / (end - start), 1),
                cpu_us_per_image=round(1e6 * cpu / count, 1), skipped_corrupt=loader.stats["skipped_corrupt"])


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: unlike wall time, not inflated by other
    jobs sharing the cores (the rate a worker reaches on a core of its own is 1e6 / cpu_us_per_image)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tarfile_samples(root: Path, plan: list, limit: int) -> list[dict]:
    """The first `limit` samples of the plan's tars read by tarfile (what read_tar used before tar_stream)."""
    samples = []
    for name, _ in plan:
        with tarfile.open(root / name, mode="r|") as tar:
            for member in tar:
                key, ext = _split_name(member.name)
                if not samples or samples[-1]["__key__"] != key:
                    if len(samples) == limit:
                        return samples
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def time_stages(root: Path, crop: int, min_scale: float, limit: int = 2000) -> dict:
    """Microseconds per image of each stage, in this process (what one worker spends)."""
    manifest = load_manifest(root)
    plan = read_plan(manifest, 0, 1, 0)[0]
    start = time.perf_counter()
    samples = []
    for name, take in plan:
        samples.extend(read_tar(str(root / name), take, dict.fromkeys(("truncated_shards", "lost_truncated"), 0)))
        if len(samples) >= limit:
            break
    samples = samples[:limit]
    n = len(samples)
    read = time.perf_counter() - start
    start = time.perf_counter()
    reference = _tarfile_samples(root, plan, n)  # the same samples through Python's tarfile, side by side
    read_tarfile = time.perf_counter() - start
    if reference != samples:
        raise AssertionError(f"{root}: read_tar and tarfile disagree on the first {n} samples")
    start = time.perf_counter()
    decoded = [decode_sample(s, manifest.has_labels)[0] for s in samples]
    decode = time.perf_counter() - start
    transform = train_transform(crop, min_scale)
    start = time.perf_counter()
    cropped = [transform.per_sample(image) for image in decoded]
    augment = time.perf_counter() - start
    start = time.perf_counter()
    for first in range(0, n, 64):  # float + normalise, once per batch as the loader does
        transform.finish_batch(torch.stack(cropped[first:first + 64]))
    finish = time.perf_counter() - start
    return dict(images=n, read_us=round(1e6 * read / n, 1), read_tarfile_us=round(1e6 * read_tarfile / n, 1),
                decode_us=round(1e6 * decode / n, 1),
                augment_us=round(1e6 * augment / n, 1), normalize_us=round(1e6 * finish / n, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fmnist", default=str(ROOT / "data/fmnist/train"),
                        help="Fashion-MNIST shard dir (a 10k subset is built into the cache if it has no manifest)")
    parser.add_argument("--fmnist-limit", type=int, default=10000)
    parser.add_argument("--num-jpeg", type=int, default=2000)
    parser.add_argument("--max-samples", type=int, default=10000, help="images per timed pass (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "device"],
                        help="data.decode modes for the JPEG set (the PNG set is always decoded in the workers)")
    parser.add_argument("--device", default="cpu",
                        help="the run's device: where batches go and decode=device decodes (cpu | cuda)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/loader.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per loader process: the rates are per worker, comparable

    fmnist = Path(args.fmnist)
    if not (fmnist / "manifest.json").exists():
        fmnist = CACHE / f"fmnist-train-{args.fmnist_limit}"
        if not (fmnist / "manifest.json").exists():
            build_fmnist(fmnist, args.fmnist_limit)
    photos = CACHE / f"photos256-{args.num_jpeg}"
    if not (photos / "manifest.json").exists():
        build_photo_jpegs(photos, args.num_jpeg)

    datasets = {"fmnist-28px-png": (fmnist, 28, 0.5), "photos-256px-jpeg": (photos, 224, 0.2)}
    results = dict(cpu_count=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2), torch=torch.__version__,
                   batch_size=args.batch_size, decode_device=args.device, datasets={})
    print(f"{'dataset':<20} {'decode':>6} {'workers':>7} {'images':>7} {'img/s':>9} {'cpu us/img':>10} "
          f"{'startup s':>9}  per-image stages (in-process)")
    for name, (root, crop, min_scale) in datasets.items():
        stages = time_stages(root, crop, min_scale)
        decodes = args.decode if name.endswith("jpeg") else ["cpu"]
        runs = [time_loader(root, w, args.batch_size, crop, min_scale, args.max_samples, mode, args.device)
                for mode in decodes for w in args.workers]
        results["datasets"][name] = dict(root=str(root), crop=crop, min_scale=min_scale, stages=stages, runs=runs)
        for run in runs:
            stage_text = (f"read {stages['read_us']} (tarfile {stages['read_tarfile_us']}), decode "
                          f"{stages['decode_us']}, crop+flip {stages['augment_us']}, normalize "
                          f"{stages['normalize_us']} us") if run is runs[0] else ""
            print(f"{name:<20} {run['decode']:>6} {run['workers']:>7} {run['images']:>7} {run['images_per_s']:>9.0f} "
                  f"{run['cpu_us_per_image']:>10.0f} {run['startup_s']:>9.2f}  {stage_text}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} (load average {results['load_avg_1m']} on {results['cpu_count']} cores)")


if __name__ == "__main__":
    main()
