"""`cascade bench retrieval-index` on tiny catalogs: what it writes, not how fast it is."""

from __future__ import annotations

import json

import numpy as np

from towers import index_bench


def test_benchmark_writes_table_plot_and_chosen_config(tmp_path):
    rng = np.random.default_rng(3)
    candidates = rng.normal(size=(400, 8)).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    ids = np.array([str(i) for i in range(400)])
    seen = np.array([[str(i), str(i + 1), ""] for i in range(30)])
    results = index_bench.run_index_benchmark(queries, ids, candidates, seen, tmp_path, synthetic_items=3000)

    written = json.loads((tmp_path / "retrieval_index.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written["catalogs"]) == {"real", "synthetic"}
    assert written["catalogs"]["synthetic"]["items"] == 3000
    for catalog in written["catalogs"].values():
        assert catalog["bruteforce"]["recall@10"] == 1.0
        assert 0.0 <= catalog["scann"]["recall@10"] <= 1.0
        assert catalog["sweep"] and all(0.0 <= p["recall@10"] <= 1.0 for p in catalog["sweep"])
    assert written["scann_config"] == written["catalogs"]["real"]["scann_config"]
    table = (tmp_path / "retrieval_index.md").read_text()
    assert "| synthetic | 3,000 | scann |" in table and "seen items excluded" in table
    assert (tmp_path / "retrieval_index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_catalog_is_deterministic_and_normalized():
    real = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    first = index_bench.synthetic_catalog(real, 1000, seed=1)
    np.testing.assert_array_equal(first, index_bench.synthetic_catalog(real, 1000, seed=1))
    assert first.shape == (1000, 4) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
