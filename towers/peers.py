"""The simple peers every retrieval number is compared with, scored by the same metric code.

- popularity: every user gets the items with the most training interactions.
- implicit ALS (Hu, Koren & Volinsky 2008) from the `implicit` package, 64 factors.
- EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): an item-item linear model with a
  closed form, B = I - P diag(1 / diag(P)) for P = (X'X + l2 I)^-1, scores X B. On MovieLens-100K
  it is the strongest peer (README), and the re-ranker uses its score as a feature.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import threadpoolctl


def popularity_scores(seen: np.ndarray) -> np.ndarray:
    """[U, I] scores: each item's training interaction count, the same for every user."""
    counts = seen.sum(axis=0).astype(np.float32)
    return np.broadcast_to(counts, seen.shape)


def als_scores(seen: np.ndarray, factors: int = 64, regularization: float = 0.05,
               iterations: int = 15, seed: int = 42) -> np.ndarray:
    """[U, I] scores <user factor, item factor> of implicit ALS fit on the binary seen matrix."""
    from implicit.cpu.als import AlternatingLeastSquares  # an optional, heavy import

    with threadpoolctl.threadpool_limits(1, "blas"):  # implicit's own threads do the work
        model = AlternatingLeastSquares(factors=factors, regularization=regularization,
                                        iterations=iterations, random_state=seed,
                                        calculate_training_loss=False)
        model.fit(scipy.sparse.csr_matrix(seen.astype(np.float32)), show_progress=False)
    return np.asarray(model.user_factors) @ np.asarray(model.item_factors).T


def ease_item_weights(seen: np.ndarray, l2: float = 500.0) -> np.ndarray:
    """float32 [I, I] EASE weights B for the binary `seen` [U, I] matrix: the ridge regression of
    each item's column on every other item's, with a zero diagonal (an item never predicts itself).
    One I x I inverse, so for catalogs up to a few tens of thousands of items."""
    if not l2 > 0:
        raise ValueError(f"EASE l2 must be positive, got {l2}")
    x = np.asarray(seen, np.float64)
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    weights = -precision / np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


def ease_scores(seen: np.ndarray, l2: float = 500.0) -> np.ndarray:
    """[U, I] EASE scores: each user's seen items times the item weights."""
    return np.asarray(seen, np.float32) @ ease_item_weights(seen, l2)
