"""Ranking with scores [users, items] (an array or `towers.metrics.Scores`, read a block of users
at a time): the top-K candidates a user has not seen, the scores of given (user, item) pairs, and
scores whose rows are re-ordered by re-ranked scores (training validation and evaluation)."""

from __future__ import annotations

import numpy as np

from towers import metrics


def top_candidates(scores, seen, k: int, users: np.ndarray | None = None) -> np.ndarray:
    """int32 [len(users), k]: the k best item rows of each user in `users` (default: every row),
    items in `seen` [U, I] (dense or sparse) left out, best first, ties to the lower item row."""
    return metrics.rankings(scores, seen, depth=k, users=users).astype(np.int32)


def pair_scores(scores, users: np.ndarray, items: np.ndarray, batch: int = metrics.BATCH
                ) -> np.ndarray:
    """float32 [N, K]: the score of user row users[n] for item rows items[n] [N, K]; memory
    batch x I (batch x K x D for embedding scores)."""
    out = np.zeros(items.shape, np.float32)
    direct = getattr(scores, "pairs", None)
    for start in range(0, len(users), batch):
        part = slice(start, start + batch)
        out[part] = (direct(users[part], items[part]) if direct is not None else
                     np.take_along_axis(np.asarray(scores[users[part]]), items[part], axis=1))
    return out


def reordered(scores: np.ndarray, candidates: np.ndarray, final: np.ndarray) -> np.ndarray:
    """[U, I] scores whose ranking is the top-K (`candidates` [U, K] item rows) in the order of
    `final` [U, K], then every other item in the order of `scores` [U, I]."""
    out = np.asarray(scores, np.float64)
    out = out - out.max(axis=1, keepdims=True) - 1.0  # every item below 0, in retrieval order
    ranks = np.argsort(np.argsort(-final, axis=1, kind="stable"), axis=1)  # 0 = best
    np.put_along_axis(out, candidates, (final.shape[1] - ranks).astype(np.float64), axis=1)
    return out


def reranked(scores, users: np.ndarray, candidates: np.ndarray, final: np.ndarray
             ) -> metrics.Scores:
    """`scores` with the rows of `users` (sorted, distinct user rows) `reordered` by their
    candidates [len(users), K] and final scores [len(users), K]; other rows unchanged. Built a
    block of users at a time when read, so nothing users x items is held."""
    users = np.asarray(users)

    def block(rows: np.ndarray) -> np.ndarray:
        out = np.array(scores[rows], np.float64)
        at = np.searchsorted(users, rows).clip(max=max(len(users) - 1, 0))
        mine = (users[at] == rows) if len(users) else np.zeros(len(rows), bool)
        if mine.any():
            out[mine] = reordered(out[mine], candidates[at[mine]], final[at[mine]])
        return out
    return metrics.Scores(tuple(scores.shape), block)
