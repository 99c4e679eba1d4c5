"""Ranking with a score matrix [users, items]: the top-K candidates a user has not seen, and a
matrix whose rows are re-ordered by re-ranked scores (training validation and evaluation)."""

from __future__ import annotations

import numpy as np



def top_candidates(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """int32 [U, k]: each user's k best item rows, items in `seen` [U, I] left out, best first."""
    masked = np.where(seen, -np.inf, scores)
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(masked, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int32)


def reordered(scores: np.ndarray, candidates: np.ndarray, final: np.ndarray) -> np.ndarray:
    """[U, I] scores whose ranking is the top-K (`candidates` [U, K] item rows) in the order of
    `final` [U, K], then every other item in the order of `scores` [U, I]."""
    out = np.asarray(scores, np.float64)
    out = out - out.max(axis=1, keepdims=True) - 1.0  # every item below 0, in retrieval order
    ranks = np.argsort(np.argsort(-final, axis=1, kind="stable"), axis=1)  # 0 = best
    np.put_along_axis(out, candidates, (final.shape[1] - ranks).astype(np.float64), axis=1)
    return out


def rows_replaced(matrix: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.array(matrix, np.float64)
    out[rows] = values
    return out
