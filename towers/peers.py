"""The simple peers every retrieval number is compared with, scored by the same metric code.

- popularity: every user gets the items with the most training interactions.
- implicit ALS (Hu, Koren & Volinsky 2008) from the `implicit` package, 64 factors.
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
