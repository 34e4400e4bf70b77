"""bench/hierarchy.py --quick: every variant on 1 and 2 gloo ranks, the objective the bench reports
recomputed independently (numpy, from the rows, the labels and the centroids the ranks return) equal
to the code's own, NMI against flat from sklearn, the cost model as the issue states it.

    ~/.cache/dist_cluster/venv/bin/python -m pytest -q tests/test_bench_hierarchy.py
"""
import json

import numpy as np
import pytest

from bench import hierarchy


def test_quick_bench_rows_and_their_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(hierarchy, "CACHE", tmp_path / "cache")
    out = tmp_path / "hierarchy.json"
    doc = hierarchy.main(["--quick", "--ms", "1,4,16", "--threads", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(doc["rows"]))
    rows = {(r["world"], r["m"]): r for r in doc["rows"]}
    assert sorted(rows) == [(w, m) for w in (1, 2) for m in (1, 4, 16)]
    for (world, m), r in rows.items():
        assert r["n"] == 20000 and r["k"] == 256 and len(r["peak_mib_per_rank"]) == world
        assert r["objective"] == pytest.approx(r["objective_code"], rel=1e-6)  # numpy == the code's sum
        assert r["cost_model"] == pytest.approx(1.0 if m == 1 else (m + 256 / m) / 256)
        assert 0 <= r["empty_or_clamped"] < 0.05 and 0 < r["nmi_vs_flat"] <= 1
        assert r["objective_vs_flat"] == pytest.approx(r["objective"] / rows[(world, 1)]["objective"])
    assert rows[(1, 1)]["nmi_vs_flat"] == 1.0


def test_flat_objective_is_the_sum_of_squared_distances():
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], np.float32)
    centroids = np.array([[0.5, 0.0], [5.0, 4.0]], np.float32)
    assert hierarchy.flat_objective(rows, np.array([0, 0, 1]), centroids, chunk=2) == pytest.approx(0.25 + 0.25 + 1.0)
