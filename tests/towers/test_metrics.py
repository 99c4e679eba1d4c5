"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse

from towers import metrics

# 2 users x 5 items. User 0 ranks items 4,3,2,1,0; user 1 ranks 0,1,2,3,4.
SCORES = np.array([[0.0, 1.0, 2.0, 3.0, 4.0],
                   [4.0, 3.0, 2.0, 1.0, 0.0]])


def test_hand_computed_without_exclusion():
    # Test pairs: user 0 -> item 3 (rank 1), user 0 -> item 0 (rank 4), user 1 -> item 2 (rank 2).
    result = metrics.evaluate(SCORES, np.array([0, 0, 1]), np.array([3, 0, 2]), None, ks=(1, 2, 3))
    assert result["hit_rate@1"] == 0.0
    assert result["hit_rate@2"] == pytest.approx(1 / 3)
    assert result["hit_rate@3"] == pytest.approx(2 / 3)
    # Recall per user: @2 user0 1/2, user1 0/1; @3 user0 1/2, user1 1/1.
    assert result["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert result["recall@3"] == pytest.approx((0.5 + 1.0) / 2)
    # NDCG@3: user0 hit at rank 1 -> 1/log2(3); ideal for 2 relevant = 1 + 1/log2(3).
    user0 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    user1 = (1 / math.log2(4)) / 1.0
    assert result["ndcg@3"] == pytest.approx((user0 + user1) / 2)


def test_exclusion_moves_items_up():
    seen = np.zeros_like(SCORES, bool)
    seen[0, 4] = True  # user 0's best item is a training item
    result = metrics.evaluate(SCORES, np.array([0]), np.array([3]), seen, ks=(1,))
    assert result["hit_rate@1"] == 1.0
    assert result["ndcg@1"] == 1.0
    top = metrics.rankings(SCORES, seen, depth=5)
    assert list(top[0]) == [3, 2, 1, 0, 4]  # the seen item drops to the end


def test_ties_go_to_the_lower_row():
    ties = np.ones((1, 4))
    assert list(metrics.rankings(ties, depth=4)[0]) == [0, 1, 2, 3]


def test_shape_errors():
    with pytest.raises(ValueError, match="seen mask has shape"):
        metrics.rankings(SCORES, np.zeros((1, 5), bool))
    with pytest.raises(ValueError, match="matching 1-D arrays"):
        metrics.evaluate(SCORES, np.array([0, 1]), np.array([1]), None)


def test_top_items_equal_a_stable_sort_with_ties_across_the_cut():
    """The partition-then-sort ranking against a full stable sort, on blocks full of ties (small
    integer scores) where the depth cuts through a tie: the order of the lower item row first
    must hold exactly, as popularity's numbers rely on it."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        block = rng.integers(0, rng.integers(2, 30), size=(5, rng.integers(1, 60))).astype(float)
        if trial % 3 == 0:
            block = rng.random(block.shape)
        depth = int(rng.integers(1, 70))
        expected = np.argsort(-block, axis=1, kind="stable")[:, :depth]
        np.testing.assert_array_equal(metrics.top_items(block, depth), expected)


def test_blocks_and_sparse_seen_give_the_dense_result():
    """Scores read a block of users at a time and a sparse seen matrix give exactly the metrics
    of the dense arrays; only the test users' rows are read."""
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, size=(40, 25)).astype(float)  # ties everywhere
    seen = rng.random((40, 25)) < 0.2
    users = rng.integers(0, 30, 60)
    items = rng.integers(0, 25, 60)
    read = []
    lazy = metrics.Scores(scores.shape, lambda rows: read.append(rows.copy()) or scores[rows])
    expected = metrics.evaluate(scores, users, items, seen, (1, 5, 10))
    got = metrics.evaluate(lazy, users, items, scipy.sparse.csr_matrix(seen), (1, 5, 10), batch=7)
    assert got == expected
    assert set(np.concatenate(read)) == set(users) and max(map(len, read)) <= 7
