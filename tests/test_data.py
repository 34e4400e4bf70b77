"""The streaming reader and the transforms, against what the fixture wrote (tarfile + PIL + numpy).

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_data.py
"""
import io
import tarfile

import numpy as np
import pytest
import torch

from dist_cluster.data.loader import (
    ShardLoader,
    _batch_owners,
    _greedy_bins,
    assign_shards,
    read_plan,
    reduce_stats,
    steps_per_epoch,
)
from dist_cluster.data.manifest import Manifest, ShardInfo
from dist_cluster.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomRot90,
    all_rotations,
    extract_transform,
    random_rotations,
    rotate_batch,
    train_transform,
)
from tests.dist_utils import run_ranks
from tests.shard_fixtures import make_shards, sample_key, truncate_file

BATCH = 4


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """8 shards x 12: with 2 ranks x 2 workers (or 4 x 2) and batches of 4 every count divides."""
    return make_shards(tmp_path_factory.mktemp("even"), 8, 12, size=16)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Shards of different sizes (workers get different batch counts) and one garbage image."""
    return make_shards(tmp_path_factory.mktemp("uneven"), 5, [17, 9, 14, 6, 11], size=16, gray=True,
                       corrupt_keys={sample_key(0, 2)})


def _collect(loader):
    keys, images, labels = [], [], []
    for batch_images, batch_keys, batch_labels in loader:
        keys.append(list(batch_keys))
        images.append(batch_images)
        labels.append(batch_labels)
    return keys, images, labels


def _flat(nested):
    return [k for batch in nested for k in batch]


# ---------------------------------------------------------------- plan


def test_assign_shards_disjoint_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    for trial in range(30):
        sizes = rng.integers(0, 50, rng.integers(8, 40)).tolist()
        manifest = Manifest("m", [ShardInfo(f"{i}.tar", n) for i, n in enumerate(sizes)])
        world, workers = int(rng.integers(1, 5)), int(rng.integers(0, 3))
        if len(sizes) < world * max(1, workers):
            continue
        per_rank = [[s.name for s in assign_shards(manifest, r, world, workers)] for r in range(world)]
        flat = [n for names in per_rank for n in names]
        assert sorted(flat) == sorted(s.name for s in manifest.shards)  # disjoint and complete
        assert all(len(names) >= max(1, workers) for names in per_rank)  # every reader has a shard
        loads = [sum(sizes[int(n.split(".")[0])] for n in names) for names in per_rank]
        assert max(loads) - min(loads) <= max(sizes)  # greedy bound
        assert per_rank == [[s.name for s in assign_shards(manifest, r, world, workers)] for r in range(world)]


def test_greedy_bins_reference():
    # largest first to the least-loaded bin, ties to the lowest bin: worked by hand
    assert _greedy_bins([5, 3, 3, 2, 1], 2, 1) == [[0, 3], [1, 2, 4]]  # loads 7, 7
    # min_items forces the small shards to the empty bin even though it is heavier after the first
    assert _greedy_bins([100, 1, 1, 1], 2, 2) == [[0, 3], [1, 2]]


def test_too_few_shards_is_a_clear_error(even):
    with pytest.raises(ValueError, match=r"8 shards for 4 ranks x 3 loader workers = 12 readers.*num_workers"):
        assign_shards(even.manifest, 0, 4, 3)
    with pytest.raises(ValueError, match="12 readers"):
        ShardLoader(even.root, 0, 4, BATCH, 3)


def test_steps_per_epoch_reference(even, uneven):
    assert steps_per_epoch(even.manifest, 2, BATCH, 2) == 96 // (2 * BATCH)
    assert steps_per_epoch(even.manifest, 4, 5, 2) == 4  # 2 workers x (12 // 5) per rank
    # by hand: [17, 9, 14, 6, 11] greedy over 2 ranks -> {17, 9} = 26 and {14, 11, 6} = 31; 26 // 3 = 8
    assert [sum(t for p in read_plan(uneven.manifest, r, 2, 0) for _, t in p) for r in range(2)] == [26, 31]
    assert steps_per_epoch(uneven.manifest, 2, 3, 0) == 8
    assert steps_per_epoch(even.manifest, 2, BATCH, 2, max_samples=20) == 2 * (10 // BATCH)
    with pytest.raises(ValueError, match="no full batch of 50"):
        steps_per_epoch(even.manifest, 4, 50, 1)


def test_batch_owners_round_robin_then_leftovers():
    assert _batch_owners([3, 1, 2]) == [0, 1, 2, 0, 2, 0]


# ---------------------------------------------------------------- epochs on real ranks


def _rank_epochs(rank, world, root, workers):
    # fork: a rank started by spawn would spawn its workers too (a fresh interpreter each, seconds)
    extract = ShardLoader(root, rank, world, BATCH, workers, None, seed=3, epoch=0, shuffle=False,
                          equal_steps=False, mp_context="fork")
    ext_keys, ext_images, ext_labels = _collect(extract)
    train = ShardLoader(root, rank, world, BATCH, workers, train_transform(12, 0.5), seed=3, epoch=1,
                        shuffle=True, equal_steps=True, shuffle_buffer=8, mp_context="fork")
    train_keys, train_images, _ = _collect(train)
    shapes = {(tuple(i.shape), i.dtype) for i in train_images}
    # numpy, not tensors: a tensor sent through the queue lives in this process's shared memory,
    # which is gone once the rank exits
    return dict(ext_keys=ext_keys, ext_images=torch.cat(ext_images).numpy(), ext_labels=torch.cat(ext_labels).tolist(),
                train_keys=train_keys, train_shapes=shapes, len_train=len(train), len_extract=len(extract),
                stats=train.stats, summed=reduce_stats(train.stats))


@pytest.mark.parametrize("world", [2, 4])
def test_extraction_and_training_epochs_across_ranks(even, world):
    results = run_ranks(_rank_epochs, world, args=(str(even.root), 2), daemon=False)  # ranks fork workers
    extracted = [_flat(r["ext_keys"]) for r in results]
    flat = [k for keys in extracted for k in keys]
    assert sorted(flat) == sorted(even.keys) and len(flat) == len(set(flat))  # once each, disjoint
    for r in results:
        keys = _flat(r["ext_keys"])
        assert len(r["ext_keys"]) == r["len_extract"]
        reference = np.stack([even.images[k] for k in keys]).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(r["ext_images"], reference)  # decode: exact PNG pixels
        assert r["ext_labels"] == [even.labels[k] for k in keys]
    steps = 96 // (world * BATCH)
    assert [len(r["train_keys"]) for r in results] == [steps] * world == [r["len_train"] for r in results]
    train_flat = [k for r in results for k in _flat(r["train_keys"])]
    assert sorted(train_flat) == sorted(even.keys)  # counts divide: every key exactly once
    assert all(r["train_shapes"] == {((BATCH, 3, 12, 12), torch.float32)} for r in results)
    summed = {k: sum(r["stats"][k] for r in results) for k in results[0]["stats"]}
    assert all(r["summed"] == summed for r in results) and summed["samples"] == 96


# ---------------------------------------------------------------- order and resume


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_order_new_epoch_new_order(even, workers):
    def epoch(e, seed=0, device=None):
        loader = ShardLoader(even.root, 1, 2, BATCH, workers, train_transform(12, 0.5), seed=seed, epoch=e,
                             shuffle=True, equal_steps=True, shuffle_buffer=10, device=device)
        keys, images, _ = _collect(loader)
        return _flat(keys), torch.cat(images)

    torch.manual_seed(123)
    keys0, images0 = epoch(0)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))  # the caller's global RNG did not move
    keys0b, images0b = epoch(0)
    keys1, _ = epoch(1)
    keys_seed, _ = epoch(0, seed=1)
    assert keys0 == keys0b and torch.equal(images0, images0b)  # augmentations included
    keys_dev, images_dev = epoch(0, device=torch.device("cpu"))  # uint8 out of the workers, normalised here
    assert keys_dev == keys0 and torch.allclose(images_dev, images0, atol=1e-6)
    assert keys1 != keys0 and sorted(keys1) == sorted(keys0)  # reshuffled, same rank's samples
    assert keys_seed != keys0
    assert len(keys0) == len(set(keys0)) == 48  # half of the 96 keys, none twice


@pytest.mark.parametrize("workers,equal_steps", [(0, True), (2, True), (2, False)])
def test_skip_batches_gives_the_tail_of_the_epoch(uneven, workers, equal_steps):
    def run(skip):
        loader = ShardLoader(uneven.root, 0, 1, 3, workers, train_transform(12, 0.5), seed=5, epoch=2,
                             shuffle=True, equal_steps=equal_steps, skip_batches=skip, shuffle_buffer=6)
        keys, images, labels = _collect(loader)
        return loader, keys, images, labels

    full_loader, keys, images, labels = run(0)
    assert len(keys) == len(full_loader)
    if workers == 2:  # the two workers own different batch counts: the resume must replay the merge
        assert len(set(full_loader.worker_batches)) == 2
    for skip in (1, 4, len(keys) - 1):
        loader, tail_keys, tail_images, tail_labels = run(skip)
        assert tail_keys == keys[skip:]
        assert all(torch.equal(a, b) for a, b in zip(tail_images, images[skip:]))
        assert all(torch.equal(a, b) for a, b in zip(tail_labels, labels[skip:]))
        stats = loader.stats
        # the skipped samples were not decoded: only the tail's samples (and corrupt ones met) were
        assert stats["samples"] == len(_flat(tail_keys))
        assert stats["decoded"] <= stats["samples"] + 1 and stats["skipped_resume"] <= skip * 3 + 1
        # the garbage image is dropped (and counted) whether it falls in the skipped part or not;
        # a worker whose batches were all skipped stops without reading, so it may go unseen
        assert stats["skipped_corrupt"] <= full_loader.stats["skipped_corrupt"] <= 1


# ---------------------------------------------------------------- corrupt data


def _complete_keys_before(path_bytes: bytes, cut: int) -> set:
    """Keys whose every member lies entirely before byte `cut` of the original tar."""
    ends = {}
    with tarfile.open(fileobj=io.BytesIO(path_bytes)) as tar:
        for member in tar.getmembers():
            key = member.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), member.offset_data + member.size)
    return {k for k, end in ends.items() if end <= cut}


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_corrupt_samples_and_truncated_tar_are_skipped_and_counted(tmp_path, fmt):
    broken = {sample_key(0, 1), sample_key(2, 5)}
    missing, bad_label = {sample_key(1, 0)}, {sample_key(3, 7)}
    fx = make_shards(tmp_path, 4, 10, size=16, fmt=fmt, corrupt_keys=broken,
                     missing_image_keys=missing, bad_label_keys=bad_label)
    original = fx.shard_path(2).read_bytes()
    cut = truncate_file(fx.shard_path(2), 0.55)
    readable = _complete_keys_before(original, cut)
    expected = [k for k in fx.keys if fx.shard_of[k] != 2 or k in readable]
    expected = sorted(set(expected) - broken - missing - bad_label)

    # a cut tar fails the epoch by default (tests/test_manifest.py); opted in here: counted, survived
    loader = ShardLoader(fx.root, 0, 1, 3, 2, extract_transform(16, 16), shuffle=False, equal_steps=False,
                         allow_short_shards=True)
    keys, images, labels = _collect(loader)
    assert sorted(_flat(keys)) == expected
    assert torch.cat(labels).tolist() == [fx.labels[k] for k in _flat(keys)]
    stats = loader.stats
    corrupt_read = len([k for k in broken | missing | bad_label if fx.shard_of[k] != 2 or k in readable])
    assert stats["truncated_shards"] == 1 and stats["lost_truncated"] == 10 - len(readable)
    assert stats["skipped_corrupt"] == corrupt_read
    assert stats["samples"] + stats["skipped_corrupt"] + stats["lost_truncated"] == 40

    # training on the same damaged shards: full batches, equal steps, the shortfall re-read and counted
    train = ShardLoader(fx.root, 0, 1, 3, 2, train_transform(16, 0.5), equal_steps=True, shuffle_buffer=4,
                        allow_short_shards=True)
    train_keys, train_images, _ = _collect(train)
    assert len(train_keys) == len(train) == 2 * (20 // 3) and all(len(k) == 3 for k in train_keys)
    assert train.stats["refilled"] > 0 and set(_flat(train_keys)) <= set(expected)


def test_gray_png_decodes_to_replicated_rgb(uneven):
    loader = ShardLoader(uneven.root, 0, 1, 5, 0, None, shuffle=False, equal_steps=False)
    keys, images, _ = _collect(loader)
    reference = np.stack([uneven.images[k] for k in _flat(keys)]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(torch.cat(images).numpy(), reference)
    assert len(_flat(keys)) == 57 - 1 and loader.stats["skipped_corrupt"] == 1


def test_max_samples_is_a_fixed_subset_for_extraction_and_training(even):
    def loader(equal_steps, epoch):
        return ShardLoader(even.root, 0, 1, BATCH, 2, None, epoch=epoch, equal_steps=equal_steps,
                           shuffle=equal_steps, max_samples=20)
    subset = _flat(_collect(loader(False, 0))[0])
    # 2 workers x 10: the first 10 samples of each worker's first shard (shards 0 and 1 by greedy)
    assert sorted(subset) == sorted(sample_key(s, i) for s in (0, 1) for i in range(10))
    for epoch in (0, 1):
        train = loader(True, epoch)
        keys = _flat(_collect(train)[0])
        assert len(keys) == len(train) * BATCH == 16 and set(keys) <= set(subset)


def test_all_corrupt_worker_fails_clearly_in_training(tmp_path):
    fx = make_shards(tmp_path, 2, 4, size=8, corrupt_keys={sample_key(1, i) for i in range(4)})
    loader = ShardLoader(fx.root, 0, 1, 2, 0, None, equal_steps=False, shuffle=False)
    assert sorted(_flat(_collect(loader)[0])) == sorted(fx.keys[:4])  # extraction: counted, not raised
    assert loader.stats["skipped_corrupt"] == 4
    train = ShardLoader(fx.root, 0, 1, 2, 2, None, equal_steps=True)
    with pytest.raises(RuntimeError, match="no decodable sample"):
        _collect(train)


# ---------------------------------------------------------------- transforms


def test_rotate_batch_matches_numpy_rot90():
    images = torch.randint(0, 255, (9, 3, 5, 5), dtype=torch.uint8)
    labels = random_rotations(9, torch.Generator().manual_seed(0))
    rotated = rotate_batch(images, labels).numpy()
    for i in range(9):
        np.testing.assert_array_equal(rotated[i], np.rot90(images[i].numpy(), int(labels[i]), axes=(1, 2)))
    stacked, rot = all_rotations(images)
    assert rot.tolist() == [r for r in range(4) for _ in range(9)]
    for r in range(4):
        np.testing.assert_array_equal(stacked[r * 9:(r + 1) * 9].numpy(), np.rot90(images.numpy(), r, axes=(2, 3)))
    image, label = RandomRot90(torch.Generator().manual_seed(1))(images[0])
    np.testing.assert_array_equal(image.numpy(), np.rot90(images[0].numpy(), label, axes=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))


def test_transforms_shapes_dtypes_and_values():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    out = extract_transform(20, 16)(image)  # shorter side already 20: only the center crop acts
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    reference = (image.numpy()[:, 2:18, 7:23] / 255.0 - mean) / std
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-5)
    torch.manual_seed(0)
    train = train_transform(12, 0.3)(image)
    assert train.shape == (3, 12, 12) and train.dtype == torch.float32
    lo, hi = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD), (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert lo - 1e-4 <= train.min() and train.max() <= hi + 1e-4
    with pytest.raises(ValueError, match="min_scale"):
        train_transform(12, 0.0)


def test_make_loader_follows_the_run_device_not_the_machine(even, monkeypatch):
    """dist.device=cpu on a machine with CUDA: batches stay on the CPU, no pinned memory."""
    from types import SimpleNamespace

    from dist_cluster.data.loader import make_loader
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = SimpleNamespace(batch_size=BATCH, num_workers=0, shuffle_buffer=8, max_samples=0,
                          allow_short_shards=False, decode="cpu", max_image_pixels=1000)
    loader = make_loader(cfg, str(even.root), 0, 1, train_transform(16, 0.5), 0, 0, train=True,
                         device=torch.device("cpu"))
    assert loader.device is None and not loader.pin_memory
    images, _, _ = next(iter(loader))
    assert images.device.type == "cpu" and images.dtype == torch.float32
