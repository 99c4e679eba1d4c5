"""The peers against expectations worked out apart from their code: EASE on a 3x3 matrix by hand,
EASE as per-item ridge regressions and as the KKT system of its constrained problem, popularity
as counts, and EASE's benchmark hit rate against popularity's, both ranked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

from towers import metrics, peers

# 4 users x 3 items. Item 0's column regressed on items 1 and 2 with l2 = 1:
# [[X1'X1 + 1, X1'X2], [X2'X1, X2'X2 + 1]] = [[4, 1], [1, 3]], right side [X1'x0, X2'x0] = [2, 2]
# -> (4/11, 6/11). Item 1 on items 0, 2: [[4, 2], [2, 3]] w = [2, 1] -> (1/2, 0). Item 2 on
# items 0, 1: [[4, 2], [2, 4]] w = [2, 1] -> (1/2, 0).
HAND_SEEN = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 0]], bool)
HAND_WEIGHTS = np.array([[0, 1 / 2, 1 / 2], [4 / 11, 0, 0], [6 / 11, 0, 0]])


def test_ease_on_a_hand_worked_matrix():
    """B[i, j] is item i's weight in predicting item j (scores = X B), with a zero diagonal.
    Catches: a transposed B (it is not symmetric here), a wrong normalisation of the precision
    columns (rows instead of columns), the l2 added off the diagonal or not at all, the diagonal
    left in, or scores B X' instead of X B."""
    np.testing.assert_allclose(peers.ease_item_weights(HAND_SEEN, 1.0), HAND_WEIGHTS, atol=1e-6)
    np.testing.assert_allclose(peers.ease_scores(HAND_SEEN, 1.0),
                               [[4 / 11, 1 / 2, 1 / 2], [6 / 11, 1 / 2, 1 / 2],
                                [10 / 11, 1 / 2, 1 / 2], [4 / 11, 0, 0]], atol=1e-6)


def test_ease_weights_are_per_item_ridge_regressions():
    """The closed form against its definition, one ridge regression per column (np.linalg.solve
    on the other columns): catches any slip in the closed form on a random matrix."""
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


def test_ease_weights_solve_the_constrained_problem():
    """min ||X - XB||^2 + l2 ||B||^2 subject to diag(B) = 0, column by column through its KKT
    system [[X'X + l2 I, e_j], [e_j', 0]] [b; mu] = [X'x_j; 0], solved by least squares: the
    same optimum reached without the closed form's inverse, on a wider-than-tall matrix (more
    items than users, where X'X alone is singular)."""
    seen = np.random.default_rng(1).random((6, 10)) < 0.4
    l2 = 0.5
    x = seen.astype(np.float64)
    gram = x.T @ x + l2 * np.eye(10)
    expected = np.zeros((10, 10))
    for item in range(10):
        unit = np.eye(10)[item]
        kkt = np.block([[gram, unit[:, None]], [unit[None, :], np.zeros((1, 1))]])
        solution = np.linalg.lstsq(kkt, np.concatenate([x.T @ x[:, item], [0.0]]), rcond=None)[0]
        expected[:, item] = solution[:10]
    np.testing.assert_allclose(peers.ease_item_weights(seen, l2), expected, atol=1e-5)


def test_popularity_scores_are_training_counts():
    """Every user gets each item's count of training interactions (catches counting users
    instead of items, i.e. summing the wrong axis)."""
    np.testing.assert_array_equal(peers.popularity_scores(HAND_SEEN), [[3, 3, 2]] * 4)


def _hit_rate_by_hand(scores, seen, users, items, k=10) -> float:
    """Share of test pairs whose item has fewer than k unseen items ranked above it (a higher
    score, or the same score and a lower row: the stable order of `metrics.rankings`)."""
    hits = []
    for user, item in zip(users, items):
        if seen[user, item]:
            hits.append(False)
            continue
        row, score = scores[user], scores[user, item]
        above = (~seen[user]) & ((row > score) | ((row == score) & (np.arange(len(row)) < item)))
        hits.append(above.sum() < k)
    return float(np.mean(hits))


def test_ease_beats_popularity_on_the_benchmark(benchmark_rows):
    """EASE (l2 500) on the benchmark split: the metric code's hit rate@10 equals one ranked by
    hand, and is well above popularity's (docs/design.md: 0.091), as the collaborative peer must be.
    Catches a broken EASE (transposed weights, a sign slip: it falls to popularity's level or
    below) and a metric that ranks seen items or breaks ties differently. The metric code reads
    the scores a block of users at a time and the seen items as a sparse matrix, as at scale."""
    seen, users, items = benchmark_rows
    ease = np.asarray(peers.ease_scores(seen, 500.0), np.float64)
    by_hand = _hit_rate_by_hand(ease, seen, users, items)
    sparse = scipy.sparse.csr_matrix(seen, dtype=np.float32)
    lazy = peers.ease_scores(sparse, 500.0)
    assert metrics.evaluate(lazy, users, items, sparse, (10,), batch=100)["hit_rate@10"] == pytest.approx(by_hand)
    counts = seen.sum(axis=0).astype(np.float64)
    popularity = _hit_rate_by_hand(np.broadcast_to(counts, seen.shape), seen, users, items)
    assert popularity == pytest.approx(0.091, abs=0.0005)  # docs/evaluation.md's popularity peer
    assert by_hand >= 1.6 * popularity, (by_hand, popularity)


def test_ease_neighbours_keep_each_rows_largest_weights_by_magnitude():
    """The bounded EASE term against the dense weights pruned by hand: each source item keeps its
    k weights of largest magnitude (negative ones too), and scores are sums over the history.
    Catches: pruning columns instead of rows, dropping negative weights, a CSR built transposed,
    or pair scores gathered from the wrong rows."""
    rng = np.random.default_rng(3)
    seen = rng.random((30, 12)) < 0.35
    dense = peers.ease_item_weights(seen, 2.0)
    neighbours = peers.ease_neighbours(peers.seen_matrix(*np.nonzero(seen), 30, 12), 2.0, k=4)
    pruned = np.zeros_like(dense)
    for row in range(12):
        keep = np.argsort(-np.abs(dense[row]), kind="stable")[:4]
        pruned[row, keep] = dense[row, keep]
    np.testing.assert_allclose(neighbours.matrix().toarray(), pruned, atol=1e-5)
    assert (pruned < 0).any()  # the case where magnitude, not sign, decides
    history = peers.seen_matrix(*np.nonzero(seen), 30, 12)
    np.testing.assert_allclose(neighbours.scores(history), seen @ pruned, atol=1e-5)
    items = rng.integers(0, 12, (30, 5))
    np.testing.assert_allclose(neighbours.pair_scores(history, items, batch=7),
                               np.take_along_axis(seen @ pruned, items, 1), atol=1e-5)
    # k >= items keeps the dense weights.
    full = peers.ease_neighbours(history, 2.0, k=50)
    np.testing.assert_allclose(full.matrix().toarray(), dense, atol=1e-5)


def test_seen_matrix_counts_repeats_once():
    matrix = peers.seen_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), 2, 3)
    np.testing.assert_array_equal(matrix.toarray(), [[0, 0, 1], [1, 0, 0]])


def test_ease_beyond_its_bound_is_fit_on_the_most_interacted_items():
    """A catalog larger than `max_items`: EASE is the exact fit on the `max_items` most-interacted
    items (chosen by training count, not by row), the others have no weights and score 0; the
    evaluation peer above the bound scores with those weights. Catches the subset chosen by
    row order, weights mapped back to the wrong items, or the fit run on every item anyway."""
    rng = np.random.default_rng(5)
    seen = rng.random((80, 15)) < np.linspace(0.6, 0.05, 15)  # popularity falls with the row
    seen[:, 12] = rng.random(80) < 0.9  # except one late, popular item
    sparse = scipy.sparse.csr_matrix(seen, dtype=np.float32)
    kept = np.sort(np.argsort(-seen.sum(axis=0), kind="stable")[:6])
    assert 12 in kept and 6 not in kept
    subset = peers.ease_item_weights(seen[:, kept], 2.0)  # the exact fit on those items
    full = np.zeros((15, 15), np.float32)
    full[np.ix_(kept, kept)] = subset
    pruned = np.zeros_like(full)
    for row in kept:
        keep = np.argsort(-np.abs(full[row]), kind="stable")[:4]
        pruned[row, keep] = full[row, keep]
    bounded = peers.ease_neighbours(sparse, 2.0, k=4, max_items=6)
    np.testing.assert_allclose(bounded.matrix().toarray(), pruned, atol=1e-5)
    np.testing.assert_allclose(np.asarray(peers.ease_scores(sparse, 2.0, max_items=6)),
                               seen @ full, atol=1e-5)
    with pytest.raises(ValueError, match="max_items must be at least 1"):
        peers.ease_neighbours(sparse, 2.0, max_items=0)


def test_content_popularity_recovers_a_planted_additive_model():
    """log(1 + count) = 1 + 2 [drama] + 0.5 [comedy] + year effect (1960: 0, 1980: 1, 2000: 2):
    fit on the items with a count, the prediction for the 30 items without one is the planted
    value (ridge l2 1 on 270 items shrinks it by little); two other year effects (the buckets
    in the wrong order) would miss it."""
    rng = np.random.default_rng(0)
    items = 300
    drama, comedy = rng.random(items) < 0.5, rng.random(items) < 0.3
    era = rng.integers(0, 3, items)
    categories = [tuple(name for name, on in (("drama", d), ("comedy", c)) if on)
                  for d, c in zip(drama, comedy)]
    years = [str(1960 + 20 * e) for e in era]
    planted = 1 + 2 * drama + 0.5 * comedy + era
    count = np.round(np.expm1(planted) * 100) / 100  # counts as float, exact enough
    count[:30] = 0  # new items
    prior = peers.content_popularity(categories, years, count)
    assert prior.dtype == np.float32 and prior.shape == (items,)
    np.testing.assert_allclose(prior[:30], np.log1p(np.expm1(planted[:30])), atol=0.05)
    np.testing.assert_allclose(prior[30:], np.log1p(count[30:]), atol=0.05)


def test_content_popularity_edge_cases():
    # No item has a training count: nothing to learn from.
    assert not peers.content_popularity([("a",), ()], ["1990", "unknown"], np.zeros(2)).any()
    # Unknown years are a bucket of their own, learned like any other.
    prior = peers.content_popularity([(), (), (), ()], ["unknown", "unknown", "1990", "1990"],
                                     np.array([0.0, np.e ** 3 - 1, np.e - 1, 0.0]), l2=1e-6)
    np.testing.assert_allclose(prior, [3.0, 3.0, 1.0, 1.0], atol=1e-3)
    with pytest.raises(ValueError, match="3 years for 2 item counts"):
        peers.content_popularity([(), ()], ["1", "2", "3"], np.ones(2))


def test_decayed_counts_halve_each_half_life():
    # Item 0: a row at the newest time (weight 1) and one two half-lives older (1/4); item 1: one
    # row a half-life old (1/2); item 2: none.
    counts = peers.decayed_counts(np.array([0, 0, 1]), np.array([100, 60, 80]), 3, 20.0)
    np.testing.assert_allclose(counts, [1.25, 0.5, 0.0])
    np.testing.assert_array_equal(peers.decayed_counts(np.array([0, 0, 1]), np.array([1, 2, 3]), 3),
                                  [2, 1, 0])
    # A row far older than the half-life still counts above 0 (0 marks an item as new).
    assert peers.decayed_counts(np.array([0, 1]), np.array([0, 10**9]), 2, 1.0)[0] > 0
    with pytest.raises(ValueError, match="half-life must be positive, got 0"):
        peers.decayed_counts(np.array([0]), np.array([0]), 1, 0.0)


def test_unseen_hits_match_a_dense_ranking():
    rng = np.random.default_rng(3)
    users, items, k = 40, 30, 5
    seen = scipy.sparse.csr_matrix(rng.random((users, items)) < 0.3)
    scores = rng.integers(0, 6, items).astype(float)  # ties, broken by item row
    user_rows, item_rows = rng.integers(0, users, 200), rng.integers(0, items, 200)
    order = np.argsort(-scores, kind="stable")
    dense = seen.toarray()
    expected = [i in [j for j in order if not dense[u, j]][:k] for u, i in
                zip(user_rows, item_rows)]
    np.testing.assert_array_equal(peers.unseen_hits(scores, seen, user_rows, item_rows, k),
                                  expected)
    assert 0.1 < np.mean(expected) < 0.9  # the check has both hits and misses to get right


def _trend(shuffle_time: bool):
    """2,000 users, 200 items; each training row at a time 0..999; items 0-19 are taken only late
    (time >= 900) and the held-out rows are later still, from the same late taste; every other
    row picks an item at random. `shuffle_time`: the same rows with their times permuted, so
    time says nothing."""
    rng = np.random.default_rng(0)
    n = 40_000
    time = rng.integers(0, 1000, n)
    item = np.where((time >= 900) & (rng.random(n) < 0.5), rng.integers(0, 20, n),
                    rng.integers(20, 200, n))
    user = rng.integers(0, 2000, n)
    held_users = rng.integers(0, 2000, 3000)
    held_items = np.where(rng.random(3000) < 0.5, rng.integers(0, 20, 3000),
                          rng.integers(20, 200, 3000))
    if shuffle_time:
        time = rng.permutation(time)
        held_items = rng.integers(0, 200, 3000)
    seen = scipy.sparse.csr_matrix((np.ones(n), (user, item)), shape=(2000, 200))
    return item, time, seen, held_users, held_items


def test_choose_half_life_finds_a_planted_trend_and_keeps_all_time_counts_without_one():
    half_life, tried = peers.choose_half_life(*_trend(False), k=10)
    # All-time counts rank the late items below the 180 others' ties; decay puts them first.
    assert half_life is not None and half_life <= 999 / 8
    assert tried[0]["half_life"] is None
    assert max(r["hit_rate@10"] for r in tried[1:]) > 2 * tried[0]["hit_rate@10"]
    half_life, tried = peers.choose_half_life(*_trend(True), k=10)
    assert half_life is None and len(tried) == 1 + len(peers.HALF_LIFE_FRACTIONS)


def test_half_life_search_in_one_line():
    tried = [{"half_life": None, "hit_rate@100": 0.2781, "gain": 0.0, "standard_error": 0.0},
             {"half_life": 1_243_652.0, "hit_rate@100": 0.2844, "gain": 0.0064,
              "standard_error": 0.0015},
             {"half_life": 86_400.0, "hit_rate@100": 0.2611, "gain": -0.017,
              "standard_error": 0.0021}]
    assert peers.format_half_life_search(1_243_652.0, tried) == (
        "half-life 1,243,652 in the timestamp's units (14.4 days if seconds); tried: all-time "
        "hit_rate@100 0.2781; 14.4 days if seconds 0.2844 (+0.0064, SE 0.0015); 1.0 days if "
        "seconds 0.2611 (-0.0170, SE 0.0021)")
    assert peers.format_half_life_search(None, tried[:1]) == (
        "all-time counts; tried: all-time hit_rate@100 0.2781")
    assert peers.format_half_life_search(None, []) == "all-time counts"
