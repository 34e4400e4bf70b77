"""Hierarchical k-means with all_to_all routing, NMI, and the clustering stage driver.

    python -m pytest -q tests/test_hierarchy.py

Every labelled row is checked against a one-process numpy Lloyd run from the same initial
centroids on the globally concatenated data (level 1), and on the rows of each super-cluster
(level 2), so a routing or return-trip mistake shows up as a label mismatch.
"""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dist_cluster.cluster.hierarchy import hierarchical_kmeans
from dist_cluster.cluster.nmi import distributed_nmi
from dist_cluster.cluster.route import route_destinations
from dist_cluster.cluster.stage import load_cluster_state, round_dir, run_clustering
from dist_cluster.config import ClusterConfig
from dist_cluster.runtime.distributed import imbalance, ownership
from dist_cluster.runtime.logger import MetricLogger, read_metrics
from tests.dist_utils import run_ranks
from tests.test_kmeans import numpy_lloyd

CPU = torch.device("cpu")


def normalized_mutual_info_score(a, b):
    """sklearn's NMI, imported here so the spawned ranks do not pay for importing sklearn."""
    from sklearn.metrics import normalized_mutual_info_score as nmi
    return nmi(a, b)


def nested_blobs(m=3, per_super=2, n_per=20, d=6, seed=0):
    """m far-apart groups of `per_super` blobs each: a natural two-level structure."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(m):
        center = rng.standard_normal(d) * 100
        for _ in range(per_super):
            sub = center + rng.standard_normal(d) * 5
            rows.append(sub + 0.3 * rng.standard_normal((n_per, d)))
    x = np.concatenate(rows)
    return x[rng.permutation(len(x))].astype(np.float32)


def lopsided(seed=0):
    """55 points in one blob, 5 far away: the small super-cluster has fewer rows than k/m."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal((55, 4)), 200 + rng.standard_normal((5, 4))])
    return x[rng.permutation(len(x))].astype(np.float32)


def uneven_blobs(sizes=(80, 30, 30), d=6, seed=3):
    """Far-apart super-clusters of unequal sizes, two blobs each: ownership must follow the rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        center = rng.standard_normal(d) * 100
        for half in (size // 2, size - size // 2):
            rows.append(center + rng.standard_normal(d) * 5 + 0.3 * rng.standard_normal((half, d)))
    x = np.concatenate(rows)
    return x[rng.permutation(len(x))].astype(np.float32)


NITER = 5
NESTED = nested_blobs()
UNEVEN = uneven_blobs()
HIER_CASES_2 = {  # name: (x, shard bounds per rank, k, m, seed)
    "w_lt_m": (NESTED, (0, 70, 120), 6, 3, 1),  # W=2 < m=3: rank 0 owns two super-clusters
    "flat": (NESTED, (0, 50, 120), 4, 1, 2),  # DeepCluster: m = 1
    "rotnet": (NESTED, (0, 50, 120), 1, 1, 3),
    "k_eq_m": (NESTED, (0, 60, 120), 3, 3, 4),
    "clamp": (lopsided(), (0, 25, 60), 50, 2, 5),
    "too_many": (NESTED[:9], (0, 4, 9), 12, 3, 0),
    "w_lt_m_uneven": (UNEVEN, (0, 60, 140), 6, 3, 8),  # the 80-row super-cluster alone on one rank
}
HIER_CASES_4 = {"w_gt_m": (NESTED, (0, 40, 80, 120, 120), 6, 3, 6),  # a group of 2 ranks; rank 3 without rows
                "w_gt_m_uneven": (UNEVEN, (0, 50, 90, 100, 140), 6, 3, 9)}  # 2 ranks for the 80 rows


def _hier_cases(rank, cases):
    out = {}
    for name, (x, bounds, k, m, seed) in cases.items():
        try:
            # 3 rows per routing round and rank: many rounds, the reference must not notice
            res = hierarchical_kmeans(torch.from_numpy(x[bounds[rank]:bounds[rank + 1]]), k, m, NITER, seed,
                                      CPU, backend="auto", init_samples_per_rank=30,
                                      route_chunk_bytes=3 * 4 * x.shape[1])
        except ValueError as err:
            out[name] = str(err)
            continue
        out[name] = dict(super=res.super_local.numpy(), sub=res.sub_local.numpy(),
                         level1_init=res.level1.init_centroids.numpy(),
                         level2_init={s: r.init_centroids.numpy() for s, r in res.level2.items()},
                         centroids_sub={s: c.numpy() for s, c in res.centroids_sub.items()},
                         sub_sizes=res.sub_sizes.numpy(), super_sizes=res.super_sizes.numpy(),
                         clamped=res.clamped, owners=res.owners, seconds=res.seconds,
                         objective_level2=res.objective_level2)
    return out


def _stage_rounds(rank, run_dir, feats, keys, bounds):
    """Two rounds of the stage driver; round 1 sees its images in another order, minus a few."""
    cfg = OmegaConf.structured(ClusterConfig(k=6, m=2, pca_dim=5, niter=NITER, init_samples_per_rank=40))
    logger = MetricLogger(run_dir, tensorboard=False)
    lo, hi = bounds[rank], bounds[rank + 1]
    first = run_clustering(torch.from_numpy(feats[lo:hi]), keys[lo:hi], cfg, 0, run_dir, logger, seed=0, device=CPU)
    order = np.random.default_rng(rank).permutation(hi - lo)[: hi - lo - 3]
    second = run_clustering(torch.from_numpy(feats[lo:hi][order] * 1.01), keys[lo:hi][order], cfg, 1, run_dir,
                            logger, seed=1, device=CPU, prev=first)
    logger.close()
    return [vars(first), vars(second)]


def _nmi_cases(rank, a, b, bounds):
    """NMI of correlated labels, and of independent labels with k = N / 2 (where a sampled estimate
    was far off: it over-fits the contingency table), this rank's slice of each."""
    lo, hi = bounds[rank], bounds[rank + 1]
    big_a, big_b = high_k_labels()
    cut = [len(big_a) * r // (len(bounds) - 1) for r in range(len(bounds))]
    return distributed_nmi(a[lo:hi], b[lo:hi]), distributed_nmi(big_a[cut[rank]:cut[rank + 1]],
                                                                 big_b[cut[rank]:cut[rank + 1]])


def high_k_labels(n=4000):
    rng = np.random.default_rng(5)
    return rng.integers(0, n // 2, n), rng.integers(0, n // 2, n)


def _two_rank_worker(rank, world, run_dir, stage_args, nmi_args):
    return dict(hier=_hier_cases(rank, HIER_CASES_2), stage=_stage_rounds(rank, run_dir, *stage_args),
                nmi=_nmi_cases(rank, *nmi_args))


def _four_rank_worker(rank, world):
    a, b = correlated_labels()
    return _hier_cases(rank, HIER_CASES_4), _nmi_cases(rank, a, b, (0, 1000, 1000, 4500, 6000))


def correlated_labels(n=6000, k=8, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, n)
    b = np.where(rng.random(n) < noise, rng.integers(0, k + 3, n), (a * 7) % (k + 3))
    return a, b


STAGE_FEATS = nested_blobs(m=2, per_super=3, n_per=15, d=10, seed=7)
STAGE_KEYS = np.array([f"img{i:05d}" for i in range(len(STAGE_FEATS))])
STAGE_BOUNDS = (0, 40, 90)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    a, b = correlated_labels()
    results = run_ranks(_two_rank_worker, 2, args=(str(run_dir), (STAGE_FEATS, STAGE_KEYS, STAGE_BOUNDS),
                                                   (a, b, (0, 2500, 6000))))
    return run_dir, results


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_four_rank_worker, 4)


@pytest.fixture(scope="module")
def four_rank_hier(four_ranks):
    return [r[0] for r in four_ranks]


# ---------------------------------------------------------------- hierarchy


def check_against_reference(cases, per_rank, name):
    x, bounds, k, m, seed = cases[name]
    kpm, results = k // m, [r[name] for r in per_rank]
    sup = np.concatenate([r["super"] for r in results])
    sub = np.concatenate([r["sub"] for r in results])
    assert len(sup) == len(sub) == len(x)
    for r, lo, hi in zip(results, bounds, bounds[1:]):
        assert len(r["sub"]) == hi - lo  # exactly this rank's rows, nothing more
    assert ((0 <= sub) & (sub < k)).all() and np.array_equal(sub // kpm, sup)
    for r in results:
        assert np.array_equal(r["sub_sizes"], np.bincount(sub, minlength=k))
        assert np.array_equal(r["super_sizes"], np.bincount(sup, minlength=m))
    level1 = numpy_lloyd(x, results[0]["level1_init"], NITER if m > 1 else 0, seed)
    assert np.array_equal(sup, level1["labels"])
    for s in range(m):  # level 2: each super-cluster's rows, clustered from its owner's init
        owner = results[r0 := min(r for r, res in enumerate(results) if s in res["centroids_sub"])]
        rows = np.flatnonzero(sup == s)
        if kpm == 1:
            continue
        ref = numpy_lloyd(x[rows], owner["level2_init"][s], NITER, seed * 1_000_003 + s + 1 if m > 1 else seed + 1)
        assert np.array_equal(sub[rows], s * kpm + ref["labels"]), (name, s, r0)
        for res in results:  # every member of the group holds the same centroids
            if s in res["centroids_sub"]:
                assert np.array_equal(res["centroids_sub"][s], owner["centroids_sub"][s])
    return sup, sub


def test_w_smaller_than_m_routes_and_matches_reference(two_ranks):
    _, results = two_ranks
    per_rank = [r["hier"] for r in results]
    check_against_reference(HIER_CASES_2, per_rank, "w_lt_m")
    assert per_rank[0]["w_lt_m"]["owners"] == [[0], [0], [1]]
    assert sorted(per_rank[0]["w_lt_m"]["centroids_sub"]) == [0, 1]
    assert set(per_rank[0]["w_lt_m"]["seconds"]) == {"level1", "route", "level2", "return"}


def test_w_larger_than_m_with_an_empty_rank(four_rank_hier):
    check_against_reference(HIER_CASES_4, four_rank_hier, "w_gt_m")
    res = four_rank_hier[0]["w_gt_m"]
    assert res["owners"] == ownership(3, 4, res["super_sizes"].tolist()), res["super_sizes"]
    assert len(four_rank_hier[3]["w_gt_m"]["sub"]) == 0
    assert 2 in four_rank_hier[3]["w_gt_m"]["centroids_sub"]  # rank 3 clustered routed rows of super 2


def _check_owners_follow_sizes(per_rank, name, world):
    res = per_rank[0][name]
    assert res["super_sizes"].max() >= 2 * res["super_sizes"].min()  # uneven, whatever level 1 found
    assert res["owners"] == ownership(3, world, res["super_sizes"].tolist())
    assert imbalance(res["owners"], res["super_sizes"], world) <= imbalance(ownership(3, world),
                                                                           res["super_sizes"], world)


def test_uneven_super_clusters_get_owners_by_rows_and_match_reference(two_ranks, four_rank_hier):
    """Level-2 work follows the level-1 sizes (W < m: largest first; W > m: more ranks for more
    rows), and the labels are still exactly the single-process reference's."""
    two = [r["hier"] for r in two_ranks[1]]
    check_against_reference(HIER_CASES_2, two, "w_lt_m_uneven")
    _check_owners_follow_sizes(two, "w_lt_m_uneven", 2)
    check_against_reference(HIER_CASES_4, four_rank_hier, "w_gt_m_uneven")
    _check_owners_follow_sizes(four_rank_hier, "w_gt_m_uneven", 4)
    big = int(np.argmax(four_rank_hier[0]["w_gt_m_uneven"]["super_sizes"]))
    assert len(four_rank_hier[0]["w_gt_m_uneven"]["owners"][big]) == 2


@pytest.mark.parametrize("name", ["flat", "rotnet", "k_eq_m"])
def test_modes_need_no_routing(two_ranks, name):
    _, results = two_ranks
    per_rank = [r["hier"] for r in results]
    sup, sub = check_against_reference(HIER_CASES_2, per_rank, name)
    if name == "flat":
        assert (sup == 0).all() and len(set(sub.tolist())) == 4
        flat = numpy_lloyd(NESTED, per_rank[0]["flat"]["level2_init"][0], NITER, 3)
        assert np.array_equal(sub, flat["labels"])
    if name == "rotnet":
        assert (sup == 0).all() and (sub == 0).all()
    if name == "k_eq_m":
        assert np.array_equal(sub, sup)
    assert per_rank[0][name]["seconds"]["route"] == 0.0


def test_small_super_cluster_is_clamped(two_ranks):
    _, results = two_ranks
    per_rank = [r["hier"] for r in results]
    sup, sub = check_against_reference(HIER_CASES_2, per_rank, "clamp")
    clamped = per_rank[0]["clamp"]["clamped"]
    assert clamped == {s: int((sup == s).sum()) for s in clamped} and clamped
    for s, n_s in clamped.items():  # n_s rows, n_s distinct sub-clusters, the first n_s ids
        assert sorted(set(sub[sup == s].tolist())) == list(range(s * 25, s * 25 + n_s))


def test_k_larger_than_n_is_a_clear_error(two_ranks):
    _, results = two_ranks
    assert all("k=12" in r["hier"]["too_many"] and "n=9" in r["hier"]["too_many"] for r in results)


def test_route_destinations_spread_rows_evenly():
    owners = [[0], [1, 2, 3]]
    sup = torch.tensor([1] * 10 + [0] * 3)
    dest = route_destinations(sup, owners, rank=0)
    assert dest[10:].tolist() == [0, 0, 0]
    assert np.bincount(dest[:10].numpy(), minlength=4).tolist() == [0, 4, 3, 3]
    shifted = route_destinations(sup, owners, rank=1)  # another source starts at another member
    assert np.bincount(shifted[:10].numpy(), minlength=4).tolist() == [0, 3, 4, 3]


# ---------------------------------------------------------------- NMI


def test_nmi_one_process_matches_sklearn():
    a, b = correlated_labels(n=500)
    assert distributed_nmi(a, b)[0] == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
    assert distributed_nmi(a, a)[0] == pytest.approx(1.0)
    assert distributed_nmi([0, 0, 0], [3, 3, 3])[0] == normalized_mutual_info_score([0, 0, 0], [3, 3, 3])
    assert distributed_nmi([0, 0, 0, 0], [0, 1, 2, 3])[0] == normalized_mutual_info_score([0] * 4, [0, 1, 2, 3])


def _check_nmi(per_rank):
    a, b = correlated_labels()
    big_a, big_b = high_k_labels()
    for correlated, high_k in per_rank:
        assert correlated[0] == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
        assert correlated[1] == len(a)
        assert high_k[0] == pytest.approx(normalized_mutual_info_score(big_a, big_b), abs=1e-12)
        assert high_k[1] == len(big_a)
    assert len({tuple(map(tuple, r)) for r in per_rank}) == 1  # the same numbers on every rank


def test_nmi_is_exact_against_sklearn_on_two_and_four_ranks(two_ranks, four_ranks):
    _check_nmi([r["nmi"] for r in two_ranks[1]])
    _check_nmi([r[1] for r in four_ranks])


# ---------------------------------------------------------------- stage driver


def test_stage_labels_every_image_once_on_its_rank(two_ranks):
    _, results = two_ranks
    for rank, (lo, hi) in enumerate(zip(STAGE_BOUNDS, STAGE_BOUNDS[1:])):
        first, second = results[rank]["stage"]
        assert np.array_equal(first["keys"], STAGE_KEYS[lo:hi])  # own images, in the given order
        assert len(second["keys"]) == hi - lo - 3
        for state in (first, second):
            assert np.array_equal(state["sub"] // 3, state["super"]) and state["sub"].max() < 6
    keys = np.concatenate([r["stage"][0]["keys"] for r in results])
    assert sorted(keys.tolist()) == sorted(STAGE_KEYS.tolist())
    sub = np.concatenate([r["stage"][0]["sub"] for r in results])
    assert np.array_equal(results[0]["stage"][0]["sub_sizes"], np.bincount(sub, minlength=6))


def test_stage_files_and_resume_round_trip(two_ranks):
    run_dir, results = two_ranks
    for round_idx in (0, 1):
        out = round_dir(run_dir, round_idx)
        names = {p.name for p in out.iterdir()}
        assert {"centroids_super.npy", "centroids_sub.0.npy", "centroids_sub.1.npy", "pca.npz", "sizes.json",
                "sizes.png", "assignments.rank0.npz", "assignments.rank1.npz"} <= names
        assert np.load(out / "centroids_super.npy").shape == (2, 5)
        assert np.load(out / "centroids_sub.1.npy").shape == (3, 5)
        meta = json.loads((out / "sizes.json").read_text())
        assert meta["world_size"] == 2 and meta["n"] == sum(len(r["stage"][round_idx]["keys"]) for r in results)
        for rank in (0, 1):
            loaded, saved = vars(load_cluster_state(run_dir, round_idx, rank)), results[rank]["stage"][round_idx]
            for field in ("keys", "super", "sub", "sub_sizes", "super_sizes"):
                assert np.array_equal(loaded[field], saved[field]), field
    with pytest.raises(FileNotFoundError, match="round 5"):
        load_cluster_state(run_dir, 5, 0)
    with pytest.raises(ValueError, match="world size 2"):
        load_cluster_state(run_dir, 0, 2)


def test_stage_metrics_and_nmi_with_previous_round(two_ranks):
    run_dir, results = two_ranks
    assert len(read_metrics(run_dir, "pca")) == 2
    events = read_metrics(run_dir, "kmeans")
    summaries = [e for e in events if e.get("summary")]
    iterations = [e for e in events if not e.get("summary")]
    assert len(summaries) == 2 and summaries[0]["nmi_prev"] is None
    assert {e["level"] for e in iterations} == {1, 2} and all(e["objective"] >= 0 for e in iterations)
    for key in ("seconds_level1", "seconds_route", "seconds_level2", "seconds_return", "size_min",
                "size_median", "size_max", "empty_resplit"):
        assert key in summaries[1]
    # sklearn on the images present in both rounds, matched by key over both ranks
    prev = {k: s for r in results for k, s in zip(r["stage"][0]["keys"], r["stage"][0]["sub"])}
    new = {k: s for r in results for k, s in zip(r["stage"][1]["keys"], r["stage"][1]["sub"])}
    common = sorted(prev.keys() & new.keys())
    expected = normalized_mutual_info_score([prev[k] for k in common], [new[k] for k in common])
    assert summaries[1]["nmi_prev"] == pytest.approx(expected, abs=1e-12)
    assert summaries[1]["nmi_pairs"] == len(common) and summaries[1]["nmi_unmatched"] == 0


def test_stage_one_process_memmap_path_matches_ram(tmp_path):
    """memmap_gb=0 puts the whitened features in a local-disk memmap: same labels, file removed after."""
    feats = STAGE_FEATS
    states = []
    for name, memmap_gb in (("ram", 4.0), ("disk", 0.0)):
        cfg = OmegaConf.structured(ClusterConfig(k=6, m=2, pca_dim=5, niter=NITER, memmap_gb=memmap_gb,
                                                 memmap_dir=str(tmp_path)))
        logger = MetricLogger(tmp_path / name, tensorboard=False)
        states.append(run_clustering(feats, STAGE_KEYS, cfg, 0, tmp_path / name, logger, seed=0, device=CPU))
        logger.close()
    assert np.array_equal(states[0].sub, states[1].sub) and np.array_equal(states[0].keys, STAGE_KEYS)
    assert read_metrics(tmp_path / "disk", "pca")[0]["memmap"].endswith(".f32")
    assert not list(tmp_path.glob("*.f32"))


def test_stage_whitens_in_place_when_the_features_are_given_up(tmp_path):
    """overwrite_features=True: the whitened rows reuse the features' memory (one copy of the
    paper's 24.6 GB per rank instead of two), with the same labels as a separate buffer."""
    cfg = OmegaConf.structured(ClusterConfig(k=6, m=2, pca_dim=5, niter=NITER, memmap_dir=str(tmp_path)))
    states, whitened = [], []
    for name, overwrite in (("copy", False), ("in_place", True)):
        feats = torch.from_numpy(STAGE_FEATS.astype(np.float32))
        logger = MetricLogger(tmp_path / name, tensorboard=False)
        states.append(run_clustering(feats, STAGE_KEYS, cfg, 0, tmp_path / name, logger, seed=0, device=CPU,
                                     overwrite_features=overwrite))
        logger.close()
        whitened.append(feats.view(-1)[: len(feats) * 5].view(-1, 5).clone())
    assert np.array_equal(states[0].sub, states[1].sub) and np.array_equal(states[0].super, states[1].super)
    assert torch.equal(torch.from_numpy(STAGE_FEATS.astype(np.float32)).view(-1)[:10], whitened[0].view(-1)[:10])
    norms = whitened[1].norm(dim=1)  # in place: the memory now holds L2-normalised whitened rows
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
