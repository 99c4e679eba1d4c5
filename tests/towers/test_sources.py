"""The candidate-source merge (`towers.sources.merged`) on hand-made scores: which item each
source takes, the fall-back to the two-tower's next items, the final order. The graph's copy of
the merge is held to this one in tests/serving/test_export.py."""

from __future__ import annotations

import numpy as np
import pytest

from towers import sources


def test_each_source_fills_its_slots_and_empty_slots_fall_back_to_the_two_tower():
    logits = np.array([[6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]], np.float32)  # items 0..5
    seen = np.zeros((2, 6), bool)
    seen[0, 0] = True
    seen[1, [0, 3]] = True  # user 1 has seen the only new item
    item_item = np.array([[0, 0, 0, 0, 0.5, 0.9],  # user 0: item 5 first, then 4
                          [0, 0, 0, 0, 0, 0]], np.float32)  # user 1: no history neighbours
    is_new = np.array([False, False, False, True, False, False])
    rows, codes = sources.merged(logits, seen, item_item, is_new, sources.SourceConfig(2, 1, 1, 0))
    # User 0: two-tower 1, 2; item-to-item 5 (0.9 beats 0.5); new 3; ordered by the logit.
    assert rows[0].tolist() == [1, 2, 3, 5] and codes[0].tolist() == [0, 0, 2, 1]
    # User 1: neither other source has an item, so the two-tower's next (4, 5) fill the slots.
    assert rows[1].tolist() == [1, 2, 4, 5] and codes[1].tolist() == [0, 0, 0, 0]


def test_an_item_item_pick_is_never_an_item_the_two_tower_already_took():
    logits = np.array([[3, 2, 1, 0]], np.float32)
    item_item = np.array([[5, 4, 0, 1]], np.float32)  # best by item-to-item: 0 and 1, taken
    rows, codes = sources.merged(logits, np.zeros((1, 4), bool), item_item,
                                 np.zeros(4, bool), sources.SourceConfig(2, 1))
    assert rows[0].tolist() == [0, 1, 3] and codes[0].tolist() == [0, 0, 1]


def test_hit_rate_of_a_candidate_set():
    candidates = np.array([[1, 2], [3, 4]])  # for user rows 5 and 7
    assert sources.hit_rate(candidates, np.array([5, 5, 7]), np.array([2, 3, 4]),
                            users=np.array([5, 7])) == pytest.approx(2 / 3)


def test_slot_counts_are_checked():
    with pytest.raises(ValueError, match="two_tower >= 1"):
        sources.SourceConfig(0, 5)
