"""The re-ranker as a SavedModel: IDs in, final scores out, with TF and tensorflow-text ops only.

    reranker/<version>/  serving_default(user_id string[B], item_ids string[B, M]) -> scores float[B, M]

The signature has no retrieval-score input (docs/design.md), so the module computes the retrieval
logits the re-ranker was trained with itself: the run's query tower (an unknown user gets the
popularity cold-start query, `towers.cold_start.popularity_query`, as the exported query tower
does) against a table of the run's candidate embeddings keyed by item ID, divided by the
temperature. The user-context and item-text tables, the vocabulary and the in-graph tokenizer
live in the graph (`cross_encoder.Reranker`). Every user and item in the dataset's files has its
text, those without a training interaction too; a user ID not in the files is read with an empty
context, an item ID not in the files gets an empty text, zero popularity and a zero retrieval
logit.

`RerankerModule.score(user_id, item_ids, retrieval_logits)` is the same computation with the
logits given, for a caller that already has them (the one-call `cascade` model, from its index),
to be called inside that caller's own `tf.function`.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank import cross_encoder as ce
from towers import cold_start
from towers import runs, saving
from towers import model as towers_model

MODEL_NAME = "reranker"
USER_ID = tf.TensorSpec([None], tf.string, name="user_id")
ITEM_IDS = tf.TensorSpec([None, None], tf.string, name="item_ids")


class RerankerModule(tf.Module):
    """`serve(user_id [B], item_ids [B, M]) -> {"scores": float32 [B, M]}`, the final scores of
    the re-ranker (cross-encoder logit + learned retrieval and popularity terms)."""

    def __init__(self, reranker: ce.Reranker, query_tower, cold_start_query: np.ndarray,
                 item_ids: np.ndarray, candidate_embeddings: np.ndarray, temperature: float):
        super().__init__()
        item_ids = np.asarray(item_ids).astype(str)
        candidate_embeddings = np.asarray(candidate_embeddings, np.float32)
        if candidate_embeddings.shape[0] != len(item_ids) or candidate_embeddings.ndim != 2:
            raise ValueError(f"candidate_embeddings {candidate_embeddings.shape} must be [I, D] "
                             f"with I = {len(item_ids)} item IDs")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.reranker = reranker
        self.query_tower = query_tower
        self.cold_start = tf.constant(np.asarray(cold_start_query, np.float32)[None, :])  # [1, D]
        # Row I is all zeros: the embedding of an unknown item ID.
        self.candidates = saving.frozen(np.concatenate(  # in variables/, not in the graph
            [candidate_embeddings, np.zeros((1, candidate_embeddings.shape[1]), np.float32)]),
            "candidates")
        self.item_row = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(item_ids), tf.range(len(item_ids), dtype=tf.int32)), len(item_ids))
        self.inverse_temperature = tf.constant(1.0 / temperature, tf.float32)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, loaded=None) -> RerankerModule:
        """The module of a run with a trained re-ranker (`cascade train reranker`); `loaded`: the
        run's (retrieval model, feature tables, candidate embeddings) when already at hand (the
        module then shares that query tower)."""
        run = pathlib.Path(run_dir)
        reranker = ce.load_reranker(run)
        if loaded is None:
            retrieval, tables = runs.load_run(run)
            candidates = towers_model.candidate_embeddings(retrieval, tables)
        else:
            retrieval, tables, candidates = loaded
        query = cold_start.popularity_query(candidates, tables.item_count)
        return cls(reranker, retrieval.query_tower, query, tables.item_ids, candidates,
                   retrieval.config.temperature)

    def retrieval_logits(self, user_id: tf.Tensor, item_ids: tf.Tensor) -> tf.Tensor:
        """string [B], string [B, M] -> float32 [B, M]: query . candidate / temperature."""
        known = self.query_tower.lookup(user_id) > 0  # row 0 is out of vocabulary
        query = tf.where(known[:, None], self.query_tower(user_id), self.cold_start)  # [B, D]
        candidates = tf.gather(saving.read(self.candidates), self.item_row.lookup(item_ids))  # [B, M, D]
        return tf.einsum("bd,bmd->bm", query, candidates) * self.inverse_temperature

    def score(self, user_id: tf.Tensor, item_ids: tf.Tensor,
              retrieval_logits: tf.Tensor) -> tf.Tensor:
        """string [B], string [B, M], float32 [B, M] -> final scores float32 [B, M]. Plain Python:
        call it inside a `tf.function` (a signature's) or eagerly."""
        return self.reranker(dict(user_id=user_id, item_ids=item_ids,
                                  retrieval_score=tf.cast(retrieval_logits, tf.float32)),
                             training=False)

    @tf.function(input_signature=[USER_ID, ITEM_IDS])
    def serve(self, user_id, item_ids):
        return {"scores": self.score(user_id, item_ids, self.retrieval_logits(user_id, item_ids))}


def save(module: RerankerModule, path: str | os.PathLike) -> pathlib.Path:
    """Writes the module as a SavedModel with `serve` as `serving_default`."""
    path = pathlib.Path(path)
    saving.save(module, path, {"serving_default": module.serve})
    return path

