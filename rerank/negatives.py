"""Hard-negative mining: the softmax groups the cross-encoder is trained on.

Training data, and why it is honest. Positives must be items the retrieval model has *not* seen
for that user, as at test time: the run's own model was trained on every training row, so its
scores on any of them are memorised and over-confident, and negatives ranked against a memorised
positive would teach the re-ranker to over-trust retrieval. So a *shadow* retrieval model with the
run's config and data is trained on the run's training split minus its last `holdout` rows
(`towers.train.train(..., holdout=...)`; under the random protocol the training rows are a seeded
shuffle, so these rows are a random sample of training interactions, distributed like the test
split; under the temporal one they are the newest, `towers.protocols`). Each held-out row whose
item is in the shadow's top-K (training items of the shadow excluded) becomes one softmax group:
the positive and `group_size - 1` hard negatives drawn afresh each epoch from the same top-K, never
another of that user's held-out items. User contexts, popularity and retrieval scores for these
groups come from the shadow's rows only, so no positive appears in its own user's context. The
last `validation_share` of the held-out rows are validation (re-ranked top-K hit rate against the
shadow alone); the test split is never read here. Negatives are unlabelled items, so one may be an
unobserved test interaction of that user; excluding those would need the test data.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank import ranking
from towers import data



@dataclasses.dataclass(frozen=True)
class Groups:
    """One softmax group per held-out positive found in its user's retrieval top-K."""

    user_row: np.ndarray  # int32 [P], row in the tables' user_ids
    candidates: np.ndarray  # int32 [P, K], item rows of the top-K, best first
    retrieval: np.ndarray  # float32 [P, K], retrieval logits of the candidates
    positive: np.ndarray  # int32 [P], position of the positive in `candidates`
    negative: np.ndarray  # bool [P, K], candidates that may be drawn as negatives

    def __len__(self) -> int:
        return len(self.user_row)


def split_rows(train: data.Interactions, holdout: int
               ) -> tuple[data.Interactions, data.Interactions]:
    """(rows the shadow retrieval model trains on, held-out rows), exactly as
    `towers.train.train(holdout=...)` splits them: the last `holdout` rows are held out."""
    if not 0 < holdout < len(train):
        raise ValueError(f"holdout must be between 1 and {len(train) - 1} (the split has "
                         f"{len(train)} training rows), got {holdout}; set a smaller "
                         "RerankerConfig.holdout (--holdout)")
    cut = len(train) - holdout
    return train.take(np.arange(cut)), train.take(np.arange(cut, len(train)))


def build_groups(scores, seen, user_rows: np.ndarray, item_rows: np.ndarray,
                 k: int | None = None, candidates: np.ndarray | None = None) -> Groups:
    """Groups for held-out pairs (user_rows[j], item_rows[j]) from retrieval `scores` [U, I] (an
    array or `towers.metrics.Scores`) of a model that did not see them; `seen` [U, I] (dense or
    sparse) is what that model was trained on. The candidates are `candidates` [len(users), K]
    (item rows of each distinct user of `user_rows`, sorted: e.g. `towers.sources.batched` with
    `users=np.unique(user_rows)`), or the top-k of `scores`. Pairs whose item is not a candidate
    give no group (the re-ranker never sees them at serving time either), and a user's other
    held-out items are never negatives. Memory grows with the pairs, not with users x items."""
    user_rows, item_rows = np.asarray(user_rows), np.asarray(item_rows)
    if np.any(seen[user_rows, item_rows]):
        raise ValueError("a held-out pair is in `seen`: positives must be interactions the "
                         "retrieval model was not trained on")
    if (k is None) == (candidates is None):
        raise ValueError("give either k or candidates")
    distinct, index = np.unique(user_rows, return_inverse=True)
    top = (ranking.top_candidates(scores, seen, k, users=distinct) if candidates is None
           else candidates)  # [len(distinct), K]
    if len(top) != len(distinct):
        raise ValueError(f"candidates has {len(top)} rows, one per distinct held-out user "
                         f"({len(distinct)}) expected")
    held_out = np.unique(user_rows.astype(np.int64) * scores.shape[1] + item_rows)  # pair keys
    candidates = top[index]  # [N, k]
    where = candidates == item_rows[:, None]
    found = where.any(axis=1)
    candidates = candidates[found]
    users = user_rows[found]
    keys = users[:, None].astype(np.int64) * scores.shape[1] + candidates
    return Groups(
        user_row=users.astype(np.int32),
        candidates=candidates,
        retrieval=ranking.pair_scores(scores, users, candidates),
        positive=where[found].argmax(axis=1).astype(np.int32),
        negative=~np.isin(keys, held_out),
    )


def group_dataset(groups: Groups, user_ids: np.ndarray, item_ids: np.ndarray, group_size: int,
                  batch_groups: int, seed: int, shuffle: bool = True,
                  text_negatives: int = 0) -> tf.data.Dataset:
    """Batches of ({user_id [B], item_ids [B, G], retrieval_score [B, G]}, labels [B, G]): the
    positive first, then `group_size - 1` negatives drawn from the top-K afresh each epoch. With
    `text_negatives` > 0, also `text_item_ids` [B, 1 + text_negatives]: the positive, then items
    drawn uniformly from the whole catalog (for the BERT-alone loss, `Reranker.train_step`)."""
    if groups.candidates.shape[1] < group_size:
        raise ValueError(f"group_size {group_size} is more than the {groups.candidates.shape[1]} "
                         "retrieval candidates the negatives are drawn from")
    user_table, item_table = tf.constant(user_ids.astype(str)), tf.constant(item_ids.astype(str))

    def draw(user_row, candidates, retrieval, positive, negative):
        gumbel = -tf.math.log(-tf.math.log(tf.random.uniform(tf.shape(retrieval), 1e-9, 1.0)))
        _, picked = tf.math.top_k(tf.where(negative, gumbel, -np.inf), group_size - 1)
        index = tf.concat([positive[None], picked], axis=0)  # [G]
        inputs = {"user_id": tf.gather(user_table, user_row),
                  "item_ids": tf.gather(item_table, tf.gather(candidates, index)),
                  "retrieval_score": tf.gather(retrieval, index)}
        if text_negatives:
            catalog = tf.random.uniform([text_negatives], 0, len(item_ids), tf.int32)
            inputs["text_item_ids"] = tf.gather(item_table, tf.concat(
                [candidates[positive][None], catalog], axis=0))
        return inputs, tf.one_hot(0, group_size)

    dataset = tf.data.Dataset.from_tensor_slices(
        (groups.user_row, groups.candidates, groups.retrieval, groups.positive, groups.negative))
    if shuffle:
        dataset = dataset.shuffle(len(groups), seed=seed, reshuffle_each_iteration=True)
    return dataset.map(draw).batch(batch_groups).prefetch(tf.data.AUTOTUNE)
