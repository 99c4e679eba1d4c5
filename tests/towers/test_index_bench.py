"""`cascade bench retrieval-index` on tiny catalogs: what it writes and that its recalls are\nthe indexes' recalls against numpy, not how fast it is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from towers import index, index_bench


def _exact_top_10(queries, catalog, excluded=None):
    """Row sets of each query's 10 best catalog rows by numpy, excluded rows left out."""
    scores = queries.astype(np.float64) @ catalog.T.astype(np.float64)
    if excluded is not None:
        for row, rows in enumerate(excluded):
            scores[row, [r for r in rows if r >= 0]] = -np.inf
    return [set(np.argsort(-row, kind="stable")[:10]) for row in scores]


def test_benchmark_writes_table_plot_and_chosen_config(tmp_path, monkeypatch):
    """The recall@10 each index is reported with is its recall against exact search done here in
    numpy, on the layers the benchmark built (captured), with each user's seen items excluded on
    the real catalog. Catches: seen IDs mapped to the wrong candidate rows (or not excluded from
    the exact reference), recall over the wrong K or normalised by the found count, the exact
    reference taken from the wrong catalog, and the synthetic catalog not being the one searched."""
    rng = np.random.default_rng(3)
    candidates = rng.normal(size=(400, 8)).astype(np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    ids = np.array([str(i) for i in range(400)])
    # Each user has seen the rows of their 2 best items: excluding them changes the exact top 10.
    best = np.argsort(-(queries @ candidates.T), axis=1)[:, :2]
    seen = np.array([[ids[a], ids[b], ""] for a, b in best])
    built = []
    build = index.build_index

    def capture(kind, *args, **kwargs):
        built.append((kind, build(kind, *args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(index, "build_index", capture)
    results = index_bench.run_index_benchmark(queries, ids, candidates, seen, tmp_path, synthetic_items=3000)

    written = json.loads((tmp_path / "retrieval_index.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written["catalogs"]) == {"real", "synthetic"}
    assert written["catalogs"]["synthetic"]["items"] == 3000
    assert [kind for kind, _ in built] == ["bruteforce", "scann"] * 2  # real, then synthetic
    excluded = np.array([[a, b, -1] for a, b in best], np.int32)
    synthetic = index_bench.synthetic_catalog(candidates, 3000, seed=0)
    for (name, catalog, ex), layers in zip((("real", candidates, excluded), ("synthetic", synthetic, None)),
                                           (built[:2], built[2:])):
        exact = _exact_top_10(queries, catalog, ex)
        for kind, layer in layers:
            if ex is None:
                found = layer(tf.constant(queries), k=10)[1].numpy()
            else:
                found = layer.query_with_exclusions(tf.constant(queries), tf.constant(ex), k=10)[1].numpy()
            recall = np.mean([len(set(f) & e) / 10 for f, e in zip(found, exact)])
            assert written["catalogs"][name][kind]["recall@10"] == pytest.approx(recall, abs=1e-9), (name, kind)
            if kind == "bruteforce":
                assert recall == 1.0  # brute force is exact: numpy agrees with it
        assert written["catalogs"][name]["sweep"]
        for point in written["catalogs"][name]["sweep"]:
            assert 0.0 <= point["recall@10"] <= 1.0
    # The exclusions mattered: without them the exact top 10 holds the seen items.
    assert all({a, b} <= e for (a, b), e in zip(best, _exact_top_10(queries, candidates)))
    assert written["scann_config"] == written["catalogs"]["real"]["scann_config"]
    table = (tmp_path / "retrieval_index.md").read_text()
    assert "| synthetic | 3,000 | scann |" in table and "seen items excluded" in table
    assert (tmp_path / "retrieval_index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_catalog_is_deterministic_and_normalized():
    real = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    first = index_bench.synthetic_catalog(real, 1000, seed=1)
    np.testing.assert_array_equal(first, index_bench.synthetic_catalog(real, 1000, seed=1))
    assert first.shape == (1000, 4) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
