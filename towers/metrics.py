"""Retrieval metrics of the evaluation protocol (docs/design.md).

Hit rate@K: the share of test interactions whose item is in that user's top K. Recall@K and
NDCG@K (binary relevance) are per user, averaged over users with test interactions. With
`exclude_seen`, items the user has in training are removed from the ranking first.
"""

from __future__ import annotations

import numpy as np


def rankings(scores: np.ndarray, seen: np.ndarray | None = None, depth: int = 100) -> np.ndarray:
    """Item rows of each user's `depth` best scores, best first ([U, depth]).

    `seen` is a boolean [U, I] mask of items to leave out. Ties go to the lower item row (a stable
    sort), which is what makes popularity's numbers reproducible.
    """
    scores = np.asarray(scores, np.float64)
    if seen is not None:
        if seen.shape != scores.shape:
            raise ValueError(f"seen mask has shape {seen.shape}, scores have {scores.shape}")
        scores = np.where(seen, -np.inf, scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :depth]


def evaluate(scores: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray,
             seen: np.ndarray | None, ks: tuple[int, ...] = (10, 50, 100)) -> dict[str, float]:
    """Hit rate, Recall and NDCG at each K for test pairs (user_rows[j], item_rows[j]).

    `scores` is [U, I]: every user scored against every item. Returns keys like `hit_rate@10`.
    """
    user_rows, item_rows = np.asarray(user_rows), np.asarray(item_rows)
    if user_rows.shape != item_rows.shape or user_rows.ndim != 1:
        raise ValueError(f"user_rows {user_rows.shape} and item_rows {item_rows.shape} must be "
                         "matching 1-D arrays")
    top = rankings(scores, seen, depth=max(ks))
    position = np.full(scores.shape, np.iinfo(np.int32).max, np.int64)  # rank of each item per user
    np.put_along_axis(position, top, np.arange(top.shape[1])[None, :], axis=1)
    ranks = position[user_rows, item_rows]  # [N] rank of each test interaction's item

    results: dict[str, float] = {}
    users, per_user_count = np.unique(user_rows, return_counts=True)
    for k in ks:
        hit = ranks < k
        results[f"hit_rate@{k}"] = float(hit.mean())
        gain = np.where(hit, 1.0 / np.log2(ranks.clip(max=k) + 2.0), 0.0)
        hits_per_user = np.bincount(user_rows, weights=hit, minlength=scores.shape[0])[users]
        dcg = np.bincount(user_rows, weights=gain, minlength=scores.shape[0])[users]
        ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(per_user_count, k) - 1]
        results[f"recall@{k}"] = float(np.mean(hits_per_user / per_user_count))
        results[f"ndcg@{k}"] = float(np.mean(dcg / ideal))
    return results

