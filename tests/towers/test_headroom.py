"""The headroom diagnostic (`towers/headroom.py`): per-user standardization, and a planted mix the
grid must find, on the test rows and cross-fit on halves of the users."""

from __future__ import annotations

import numpy as np
import pytest

from towers import headroom, metrics


def test_standardized_over_unseen_items_only():
    block = np.array([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    seen = np.array([[False, False, False, True], [False, True, False, False]])
    z = headroom.standardized(block, seen)
    # Row 0: mean 2, population std sqrt(2/3) over the three unseen items; the seen 100 is ignored.
    np.testing.assert_allclose(z[0], [-1.224745, 0.0, 1.224745, 0.0], atol=1e-6)
    np.testing.assert_array_equal(z[1], [0.0, 0.0, 0.0, 0.0])  # constant row: no division by 0


def _scores(matrix: np.ndarray) -> metrics.Scores:
    return metrics.Scores(matrix.shape, lambda rows: matrix[rows])


def test_planted_mix_is_found_on_test_rows_and_cross_fit():
    """Each user's one test item is the best unseen item by z(ease) + 1 * z(two_tower): neither
    signal alone finds most of them, the grid's mix a=1 b=0 finds all, and both halves of the
    cross-fit choose it."""
    rng = np.random.default_rng(3)
    users, items = 80, 30
    seen = rng.random((users, items)) < 0.2
    ease, tower = rng.normal(size=(users, items)), rng.normal(size=(users, items)) * 7 + 3
    popularity = np.broadcast_to(rng.random(items), (users, items))
    planted = headroom.standardized(ease, seen) + headroom.standardized(tower, seen)
    test_items = np.argmax(np.where(seen, -np.inf, planted), axis=1)
    user_rows = np.arange(users)
    signals = {"ease": _scores(ease), "two_tower": _scores(tower),
               "popularity": _scores(np.asarray(popularity))}
    hits = headroom.mix_hits(signals, seen, user_rows, test_items, k=1, batch=16)
    result = headroom.summarize(hits, user_rows, seed=0)
    assert result["oracle"] == {"hit_rate": 1.0, "weights": "mix a=1 b=0"}
    assert result["cross_fit"]["hit_rate"] == 1.0
    assert result["cross_fit"]["weights"] == ["mix a=1 b=0", "mix a=1 b=0"]
    assert result["alone"]["ease"] < 0.6 and result["alone"]["two_tower"] < 0.6
    assert result["rows"] == users and result["grid"]["mix a=0 b=0"] == result["alone"]["ease"]


def test_a_missing_signal_is_named():
    seen = np.zeros((2, 3), bool)
    with pytest.raises(ValueError, match="popularity"):
        headroom.mix_hits({"ease": _scores(np.zeros((2, 3))), "two_tower": _scores(np.zeros((2, 3)))},
                          seen, np.array([0]), np.array([1]))
