"""The two-tower retrieval model: a query tower, a candidate tower and a TFRS retrieval task.

score(user, item) = <q(user), c(item)> / temperature with both embeddings L2-normalized. The
query tower sees the user's ID, demographics and a mean-pooled embedding of the items in their
training history; the candidate tower sees the item's ID, genres, release year and title words.
Training is in-batch softmax (`tfrs.tasks.Retrieval`) with the logQ correction for popular items
being over-sampled as negatives, and with accidental hits (the positive appearing again as a
negative in the same batch) removed.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras as keras

from towers import features


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    embedding_dim: int = 64  # output size of both towers
    id_dim: int = 64  # user and item ID embeddings
    side_dim: int = 16  # demographic, year and genre embeddings
    hidden: int = 256  # width of the one hidden layer on top of the concatenated features
    temperature: float = 0.1  # softmax temperature on cosine scores (0.03 and 0.05 measured worse)
    history_length: int = 256  # newest training items pooled into the query
    share_item_embeddings: bool = False  # history pooling reuses the candidate ID embeddings
    history_dropout: float = 0.2  # share of history items dropped per example while training
    l2: float = 1e-4  # L2 penalty on the ID embedding tables
    logq_correction: bool = True  # subtract log sampling probability from in-batch logits
    remove_accidental_hits: bool = True
    mixed_negatives: int = 0  # extra uniform catalog negatives per batch (MNS); measured no gain
    epochs: int = 5  # validation hit rate peaks at epochs 3-5, then the model overfits
    batch_size: int = 1024
    learning_rate: float = 3e-3
    seed: int = 42


class QueryTower(keras.Model):
    """user_id string [B] -> embedding [B, D]; unknown users map to the out-of-vocabulary row."""

    def __init__(self, tables: features.FeatureTables, config: RetrievalConfig,
                 history_embedding: keras.layers.Embedding | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.lookup = keras.layers.StringLookup(vocabulary=list(tables.user_ids), mask_token=None)
        # Row 0 of every table is the out-of-vocabulary user: no history, unknown demographics.
        self.age = tf.constant(np.concatenate([[0], tables.user_age + 1]), tf.int32)
        self.gender = tf.constant(np.concatenate([[0], tables.user_gender + 1]), tf.int32)
        self.occupation = tf.constant(np.concatenate([[0], tables.user_occupation + 1]), tf.int32)
        self.history = tf.constant(np.concatenate(
            [np.zeros((1, tables.history.shape[1]), np.int32), tables.history[:, :config.history_length]]))
        regularizer = keras.regularizers.l2(config.l2)
        self.user_embedding = keras.layers.Embedding(
            len(tables.user_ids) + 1, config.id_dim, embeddings_regularizer=regularizer)
        self.age_embedding = keras.layers.Embedding(len(features.AGE_BOUNDARIES) + 2, config.side_dim)
        self.gender_embedding = keras.layers.Embedding(3, config.side_dim)
        self.occupation_embedding = keras.layers.Embedding(len(tables.occupations) + 1, config.side_dim)
        self.history_embedding = history_embedding or keras.layers.Embedding(
            len(tables.item_ids) + 1, config.id_dim, embeddings_regularizer=regularizer)
        self.mlp = keras.Sequential([keras.layers.Dense(config.hidden, activation="gelu"),
                                     keras.layers.Dense(config.embedding_dim)])

    def call(self, user_id: tf.Tensor, exclude_item: tf.Tensor | None = None,
             training: bool = False) -> tf.Tensor:
        """`exclude_item` (item row + 1, [B]) hides the training target from its own history."""
        row = self.lookup(user_id)
        history = tf.gather(self.history, row)  # [B, H]
        keep = history > 0
        if exclude_item is not None:
            keep &= history != tf.cast(exclude_item, history.dtype)[:, None]
        if training and self.config.history_dropout > 0:
            keep &= tf.random.uniform(tf.shape(history)) >= self.config.history_dropout
        weights = tf.cast(keep, tf.float32)
        pooled = tf.einsum("bh,bhd->bd", weights, self.history_embedding(history))
        pooled /= tf.maximum(tf.reduce_sum(weights, axis=1, keepdims=True), 1.0)  # [B, id_dim]
        x = tf.concat([
            self.user_embedding(row),
            self.age_embedding(tf.gather(self.age, row)),
            self.gender_embedding(tf.gather(self.gender, row)),
            self.occupation_embedding(tf.gather(self.occupation, row)),
            pooled,
        ], axis=1)
        return tf.math.l2_normalize(self.mlp(x), axis=1)


class CandidateTower(keras.Model):
    """item_id string [B] -> embedding [B, D]."""

    def __init__(self, tables: features.FeatureTables, config: RetrievalConfig, **kwargs):
        super().__init__(**kwargs)
        self.lookup = keras.layers.StringLookup(vocabulary=list(tables.item_ids), mask_token=None)
        zero_row = lambda table: np.concatenate([np.zeros((1,) + table.shape[1:], table.dtype), table])
        self.genres = tf.constant(zero_row(tables.item_genres))
        self.year = tf.constant(zero_row(tables.item_year))
        self.title = tf.constant(zero_row(tables.item_title))
        regularizer = keras.regularizers.l2(config.l2)
        self.item_embedding = keras.layers.Embedding(
            len(tables.item_ids) + 1, config.id_dim, embeddings_regularizer=regularizer)
        self.genre_projection = keras.layers.Dense(config.side_dim, use_bias=False)
        self.year_embedding = keras.layers.Embedding(tables.num_year_buckets, config.side_dim)
        self.title_embedding = keras.layers.Embedding(
            len(tables.title_vocabulary) + 2, config.side_dim, mask_zero=True)
        self.mlp = keras.Sequential([keras.layers.Dense(config.hidden, activation="gelu"),
                                     keras.layers.Dense(config.embedding_dim)])

    def call(self, item_id: tf.Tensor, training: bool = False) -> tf.Tensor:
        return self.embed_rows(self.lookup(item_id))

    def embed_rows(self, row: tf.Tensor) -> tf.Tensor:
        """Embeds items by row + 1 (the lookup's output), skipping the string lookup."""
        title = tf.gather(self.title, row)  # [B, T]
        title_mask = tf.cast(title > 0, tf.float32)
        title_vector = tf.einsum("bt,btd->bd", title_mask, self.title_embedding(title))
        title_vector /= tf.maximum(tf.reduce_sum(title_mask, axis=1, keepdims=True), 1.0)
        x = tf.concat([
            self.item_embedding(row),
            self.genre_projection(tf.gather(self.genres, row)),
            self.year_embedding(tf.gather(self.year, row)),
            title_vector,
        ], axis=1)
        return tf.math.l2_normalize(self.mlp(x), axis=1)


class RetrievalModel(tfrs.Model):
    """Two towers and the in-batch softmax task; `compute_loss` is all it adds."""

    def __init__(self, tables: features.FeatureTables, config: RetrievalConfig):
        super().__init__()
        self.config = config
        self.candidate_tower = CandidateTower(tables, config)
        shared = self.candidate_tower.item_embedding if config.share_item_embeddings else None
        self.query_tower = QueryTower(tables, config, history_embedding=shared)
        self.item_lookup = self.candidate_tower.lookup
        self.num_items = len(tables.item_ids)
        self.item_probability = tf.constant(
            np.concatenate([[1.0], tables.item_probability()]).astype(np.float32))
        self.task = tfrs.tasks.Retrieval(temperature=config.temperature,
                                         remove_accidental_hits=config.remove_accidental_hits)

    def compute_loss(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        item_row = self.item_lookup(inputs["item_id"])  # item row + 1, as in the history table
        queries = self.query_tower(inputs["user_id"], exclude_item=item_row, training=training)
        candidates = self.candidate_tower(inputs["item_id"], training=training)
        # logQ correction with each column's chance of being any one in-batch draw. (TFRS clips the
        # probability to at most 1, so per-draw probabilities, not expected counts.)
        probability = tf.gather(self.item_probability, item_row)
        if self.config.mixed_negatives:
            # Mixed negative sampling (Yang et al., 2020): uniform catalog items as extra negatives
            # reach the tail items that in-batch sampling rarely shows.
            count = self.config.mixed_negatives
            extra = tf.random.uniform([count], 1, self.num_items + 1, dtype=item_row.dtype)
            candidates = tf.concat([candidates, self.candidate_tower.embed_rows(extra)], axis=0)
            item_row = tf.concat([item_row, extra], axis=0)
            batch = tf.cast(tf.shape(probability)[0], tf.float32)
            per_draw = count / self.num_items / batch  # same scale as the in-batch columns
            probability = tf.concat([probability, tf.fill([count], per_draw)], axis=0)
        return self.task(queries, candidates, candidate_ids=item_row,
                         candidate_sampling_probability=probability if self.config.logq_correction else None,
                         compute_metrics=False)
