"""The simple peers every retrieval number is compared with, scored by the same metric code.

- popularity: every user gets the items with the most training interactions.
- implicit ALS (Hu, Koren & Volinsky 2008) from the `implicit` package, 64 factors.
- EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): an item-item linear model with a
  closed form, B = I - P diag(1 / diag(P)) for P = (X'X + l2 I)^-1, scores X B. On MovieLens-100K
  it is the strongest peer (docs/results.md), and the re-ranker uses its score as a feature, bounded:
  `ItemNeighbours` keeps each item's `k` largest weights by magnitude (`ease_neighbours`), so the
  term inside the exported graphs has I x k entries, not users x items or items x items. The fit
  inverts one dense matrix over at most `EASE_MAX_ITEMS` items: beyond that, EASE is fit on the
  most-interacted items only and the others have no weights (their score is 0).
- content popularity: an item's training count as predicted from its content (categories and
  release-year bucket), for items that have no count of their own (`content_popularity`).
- trending popularity: training counts with each interaction's weight halved every `half_life`
  before the newest training row (`decayed_counts`); the half-life is chosen on held-out rows
  (`choose_half_life`), all-time counts unless one raises their hit rate. Under a global time cut
  (`--split temporal`), where most test users are new, what was popular lately is what they take.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse
import threadpoolctl

from towers import metrics

# Items the EASE fit inverts over (one float64 m x m matrix, 0.8 GB and ~30 s on 2 cores at
# 10,000); a larger catalog's EASE covers its 10,000 most-interacted items.
EASE_MAX_ITEMS = 10_000

# `seen` below is the binary [U, I] training matrix, dense or scipy sparse; the scores are
# `metrics.Scores` (a block of users at a time) or a broadcast view, never users x items in memory.


def popularity_scores(seen) -> np.ndarray:
    """[U, I] scores (a broadcast view): each item's training interaction count, the same for
    every user."""
    counts = np.asarray(seen.sum(axis=0), np.float32).ravel()
    return np.broadcast_to(counts, seen.shape)


def decayed_counts(item_rows: np.ndarray, timestamps: np.ndarray, items: int,
                   half_life: float | None = None) -> np.ndarray:
    """float64 [items]: each item's interactions (`item_rows` [N], rows of the item table), each
    weighted 2^(-(newest - t) / half_life), `newest` the largest of `timestamps` [N]; `None`: the
    plain counts. Every item with a row keeps a count above 0 (the head's new-item test is count
    == 0): a weight never falls below the smallest positive float64."""
    item_rows = np.asarray(item_rows)
    if half_life is None or not len(item_rows):
        return np.bincount(item_rows, minlength=items).astype(np.float64)
    if not half_life > 0:
        raise ValueError(f"popularity half-life must be positive, got {half_life}")
    weight = np.array(timestamps, np.float64)  # one float64 array of N, worked in place
    np.subtract(weight.max(), weight, out=weight)  # age
    weight /= -half_life
    np.exp2(weight, out=weight)
    np.maximum(weight, np.finfo(np.float64).tiny, out=weight)
    return np.bincount(item_rows, weight, minlength=items)


# Half-lives `choose_half_life` tries, as fractions of the training rows' time span (so any time
# unit works): span / 2 ... span / 32, beside all-time counts.
HALF_LIFE_FRACTIONS = (2, 4, 8, 16, 32)


def unseen_hits(scores: np.ndarray, seen: scipy.sparse.csr_matrix, user_rows: np.ndarray,
                item_rows: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: is item_rows[j] in user_rows[j]'s top `k` of one ranking shared by every user
    (`scores` [I]; ties by item row), the user's `seen` items excluded (a seen pair is a miss)?
    Memory: the seen entries of the pairs' users, never users x items."""
    user_rows, item_rows = np.asarray(user_rows, np.int64), np.asarray(item_rows, np.int64)
    owners, user_rows = np.unique(user_rows, return_inverse=True)
    seen = scipy.sparse.csr_matrix(seen)[owners]  # only the pairs' users' rows
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    owner = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
    stride = len(order) + 1
    keys = np.sort(owner * stride + rank[seen.indices])  # each user's seen ranks, users in order
    # Seen items ranked above the pair's item, among the user's own (a user's keys are contiguous).
    above = (np.searchsorted(keys, user_rows * stride + rank[item_rows])
             - np.searchsorted(keys, user_rows * stride))
    is_seen = np.asarray(seen[user_rows, item_rows]).ravel() > 0
    return (rank[item_rows] - above < k) & ~is_seen


def choose_half_life(item_rows: np.ndarray, timestamps: np.ndarray, seen, held_users: np.ndarray,
                     held_items: np.ndarray, k: int = 100) -> tuple[float | None, list[dict]]:
    """(half-life, the rows tried): the popularity weighting whose ranking best holds the held-out
    pairs (`held_users`, `held_items`: rows newer than or beside the training rows, never a test
    split) in each user's top `k` unseen items; the training rows are `item_rows` and
    `timestamps`, `seen` their [U, I] matrix. A half-life (`HALF_LIFE_FRACTIONS` of the rows'
    time span) replaces all-time counts (`None`) only where it beats them by more than noise:
    its paired gain over the held-out rows above two standard errors. A wide `k`: the term
    re-weights a list of candidates, and the hit rate at 100 is steadier than at 10."""
    items = seen.shape[1]
    timestamps = np.asarray(timestamps)
    span = float(np.max(timestamps) - np.min(timestamps)) if len(timestamps) else 0.0
    tried = [None] + ([span / f for f in HALF_LIFE_FRACTIONS] if span > 0 else [])
    hits = [unseen_hits(decayed_counts(item_rows, timestamps, items, h), seen, held_users,
                        held_items, k) for h in tried]
    rows, best, best_rate = [], None, float(hits[0].mean()) if len(held_users) else 0.0
    for half_life, hit in zip(tried, hits):
        gain = hit.astype(np.float64) - hits[0]
        error = gain.std() / np.sqrt(len(gain)) if len(gain) else 0.0
        rate = float(hit.mean()) if len(hit) else 0.0
        rows.append({"half_life": half_life, f"hit_rate@{k}": round(rate, 4),
                     "gain": round(float(gain.mean()) if len(gain) else 0.0, 4),
                     "standard_error": round(float(error), 4)})
        if half_life is not None and len(gain) and gain.mean() > 2 * error and rate > best_rate:
            best, best_rate = half_life, rate
    return best, rows


def half_life_text(half_life: float) -> str:
    """A half-life as reports print it: in the timestamps' own units, and in days if they are
    seconds (a dataset's timestamps may be any increasing number)."""
    return f"half-life {half_life:,.0f} in the timestamp's units ({_days(half_life)})"


def _days(half_life: float) -> str:
    return f"{half_life / 86400:.1f} days if seconds"


def format_half_life_search(chosen: float | None, tried: list[dict]) -> str:
    """`choose_half_life`'s answer in one line: what it took, and each weighting it tried with its
    held-out hit rate and paired gain over all-time counts (standard error in brackets)."""
    taken = "all-time counts" if chosen is None else half_life_text(chosen)
    parts = []
    for row in tried:
        (key,) = (name for name in row if name.startswith("hit_rate@"))
        if row["half_life"] is None:
            parts.append(f"all-time {key} {row[key]:.4f}")
        else:
            parts.append(f"{_days(row['half_life'])} {row[key]:.4f} "
                         f"({row['gain']:+.4f}, SE {row['standard_error']:.4f})")
    return taken + (f"; tried: {'; '.join(parts)}" if parts else "")


def als_scores(seen, factors: int = 64, regularization: float = 0.05,
               iterations: int = 15, seed: int = 42) -> metrics.Scores:
    """[U, I] scores <user factor, item factor> of implicit ALS fit on the binary seen matrix."""
    from implicit.cpu.als import AlternatingLeastSquares  # an optional, heavy import

    with threadpoolctl.threadpool_limits(1, "blas"):  # implicit's own threads do the work
        model = AlternatingLeastSquares(factors=factors, regularization=regularization,
                                        iterations=iterations, random_state=seed,
                                        calculate_training_loss=False)
        model.fit(scipy.sparse.csr_matrix(seen, dtype=np.float32), show_progress=False)
    return metrics.embedding_scores(np.asarray(model.user_factors), np.asarray(model.item_factors))


def ease_item_weights(seen, l2: float = 500.0) -> np.ndarray:
    """float32 [I, I] EASE weights B for the binary `seen` [U, I] matrix: the ridge regression of
    each item's column on every other item's, with a zero diagonal (an item never predicts itself).
    One I x I inverse, so for catalogs up to a few tens of thousands of items."""
    if not l2 > 0:
        raise ValueError(f"EASE l2 must be positive, got {l2}")
    x = scipy.sparse.csr_matrix(seen, dtype=np.float64)
    return _ease_from_gram(np.asarray((x.T @ x).todense()), l2).astype(np.float32)


def _ease_from_gram(gram: np.ndarray, l2: float) -> np.ndarray:
    """B from the item-item Gram matrix X'X (float64 [I, I]): -P / diag(P), zero diagonal."""
    if not l2 > 0:
        raise ValueError(f"EASE l2 must be positive, got {l2}")
    precision = np.linalg.inv(gram + l2 * np.eye(gram.shape[0]))
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def ease_scores(seen, l2: float = 500.0, max_items: int = EASE_MAX_ITEMS) -> metrics.Scores:
    """[U, I] EASE scores: each user's seen items times the item weights (dense weights up to
    `max_items` items; beyond, `ease_neighbours`' bounded form, 200 weights per item)."""
    seen = scipy.sparse.csr_matrix(seen, dtype=np.float32)
    if seen.shape[1] > max_items:
        neighbours = ease_neighbours(seen, l2, 200, max_items)
        return metrics.Scores(seen.shape, lambda rows: neighbours.scores(seen[rows]))
    weights = ease_item_weights(seen, l2)
    return metrics.Scores(seen.shape, lambda rows: seen[rows] @ weights)


@dataclasses.dataclass(frozen=True)
class ItemNeighbours:
    """A sparse item-item weight matrix W [I, I]: row j holds source item j's `k` largest weights
    by magnitude, on target items `index[j]`. A user's score for item i is the sum of W[j, i] over
    the items j of their history, so each history item's share of it is exact (`contributions`)."""

    index: np.ndarray  # int32 [I, k] target item rows
    weight: np.ndarray  # float32 [I, k]

    @property
    def items(self) -> int:
        return int(self.index.shape[0])

    def matrix(self) -> scipy.sparse.csr_matrix:
        """W as a CSR matrix [I, I]."""
        items, k = self.index.shape
        return scipy.sparse.csr_matrix(
            (self.weight.ravel(), self.index.ravel(), np.arange(0, items * k + 1, k)),
            shape=(items, items))

    def scores(self, history: scipy.sparse.csr_matrix) -> np.ndarray:
        """float32 [N, I]: the users' scores for every item (`history` [N, I] binary rows); call it
        on batches of users, its size is N x I."""
        return np.asarray((history @ self.matrix()).todense(), np.float32)

    def pair_scores(self, history: scipy.sparse.csr_matrix, items: np.ndarray,
                    batch: int = 1024) -> np.ndarray:
        """float32 [N, K]: the score of user n (`history` row n) for item rows `items[n]` [N, K],
        in batches of users, so memory is batch x I."""
        out = np.zeros(items.shape, np.float32)
        weights = self.matrix()
        for start in range(0, items.shape[0], batch):
            rows = slice(start, start + batch)
            block = np.asarray((history[rows] @ weights).todense(), np.float32)
            out[rows] = np.take_along_axis(block, items[rows], axis=1)
        return out


def seen_matrix(user_rows: np.ndarray, item_rows: np.ndarray, users: int,
                items: int) -> scipy.sparse.csr_matrix:
    """Binary CSR [users, items] of (user row, item row) pairs, repeats counted once: its size is
    the number of interactions."""
    matrix = scipy.sparse.csr_matrix(
        (np.ones(len(user_rows), np.float32), (np.asarray(user_rows), np.asarray(item_rows))),
        shape=(users, items))
    matrix.data[:] = 1.0  # duplicates were summed
    return matrix


def ease_neighbours(seen: scipy.sparse.spmatrix, l2: float = 500.0, k: int = 200,
                    max_items: int = EASE_MAX_ITEMS) -> ItemNeighbours:
    """EASE weights kept to each item's `k` largest by magnitude. On MovieLens-100K (1,682 items)
    EASE alone scores HR@10 0.1767 dense and 0.1747 with k = 200 (README). The fit inverts one
    dense m x m matrix over the m = min(I, `max_items`) most-interacted items (ties to the lower
    row); the other items neither have nor receive weights (their rows point at themselves with
    weight 0), so memory is m x m during the fit and I x k after it."""
    seen = scipy.sparse.csr_matrix(seen, dtype=np.float32)
    items = seen.shape[1]
    if not max_items >= 1:
        raise ValueError(f"EASE max_items must be at least 1, got {max_items}")
    kept = np.arange(items)
    if items > max_items:
        count = np.asarray(seen.sum(axis=0)).ravel()
        kept = np.sort(np.argsort(-count, kind="stable")[:max_items])
        seen = seen[:, kept]
    gram = np.asarray((seen.T @ seen).todense(), np.float64)
    weights = _ease_from_gram(gram, l2)
    del gram
    m = len(kept)
    k = max(1, min(k, m))
    index = (np.argpartition(-np.abs(weights), k - 1, axis=1)[:, :k] if k < m
             else np.tile(np.arange(m), (m, 1)))
    # A stable order within each row (by target item), so the same data gives the same arrays.
    index = np.sort(index, axis=1)
    kept_weight = np.take_along_axis(weights, index, axis=1).astype(np.float32)
    del weights
    if m == items:
        return ItemNeighbours(index.astype(np.int32), kept_weight)
    out_index = np.repeat(np.arange(items, dtype=np.int32)[:, None], k, axis=1)
    out_weight = np.zeros((items, k), np.float32)
    out_index[kept] = kept[index]
    out_weight[kept] = kept_weight
    return ItemNeighbours(out_index, out_weight)


def content_popularity(categories: list[tuple[str, ...]], years: list[str], count: np.ndarray,
                       year_bins: int = 8, l2: float = 1.0) -> np.ndarray:
    """float32 [I]: each item's log(1 + training count) as predicted from its content alone, for
    the items that have no count of their own (new items: the two-tower's in-batch softmax is
    logQ-corrected, so its scores carry no popularity, and EASE and the popularity term are 0 for
    them). A ridge regression (`l2`, intercept unpenalized) on one-hot categories and release-year
    bucket (`year_bins` quantiles of the items' years; an unknown or non-numeric year is a bucket
    of its own), fit on the items with a training interaction (`count` > 0); every item gets its
    prediction. Zeros when no item has a count or the items have no content. `year_bins` and `l2`
    were chosen by how well the prediction ranks held-out items with training rows
    (docs/design.md, "The three stages"). Memory: a sparse [I, features] matrix, a dense features x features solve."""
    count = np.asarray(count, np.float64)
    if len(categories) != len(count) or len(years) != len(count):
        raise ValueError(f"content_popularity: {len(categories)} category tuples and {len(years)} "
                         f"years for {len(count)} item counts")
    names = sorted({c for cats in categories for c in cats})
    column = {name: j for j, name in enumerate(names)}
    numeric = np.array([float(y) if str(y).isdigit() else np.nan for y in years])
    known = ~np.isnan(numeric)
    if known.any():
        edges = np.unique(np.quantile(numeric[known], np.linspace(0, 1, year_bins + 1)[1:-1]))
    else:
        edges = np.zeros(0)
    bucket = np.where(known, np.searchsorted(edges, np.nan_to_num(numeric), side="right"),
                      len(edges) + 1)
    rows = [i for i, cats in enumerate(categories) for _ in cats] + list(range(len(count)))
    cols = [column[c] for cats in categories for c in cats] + list(len(names) + bucket)
    x = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                shape=(len(count), len(names) + len(edges) + 2))
    warm = count > 0
    if not warm.any() or x.shape[1] == 0:
        return np.zeros(len(count), np.float32)
    target = np.log1p(count[warm])
    xw = x[warm]
    mean_x = np.asarray(xw.mean(axis=0)).ravel()
    gram = (xw.T @ xw).toarray() - warm.sum() * np.outer(mean_x, mean_x)  # centered
    rhs = xw.T @ (target - target.mean())
    weights = np.linalg.solve(gram + l2 * np.eye(len(gram)), rhs)
    return (target.mean() + (x @ weights) - mean_x @ weights).astype(np.float32)
