"""The peers: EASE's closed form against a direct per-item ridge regression, and its benchmark
hit rate (a golden value, like popularity's in test_data.py)."""

from __future__ import annotations

import numpy as np
import pytest

from towers import metrics, peers


def test_ease_weights_are_per_item_ridge_regressions():
    seen = np.random.default_rng(0).random((40, 9)) < 0.3
    l2 = 3.0
    weights = peers.ease_item_weights(seen, l2)
    x = seen.astype(np.float64)
    for item in range(seen.shape[1]):
        others = np.delete(np.arange(seen.shape[1]), item)
        # Item `item`'s column regressed on the other columns, ridge penalty l2.
        ridge = np.linalg.solve(x[:, others].T @ x[:, others] + l2 * np.eye(len(others)),
                                x[:, others].T @ x[:, item])
        np.testing.assert_allclose(weights[others, item], ridge, rtol=1e-4, atol=1e-6)
        assert weights[item, item] == 0.0
    np.testing.assert_allclose(peers.ease_scores(seen, l2), seen @ weights, rtol=1e-5)
    with pytest.raises(ValueError, match="l2 must be positive"):
        peers.ease_item_weights(seen, 0.0)


def test_ease_benchmark_hit_rate(benchmark_rows):
    """EASE (l2 500) on the benchmark split: hit rate@10 0.1767, above the two-tower's 0.156."""
    seen, users, items = benchmark_rows
    result = metrics.evaluate(peers.ease_scores(seen, 500.0), users, items, seen, (10,))
    assert round(result["hit_rate@10"], 3) == 0.177  # 0.17665
