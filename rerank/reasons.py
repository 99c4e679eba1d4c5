"""The reasons a served item's copy cites: the liked history items without which it would rank lower.

For each served item and each liked item of the user's history, occlusion predicts the re-ranked
list without that history item: the EASE sum loses the item's weight towards every candidate
(exact: the term is a sum over history items), the query tower pools the history without it
(exact: `QueryTower.leave_one_out`), and the scalar terms are recomputed from both through the
head's own `scalar_terms`. The BERT term is held as it is (its context names at most a few
history titles; re-reading every candidate once per history item would multiply the cascade's
cost). A history item is a reason when, without it, the item's score falls and it drops below a
candidate that ranked under it; the (up to) two reasons with the widest such margin are cited,
widest first. A served item that no single history item holds in place (one chosen by many of
them at once, often the first) gets no reason: its copy cites no liked title rather than one whose
absence would change nothing.

Everything is per request and ragged (history x candidates), so it lives in the `cascade` graph;
`rerank.faithfulness` measures, by re-scoring through the whole re-ranker, how often the cited
reason is in fact necessary.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from towers import saving

# A fall or margin smaller than this (in logits) is float noise, not a cause: removing a history
# item moves every candidate's retrieval logit a little through the query.
MIN_CHANGE = 1e-4


class Reasons(tf.Module):
    """(user_id [B], candidates [B, K], their retrieval logits and final scores [B, K], served
    positions [B, N]) -> string [B, N, count] history item IDs, "" where fewer qualify."""

    def __init__(self, reranker, query_tower, candidates, item_ids: np.ndarray,
                 temperature: float):
        """`reranker`: the `cross_encoder.Reranker` whose final score the candidates carry;
        `query_tower`: the run's `QueryTower`; `candidates`: candidate embeddings [I, D] (array or
        variable) in `item_ids` order, the order of the run's feature tables, which the re-ranker's
        tables and the query tower's histories (rows + 1) share."""
        super().__init__()
        texts = reranker.texts
        if list(texts.arrays["item_ids"]) != [str(i) for i in item_ids]:
            raise ValueError("the re-ranker's item table is not in the run's item order: "
                             "retrain the re-ranker on this run")
        self.reranker, self.tower = reranker, query_tower
        self.candidates = (candidates if isinstance(candidates, tf.Variable)
                           else saving.frozen(np.asarray(candidates, np.float32), "candidates"))
        self.inverse_temperature = tf.constant(1.0 / temperature, tf.float32)

    def __call__(self, user_id: tf.Tensor, item_ids: tf.Tensor, retrieval_score: tf.Tensor,
                 scores: tf.Tensor, served: tf.Tensor, count: int = 2) -> tf.Tensor:
        """`retrieval_score`: the logits the re-ranker read (dot products over the temperature);
        `scores`: its final scores; `served`: int [B, N], the served items' columns in `item_ids`,
        best first (the top N of `scores`)."""
        after, flat = self.occluded(user_id, item_ids, retrieval_score, scores)
        owner = after.value_rowids()
        after = after.flat_values  # [H, K]: every candidate's score without history item h
        before = tf.gather(scores, owner)
        target = tf.cast(tf.gather(served, owner), tf.int32)  # [H, N]
        kept = tf.gather(before, target, batch_dims=1)
        dropped = tf.gather(after, target, batch_dims=1)  # [H, N]: each served item's, without h
        # The others' scores without h, best first: the item ranks below its position p when the
        # (p + 1)-th best of them is above it.
        width = tf.shape(served)[1]
        others = tf.where(tf.range(tf.shape(after)[1])[None, None] == target[:, :, None],
                          -np.inf, after[:, None, :])  # [H, N, K]
        best = tf.math.top_k(others, k=width).values  # [H, N, N]
        margin = tf.linalg.diag_part(best) - dropped  # position p: the (p + 1)-th best
        margin = tf.where((dropped < kept - MIN_CHANGE) & (margin > MIN_CHANGE), margin,
                          -np.inf)
        # Per user and served item, the widest margins over the user's history items.
        users = tf.shape(user_id, out_type=tf.int64)[0]

        def per_user(values, fill):  # [H, N] -> [B, N, h + count], padded with `fill`
            dense = tf.RaggedTensor.from_value_rowids(values, owner, nrows=users).to_tensor(fill)
            dense = tf.pad(dense, [[0, 0], [0, count], [0, 0]], constant_values=fill)
            return tf.transpose(dense, [0, 2, 1])
        flat_rows = tf.broadcast_to(tf.range(tf.shape(margin, out_type=tf.int64)[0])[:, None],
                                    tf.shape(margin, out_type=tf.int64))
        top, order = tf.math.top_k(per_user(margin, -np.inf), k=count)  # ties: earlier item first
        none = tf.shape(flat, out_type=tf.int64)[0]  # the row of "" after the history items
        chosen = tf.gather(per_user(flat_rows, none), order, batch_dims=2)
        ids = tf.gather(tf.concat([flat, [""]], axis=0), chosen)
        return tf.where(top > -np.inf, ids, "")

    def occluded(self, user_id: tf.Tensor, item_ids: tf.Tensor, retrieval_score: tf.Tensor,
                 scores: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor]:
        """(ragged [B, (h), K]: the candidates' final scores with each of the user's liked history
        items taken out in turn, BERT's term held; the history item IDs [sum of h], in the same
        order)."""
        texts, encoder = self.reranker.texts, self.reranker.encoder
        history = texts.liked_history(user_id)  # [B, (h)] item rows
        owner, rows = history.value_rowids(), history.flat_values
        item_rows = texts.item_row.lookup(item_ids)  # [B, K], -1 for an item the tables lack
        shape, users, items = self.reranker._pairs(user_id, item_ids)
        # (The content-popularity term does not depend on the history: it cancels in `change`.)
        popularity, ease, _ = (tf.reshape(value, shape)
                               for value in self.reranker.pair_features(users, items))
        # EASE: history item h's weight towards each candidate (none without the EASE term).
        weight = texts.weights(rows, tf.gather(item_rows, owner))  # [H, K]
        if not encoder.ease_feature:
            weight = tf.zeros_like(weight)
        # Retrieval: the query without h against each candidate's embedding.
        query = self.tower(user_id)  # [B, D]
        without = self.tower.leave_one_out(user_id, history + 1)  # [H, D]
        embedded = tf.gather(saving.read(self.candidates), tf.maximum(item_rows, 0))  # [B, K, D]
        shift = tf.einsum("hd,hkd->hk", tf.gather(query, owner) - without,
                          tf.gather(embedded, owner)) * self.inverse_temperature
        logits = tf.gather(retrieval_score, owner)
        pop, base = tf.gather(popularity, owner), tf.gather(ease, owner)
        change = (encoder.scalar_terms(logits, pop, base)
                  - encoder.scalar_terms(logits - shift, pop, base - weight))
        after = tf.gather(scores, owner) - change
        return (tf.RaggedTensor.from_value_rowids(after, owner, nrows=tf.shape(user_id,
                                                                               out_type=tf.int64)[0]),
                tf.gather(saving.read(texts.item_id), rows))
