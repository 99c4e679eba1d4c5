"""Top-K indexes over candidate embeddings: exact brute force and approximate ScaNN.

Both are TFRS `TopK` layers, so both give `query_with_exclusions(queries, exclusions, k)`: it asks
the index for k + E candidates and drops the E excluded ones, which is exact as long as the index
returns its true top k + E. Brute force scores every candidate (one matmul and a top-k); ScaNN
(Guo et al., 2020) partitions the candidates into leaves, scores only the nearest leaves with
anisotropically quantized vectors, and re-scores the best ones exactly.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

KINDS = ("bruteforce", "scann")


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    num_leaves: int = 1000  # partitions; about sqrt(N) for N = 1M
    num_leaves_to_search: int = 50  # partitions scored per query: the recall / speed dial
    num_reordering_candidates: int = 200  # best approximate hits re-scored exactly
    dimensions_per_block: int = 2  # quantization block size (TFRS default)
    training_iterations: int = 12  # k-means iterations of the partitioner (TFRS default)

    def for_catalog(self, num_candidates: int) -> ScannConfig:
        """This config with leaves capped for small catalogs (ScaNN needs more points than leaves)."""
        leaves = max(1, min(self.num_leaves, num_candidates // 10))
        return dataclasses.replace(
            self, num_leaves=leaves, num_leaves_to_search=min(self.num_leaves_to_search, leaves))


def build_index(kind: str, candidate_ids: np.ndarray, candidate_embeddings: np.ndarray, k: int,
                scann: ScannConfig | None = None) -> tfrs.layers.factorized_top_k.TopK:
    """An index returning `candidate_ids` for the top `k` inner products, ready to query."""
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    embeddings = np.asarray(candidate_embeddings, np.float32)
    if embeddings.ndim != 2 or len(candidate_ids) != embeddings.shape[0]:
        raise ValueError(f"candidate_embeddings must be [N, D] with N = len(candidate_ids) = "
                         f"{len(candidate_ids)}, got shape {embeddings.shape}")
    if not 0 < k <= embeddings.shape[0]:
        raise ValueError(f"k must be between 1 and the number of candidates "
                         f"({embeddings.shape[0]}), got {k}")
    if kind == "bruteforce":
        index = tfrs.layers.factorized_top_k.BruteForce(k=k)
    else:
        config = (scann or ScannConfig()).for_catalog(embeddings.shape[0])
        # ScaNN silently returns fewer than k hits (padded with item 0 and NaN scores) when the
        # searched leaves hold fewer than k items, and then `query_with_exclusions` can hand back
        # excluded items. Search enough leaves to hold 2k items on average.
        per_leaf = embeddings.shape[0] / config.num_leaves
        needed = int(np.ceil(2 * k / per_leaf))
        if needed > config.num_leaves_to_search:
            config = dataclasses.replace(config, num_leaves_to_search=min(config.num_leaves, needed))
        index = tfrs.layers.factorized_top_k.ScaNN(
            k=k, num_leaves=config.num_leaves, num_leaves_to_search=config.num_leaves_to_search,
            num_reordering_candidates=max(config.num_reordering_candidates, k),
            dimensions_per_block=config.dimensions_per_block,
            training_iterations=config.training_iterations)
    index.index(tf.constant(embeddings), tf.constant(candidate_ids))
    return index


def save_options(kind: str) -> tf.saved_model.SaveOptions:
    """ScaNN's ops live in the `Scann` namespace, which SavedModel refuses unless allowed.

    Loading such a SavedModel needs `import scann` first.
    """
    return tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if kind == "scann" else None)
