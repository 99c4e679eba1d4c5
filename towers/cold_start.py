"""The cold-start query: what an unknown user is recommended.

An unknown user has no ID embedding and no history, so the towers cannot say anything personal.
The query used instead is the vector q that best reproduces popularity as a score, the
least-squares solution of  C q ~ z  with C the candidate embeddings and z the standardized
log training counts. Its ranking is popularity's, smoothed through the embedding space, and it
needs nothing beyond the tower's own output space at serving time.
"""

from __future__ import annotations

import numpy as np


def popularity_query(candidate_embeddings: np.ndarray, item_count: np.ndarray) -> np.ndarray:
    """[D] unit-norm query whose scores against `candidate_embeddings` [I, D] follow log popularity."""
    if candidate_embeddings.ndim != 2 or candidate_embeddings.shape[0] != item_count.shape[0]:
        raise ValueError(f"candidate_embeddings {candidate_embeddings.shape} must be [I, D] with "
                         f"I = len(item_count) = {item_count.shape[0]}")
    target = np.log1p(item_count.astype(np.float64))
    target = (target - target.mean()) / max(target.std(), 1e-12)
    query, *_ = np.linalg.lstsq(candidate_embeddings.astype(np.float64), target, rcond=None)
    norm = np.linalg.norm(query)
    return (query / norm if norm > 0 else query).astype(np.float32)
