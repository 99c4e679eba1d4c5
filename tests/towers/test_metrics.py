"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

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
