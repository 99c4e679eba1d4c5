"""The two-tower retrieval model: a query tower, a candidate tower and a TFRS retrieval task.

score(user, item) = <q(user), c(item)> / temperature with both embeddings L2-normalized. The
query tower sees the user's ID, the user features of the dataset's schema and a mean-pooled
embedding of the items in their training history; the candidate tower sees the item's ID and the
item features of the schema (`towers.features`). Users and items without a training interaction
share one cold ID row, trained by treating a share of examples as new (`cold_*_dropout`), so their
embeddings come from their features.
Training is in-batch softmax (`tfrs.tasks.Retrieval`) with the logQ correction for popular items
being over-sampled as negatives, and with accidental hits (the positive appearing again as a
negative in the same batch) removed.

Every step touches only the ID embedding rows of its batch: the L2 penalty is on the rows the batch
looked up, and `LazyAdam` updates only those rows. (A penalty on the whole table and Keras's Adam
make every step dense: at 1M users x 100k items a step took 1.4 s, nearly all of it updating rows
the batch never saw.)
"""

from __future__ import annotations

import os
import weakref

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras as keras

from towers import features
from towers.config import MAX_COLD_DROPOUT, RetrievalConfig  # noqa: F401 (re-exported)


class LazyAdam(keras.optimizers.Adam):
    """Adam that updates only the rows of an embedding table that have a gradient this step (sparse
    gradients: `tf.IndexedSlices`); dense variables are updated as by Adam. Rows a batch does not
    touch keep their moments as they are, as in TF Addons' `LazyAdam`."""

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        step = tf.cast(self.iterations + 1, variable.dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, variable.dtype), tf.cast(self.beta_2, variable.dtype)
        alpha = (tf.cast(self.learning_rate, variable.dtype) * tf.sqrt(1 - tf.pow(beta_2, step))
                 / (1 - tf.pow(beta_1, step)))
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        rows, position = tf.unique(gradient.indices)  # duplicate rows: their gradients summed
        grad = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(grad)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


def optimizer(config: RetrievalConfig) -> keras.optimizers.Optimizer:
    """The retrieval model's optimizer: `LazyAdam` at the config's learning rate."""
    return LazyAdam(config.learning_rate)


def _row_penalty(embedding: keras.layers.Embedding, rows: tf.Tensor, l2: float) -> tf.Tensor:
    """l2 x the squared norm of the distinct rows of `embedding` in `rows` (a sparse gradient)."""
    distinct = tf.unique(tf.reshape(rows, [-1])).y
    return l2 * tf.reduce_sum(tf.square(embedding(distinct)))


class SideFeatures(keras.layers.Layer):
    """Embeds one side's schema features (`FeatureTables.side(side)`) by table row: an embedding
    per category or number bucket, a sum-pooled embedding of categories, a mean-pooled embedding of
    text words, standardized floats as they are. Row 0 is the ID that is not in the files."""

    def __init__(self, tables: features.FeatureTables, side: str, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.specs = tables.side(side)
        self.tables, self.embeddings = [], []
        for spec in self.specs:
            table = tables.values[spec.key]
            self.tables.append(tf.constant(np.concatenate([np.zeros((1,) + table.shape[1:], table.dtype), table])))
            self.embeddings.append(None if spec.kind == "numbers" else keras.layers.Embedding(
                spec.size, dim, name=f"{spec.name}_embedding"))

    def call(self, row: tf.Tensor) -> list[tf.Tensor]:
        out = []
        for spec, table, embedding in zip(self.specs, self.tables, self.embeddings):
            value = tf.gather(table, row)
            if spec.kind == "numbers":
                out.append(value)
            elif spec.kind in ("category", "number"):
                out.append(embedding(value))
            else:  # categories: sum (a multi-hot projection); text: mean over the words
                mask = tf.cast(value > 0, tf.float32)
                pooled = tf.einsum("bt,btd->bd", mask, embedding(value))
                if spec.kind == "text":
                    pooled /= tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
                out.append(pooled)
        return out


def id_lookup(ids: np.ndarray) -> keras.layers.StringLookup:
    """ID string -> row + 1 (0 for an ID not in `ids`). The vocabulary goes in as an array: a
    Python list would stay on the layer as a list Keras tracks, and `Model.metrics` walks every
    tracked list each time a batch callback asks for it (a million user IDs: 600 ms per step)."""
    return keras.layers.StringLookup(vocabulary=np.asarray(ids, dtype=str), mask_token=None)


class BuiltFromRun:
    """For the Keras models Cascade builds from a run directory (`runs.load_run`,
    `rerank.cross_encoder.load_reranker`), never from a Keras config: what they are built from
    (feature tables, a BERT, pair texts) is not serializable, so their config is their name alone,
    and Keras does not warn at each SavedModel export that it could not capture their arguments."""

    def get_config(self) -> dict:
        return {"name": self.name}


class QueryTower(BuiltFromRun, keras.Model):
    """user_id string [B] -> embedding [B, D].

    Inputs: the user's ID embedding (the shared cold row for users without training interactions),
    their side features from the schema, and a mean-pooled embedding of their training history. A
    user not in the files maps to row 0: no features, no history."""

    def __init__(self, tables: features.FeatureTables, config: RetrievalConfig,
                 history_embedding: keras.layers.Embedding | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.lookup = id_lookup(tables.user_ids)
        self.id_row = tf.constant(np.concatenate([[0], tables.user_id_row]).astype(np.int32))
        # Histories as a ragged table (size: the kept interactions, not users x H); row 0 is the
        # user not in the files (an empty history).
        values, splits = tables.history_ragged(config.history_length)
        self.history_values = tf.constant(values)
        self.history_splits = tf.constant(np.concatenate([[0], splits]))
        self.user_embedding = keras.layers.Embedding(tables.num_user_ids, config.id_dim)
        self.side = SideFeatures(tables, "user", config.side_dim)
        self.use_recency = config.recency and len(tables.recency_boundaries) > 0
        if self.use_recency:
            self.recency_boundaries = [float(b) for b in tables.recency_boundaries]
            self.user_recency = tf.constant(np.concatenate([[0], tables.user_recency]).astype(np.int32))
            self.train_end = tf.constant(int(tables.train_end), tf.int64)
            self.recency_embedding = keras.layers.Embedding(len(tables.recency_boundaries) + 1,
                                                            config.side_dim)
        self.shares_item_embedding = history_embedding is not None
        self.history_embedding = history_embedding or keras.layers.Embedding(
            len(tables.item_ids) + 1, config.id_dim)
        self.mlp = keras.Sequential([keras.layers.Dense(config.hidden, activation="gelu"),
                                     keras.layers.Dense(config.embedding_dim)])

    def call(self, user: tf.Tensor, exclude_item: tf.Tensor | None = None,
             training: bool = False, timestamp: tf.Tensor | None = None) -> tf.Tensor:
        """`user`: user IDs (string [B]) or their rows + 1 (integer [B], the lookup's output, 0
        for an unknown user). `exclude_item` (item row + 1, [B]) hides the training target from
        its own history; `timestamp` ([B], training) is each example's time, else the user's
        newest row is used."""
        row = user if user.dtype.is_integer else self.lookup(user)
        id_row = tf.gather(self.id_row, row)
        history = tf.gather(tf.RaggedTensor.from_row_splits(
            self.history_values, self.history_splits, validate=False), row)  # [B, None]
        items, example = history.flat_values, history.value_rowids()  # only real items, no pads
        keep = tf.ones_like(items, tf.bool)
        if exclude_item is not None:
            keep &= items != tf.gather(tf.cast(exclude_item, items.dtype), example)
        if training and self.config.history_dropout > 0:
            keep &= tf.random.uniform(tf.shape(items)) >= self.config.history_dropout
        if training and self.config.cold_user_dropout:
            # A share of examples is seen as a new user: no ID, no history, features only.
            cold = tf.random.uniform(tf.shape(row)) < self.config.cold_user_dropout
            id_row = tf.where(cold, tf.zeros_like(id_row), id_row)
            keep &= ~tf.gather(cold, example)
        weights = tf.cast(keep, tf.float32)
        if training and self.config.l2:
            self.add_loss(_row_penalty(self.user_embedding, id_row, self.config.l2))
            if not self.shares_item_embedding:  # else penalized by the candidate tower
                self.add_loss(_row_penalty(self.history_embedding, items, self.config.l2))
        examples = tf.shape(row)[0]
        pooled = tf.math.unsorted_segment_sum(
            weights[:, None] * self.history_embedding(items), example, examples)
        pooled /= tf.maximum(tf.math.unsorted_segment_sum(weights, example, examples), 1.0)[:, None]
        return self._query(row, id_row, pooled, timestamp)

    def leave_one_out(self, user: tf.Tensor, exclude: tf.RaggedTensor) -> tf.Tensor:
        """float32 [sum of h, D]: the query of `user[b]` (IDs string [B] or rows + 1) with each item
        of `exclude[b]` (item rows + 1, ragged [B, (h)]) taken out of its history in turn, in the
        ragged order; each row equals `call(user[b], exclude_item=that item)`. The pooled
        history is each user's sum less the item's embedding (times it occurs), so the cost grows
        with h + the history's length, not their product."""
        row = user if user.dtype.is_integer else self.lookup(user)
        history = tf.gather(tf.RaggedTensor.from_row_splits(
            self.history_values, self.history_splits, validate=False), row)
        items, example = history.flat_values, history.value_rowids()
        total = tf.math.unsorted_segment_sum(self.history_embedding(items), example, tf.shape(row)[0])
        span = tf.constant(2 ** 31, tf.int64)  # above every item row + 1
        keys = tf.sort(example * span + tf.cast(items, tf.int64))
        owner = exclude.value_rowids()
        wanted = owner * span + tf.cast(exclude.flat_values, tf.int64)
        times = tf.cast(tf.searchsorted(keys, wanted, side="right")
                        - tf.searchsorted(keys, wanted, side="left"), tf.float32)
        kept = tf.cast(tf.gather(history.row_lengths(), owner), tf.float32) - times
        pooled = ((tf.gather(total, owner)
                   - times[:, None] * self.history_embedding(tf.cast(exclude.flat_values, items.dtype)))
                  / tf.maximum(kept, 1.0)[:, None])
        rows = tf.gather(row, owner)
        return self._query(rows, tf.gather(self.id_row, rows), pooled)

    def _query(self, row: tf.Tensor, id_row: tf.Tensor, pooled: tf.Tensor,
               timestamp: tf.Tensor | None = None) -> tf.Tensor:
        """The embedding from the ID row, the user's side features, the pooled history and the
        recency bucket (`timestamp`'s, else the user's newest row's)."""
        inputs = [self.user_embedding(id_row), *self.side(row), pooled]
        if self.use_recency:
            if timestamp is not None:
                age = tf.cast(self.train_end - tf.cast(timestamp, tf.int64), tf.float32)
                recency = tf.raw_ops.Bucketize(input=age, boundaries=self.recency_boundaries)
            else:
                recency = tf.gather(self.user_recency, row)
            inputs.append(self.recency_embedding(recency))
        return tf.math.l2_normalize(self.mlp(tf.concat(inputs, axis=1)), axis=1)


class CandidateTower(BuiltFromRun, keras.Model):
    """item_id string [B] -> embedding [B, D]: the item's ID embedding (the shared cold row for
    items without training interactions) and its side features from the schema."""

    def __init__(self, tables: features.FeatureTables, config: RetrievalConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.lookup = id_lookup(tables.item_ids)
        self.id_row = tf.constant(np.concatenate([[0], tables.item_id_row]).astype(np.int32))
        self.item_embedding = keras.layers.Embedding(tables.num_item_ids, config.id_dim)
        self.side = SideFeatures(tables, "item", config.side_dim)
        self.mlp = keras.Sequential([keras.layers.Dense(config.hidden, activation="gelu"),
                                     keras.layers.Dense(config.embedding_dim)])

    def call(self, item: tf.Tensor, training: bool = False) -> tf.Tensor:
        """`item`: item IDs (string [B]) or their rows + 1 (integer [B], the lookup's output)."""
        return self.embed_rows(item if item.dtype.is_integer else self.lookup(item), training=training)

    def embed_rows(self, row: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Embeds items by row + 1 (the lookup's output), skipping the string lookup."""
        id_row = tf.gather(self.id_row, row)
        if training and self.config.cold_item_dropout:
            # A share of examples is seen as a new item: its features without its ID.
            cold = tf.random.uniform(tf.shape(row)) < self.config.cold_item_dropout
            id_row = tf.where(cold, tf.zeros_like(id_row), id_row)
        if training and self.config.l2:
            self.add_loss(_row_penalty(self.item_embedding, id_row, self.config.l2))
        x = tf.concat([self.item_embedding(id_row), *self.side(row)], axis=1)
        return tf.math.l2_normalize(self.mlp(x), axis=1)


class RetrievalModel(BuiltFromRun, tfrs.Model):
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
        """`inputs`: `user_id` and `item_id` strings [B], or `user_row` and `item_row`, their rows
        + 1 (what `train.training_dataset` feeds: no strings per example); `timestamp` optional."""
        rows = "item_row" in inputs
        users = inputs["user_row"] if rows else inputs["user_id"]
        items = inputs["item_row"] if rows else inputs["item_id"]
        item_row = items if rows else self.item_lookup(items)  # item row + 1, as in the histories
        queries = self.query_tower(users, exclude_item=item_row, training=training,
                                   timestamp=inputs.get("timestamp"))
        candidates = self.candidate_tower(items, training=training)
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


def candidate_embeddings(retrieval: RetrievalModel, tables: features.FeatureTables,
                         batch_size: int = 4096) -> np.ndarray:
    """Candidate embeddings [I, D] in `tables.item_ids` order (no user is embedded)."""
    return _embed(retrieval.candidate_tower, tables.item_ids, batch_size,
                  retrieval.config.embedding_dim)


def embeddings(retrieval: RetrievalModel, tables: features.FeatureTables,
               batch_size: int = 4096, users: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings [U, D] in `tables.user_ids` order, candidate embeddings [I, D]).
    `users`: the user rows to embed (the others' rows are left zero), every user by default. The
    towers run as one traced graph per batch shape, not eagerly (minutes at a million users)."""
    dim = retrieval.config.embedding_dim
    candidates = candidate_embeddings(retrieval, tables, batch_size)
    if users is None:
        return _embed(retrieval.query_tower, tables.user_ids, batch_size, dim), candidates
    users = np.unique(users)
    queries = np.zeros((len(tables.user_ids), dim), np.float32)
    queries[users] = _embed(retrieval.query_tower, tables.user_ids[users], batch_size, dim)
    return queries, candidates


# One traced call per tower, kept while the tower lives: `ValidationMetrics` embeds every epoch,
# and a new tf.function each time would trace again (TensorFlow warns of the retracing).
_EMBED_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _embed(tower, ids: np.ndarray, batch_size: int, dim: int) -> np.ndarray:
    call = _EMBED_CALLS.get(tower)
    if call is None:
        ref = weakref.ref(tower)  # the traced call must not keep its own key alive
        call = _EMBED_CALLS[tower] = tf.function(lambda batch: ref()(batch), reduce_retracing=True)
    out = [call(tf.constant(ids[i:i + batch_size])).numpy() for i in range(0, len(ids), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
