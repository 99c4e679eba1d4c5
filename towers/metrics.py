"""Retrieval metrics of the evaluation protocol (docs/design.md).

Hit rate@K: the share of test interactions whose item is in that user's top K. Recall@K and
NDCG@K (binary relevance) are per user, averaged over users with test interactions. With
`exclude_seen`, items the user has in training are removed from the ranking first.

Scores are ranked a block of users at a time, so nothing users x items is held: `scores` is a
dense [U, I] array or any object with a `shape` whose `scores[rows]` gives the rows' scores
(`Scores`, e.g. query embeddings times candidate embeddings, computed per block), and `seen` is a
boolean [U, I] array or a scipy sparse matrix (its size is the number of interactions).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import scipy.sparse

BATCH = 1024  # users ranked per block: memory is BATCH x I


@dataclasses.dataclass(frozen=True)
class Scores:
    """[U, I] scores computed for a block of users when asked: `scores[rows]` is float
    [len(rows), I]. `np.asarray(scores)` builds the whole matrix (for small data and tests)."""

    shape: tuple[int, int]
    block: Callable[[np.ndarray], np.ndarray]
    # (user rows [N], item rows [N, K]) -> [N, K] scores of those pairs alone, where cheaper
    # than a block of whole rows (`rerank.ranking.pair_scores` uses it).
    pairs: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        return np.asarray(self.block(np.atleast_1d(rows)))[0 if rows.ndim == 0 else slice(None)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[np.arange(self.shape[0])], dtype)


def embedding_scores(queries: np.ndarray, candidates: np.ndarray, scale: float = 1.0) -> Scores:
    """Scores `queries [U, D] @ candidates [I, D].T * scale`, a block of users at a time."""
    return Scores((len(queries), len(candidates)), lambda rows: queries[rows] @ candidates.T * scale,
                  lambda rows, items: np.einsum("nd,nkd->nk", queries[rows], candidates[items]) * scale)


def seen_block(seen, rows: np.ndarray) -> np.ndarray:
    """bool [len(rows), I]: the rows of a dense or sparse seen mask."""
    block = seen[rows]
    return block.toarray().astype(bool) if scipy.sparse.issparse(block) else np.asarray(block, bool)


def top_items(block: np.ndarray, depth: int) -> np.ndarray:
    """int64 [N, depth]: item rows of each row's `depth` best scores, best first, ties to the lower
    item row (exactly a stable descending sort, in O(I) per row where no tie crosses the cut)."""
    block = np.asarray(block, np.float64)
    items = block.shape[1]
    depth = min(depth, items)
    if depth == 0:
        return np.zeros((len(block), 0), np.int64)
    if depth < items:
        part = np.argpartition(-block, depth - 1, axis=1)[:, :depth]
        kept = np.take_along_axis(block, part, axis=1)
        cut = kept.min(axis=1)
        # Rows where the cut value has more items than were kept: argpartition chose among ties
        # arbitrarily, so those rows are sorted in full.
        tied = (block == cut[:, None]).sum(axis=1) > (kept == cut[:, None]).sum(axis=1)
        order = np.lexsort((part, -kept), axis=1)
        top = np.take_along_axis(part, order, axis=1)
        if tied.any():
            top[tied] = np.argsort(-block[tied], axis=1, kind="stable")[:, :depth]
        return top
    return np.argsort(-block, axis=1, kind="stable")


def rankings(scores, seen=None, depth: int = 100, users: np.ndarray | None = None,
             batch: int = BATCH) -> np.ndarray:
    """Item rows of the `depth` best scores of each user in `users` (default: every user), best
    first ([len(users), depth]). `seen` marks items to leave out. Ties go to the lower item row (a
    stable order), which is what makes popularity's numbers reproducible."""
    if seen is not None and tuple(seen.shape) != tuple(scores.shape):
        raise ValueError(f"seen mask has shape {tuple(seen.shape)}, scores have {tuple(scores.shape)}")
    users = np.arange(scores.shape[0]) if users is None else np.asarray(users)
    out = np.zeros((len(users), min(depth, scores.shape[1])), np.int64)
    for start in range(0, len(users), batch):
        rows = users[start:start + batch]
        block = np.array(scores[rows], np.float64)
        if seen is not None:
            block[seen_block(seen, rows)] = -np.inf
        out[start:start + batch] = top_items(block, depth)
    return out


def positions(top: np.ndarray, user_index: np.ndarray, item_rows: np.ndarray,
              chunk: int = 1 << 20) -> np.ndarray:
    """int64 [N]: the rank of item_rows[j] in the ranking top[user_index[j]] (int32 max if absent)."""
    out = np.full(len(item_rows), np.iinfo(np.int32).max, np.int64)
    for start in range(0, len(item_rows), chunk):
        part = slice(start, start + chunk)
        where = top[user_index[part]] == item_rows[part, None]
        found = where.any(axis=1)
        out[part] = np.where(found, where.argmax(axis=1), out[part])
    return out


def evaluate(scores, user_rows: np.ndarray, item_rows: np.ndarray, seen,
             ks: tuple[int, ...] = (10, 50, 100), batch: int = BATCH) -> dict[str, float]:
    """Hit rate, Recall and NDCG at each K for test pairs (user_rows[j], item_rows[j]).

    `scores` is [U, I]: every user scored against every item (only the test users' rows are
    read). Returns keys like `hit_rate@10`.
    """
    user_rows, item_rows = np.asarray(user_rows), np.asarray(item_rows)
    if user_rows.shape != item_rows.shape or user_rows.ndim != 1:
        raise ValueError(f"user_rows {user_rows.shape} and item_rows {item_rows.shape} must be "
                         "matching 1-D arrays")
    users, index, per_user_count = np.unique(user_rows, return_inverse=True, return_counts=True)
    top = rankings(scores, seen, depth=max(ks), users=users, batch=batch)
    return from_ranks(positions(top, index, item_rows), index, per_user_count, ks)


def from_ranks(ranks: np.ndarray, user_index: np.ndarray, per_user_count: np.ndarray,
               ks: tuple[int, ...]) -> dict[str, float]:
    """The metrics from each test pair's rank (`ranks` [N], 0 = best) and its user's index into
    the test users (`user_index` [N]; `per_user_count` [users] test pairs per user)."""
    results: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        results[f"hit_rate@{k}"] = float(hit.mean())
        gain = np.where(hit, 1.0 / np.log2(ranks.clip(max=k) + 2.0), 0.0)
        hits_per_user = np.bincount(user_index, weights=hit, minlength=len(per_user_count))
        dcg = np.bincount(user_index, weights=gain, minlength=len(per_user_count))
        ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(per_user_count, k) - 1]
        results[f"recall@{k}"] = float(np.mean(hits_per_user / per_user_count))
        results[f"ndcg@{k}"] = float(np.mean(dcg / ideal))
    return results
