"""The cross-encoder re-ranker (stage two): BERT reads (user context, candidate) text pairs and
re-scores the retrieval stage's top-K.

final score = cross-encoder logit + w_r * retrieval logit + w_p * log(1 + item training count)
              + w_e * EASE score of the item for the user,
with the three weights learned, so the re-ranker starts from the retrieval order and can only add
to it. The EASE score (`towers.peers.ease_item_weights`, an item-item ridge regression over the
user's training items) is the collaborative signal of the strongest peer on this benchmark: the
two-tower retrieval ranks well overall but EASE alone beats it at the top of the list, and the
re-ranker is where the two are combined (README: the ablation).

Pair text, from the dataset's card. The user context is the user's text (`Dataset.user_texts`)
and their newest training interactions as item texts (`Dataset.item_texts`), each with its stars
when the dataset has explicit ratings (ML-100K: `24-year-old man, technician. 5 stars: Toy Story
(1995); Animation Children's Comedy. ...`; an implicit dataset without a user file: `Toy Story
(1995); Animation Children's Comedy. ...`); the candidate is its item text. Every user and item
of the run's feature tables has a text, those without a training interaction too (the user's
text alone, the item's text), so new users and new items are scored. Only training rows are read,
and the pair is truncated longest-first to `max_length` tokens, so the newest titles survive.

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

At test time the run's own retrieval model ranks, contexts and popularity come from all training
rows (`rerank.rerank_eval`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tf_keras as keras

from rerank import checkpoint as checkpoints
from rerank import tokenizer as tokenizers
from rerank.config import RerankerConfig
from towers import data, features, files, metrics, peers
from towers import model as towers_model
from towers import train as towers_train

log = logging.getLogger(__name__)

__all__ = ["RerankerConfig", "CrossEncoder", "Reranker", "train_reranker", "load_reranker"]

RERANKER_DIR = "reranker"
CONFIG_FILE = "reranker_config.json"
TEXTS_FILE = "texts.npz"
BASE_DIR = "base"  # the truncated pretrained BERT training starts from
WEIGHTS = "checkpoints/final"
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# ---------------------------------------------------------------------------------------------
# Pair text


def user_contexts(dataset: data.Dataset, rows: data.Interactions, user_ids: np.ndarray,
                  history_titles: int = RerankerConfig.history_titles) -> dict[str, str]:
    """The context text of each of `user_ids` from `rows` (training rows only): the user's text,
    then the item texts of their newest `history_titles` interactions, newest first (ties by item
    ID), each after its stars when the dataset has ratings. A user without rows gets their text
    alone; a user without text or rows, ""."""
    newest: dict[str, list[tuple[int, str, float]]] = {str(u): [] for u in user_ids}
    for user, item, rating, timestamp in zip(rows.user_id, rows.item_id, rows.rating,
                                             rows.timestamp):
        if user not in newest:
            raise ValueError(f"user {str(user)!r} of the training rows is not among the "
                             f"{len(newest)} user IDs the contexts are built for (the run's "
                             "feature tables)")
        newest[user].append((-int(timestamp), item, float(rating)))
    items = np.unique(rows.item_id.astype(str))
    item_text = dict(zip(items, dataset.item_texts(items)))
    template = dataset.card.rating_text or "rated {rating}: "  # ML-100K's card: "{rating} stars: "
    stars = ((lambda rating: "") if dataset.implicit
             else (lambda rating: template.replace("{rating}", f"{rating:g}")))
    contexts = {}
    for (user, events), user_text in zip(newest.items(), dataset.user_texts(list(newest))):
        rated = [f"{stars(rating)}{item_text[item]}."
                 for _, item, rating in sorted(events, key=lambda e: (e[0], data.id_key(e[1])))
                 [:history_titles]]
        contexts[user] = " ".join(([user_text + "."] if user_text else []) + rated)
    return contexts


def candidate_texts(dataset: data.Dataset, item_ids: np.ndarray) -> np.ndarray:
    """str [I]: the item text (`Dataset.item_texts`) of each item ID."""
    return np.array(dataset.item_texts(np.asarray(item_ids).astype(str)), dtype=object)


# ---------------------------------------------------------------------------------------------
# Training groups


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


def top_candidates(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """int32 [U, k]: each user's k best item rows, items in `seen` [U, I] left out, best first."""
    masked = np.where(seen, -np.inf, scores)
    top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(masked, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1).astype(np.int32)


def build_groups(scores: np.ndarray, seen: np.ndarray, user_rows: np.ndarray,
                 item_rows: np.ndarray, k: int) -> Groups:
    """Groups for held-out pairs (user_rows[j], item_rows[j]) from retrieval `scores` [U, I] of a
    model that did not see them; `seen` [U, I] is what that model was trained on. Pairs whose item
    is outside the top-k give no group (the re-ranker never sees them at serving time either), and
    a user's other held-out items are never negatives."""
    user_rows, item_rows = np.asarray(user_rows), np.asarray(item_rows)
    if np.any(seen[user_rows, item_rows]):
        raise ValueError("a held-out pair is in `seen`: positives must be interactions the "
                         "retrieval model was not trained on")
    top = top_candidates(scores, seen, k)  # [U, k]
    held_out = np.zeros_like(seen)
    held_out[user_rows, item_rows] = True
    candidates = top[user_rows]  # [N, k]
    where = candidates == item_rows[:, None]
    found = where.any(axis=1)
    candidates = candidates[found]
    users = user_rows[found]
    return Groups(
        user_row=users.astype(np.int32),
        candidates=candidates,
        retrieval=np.take_along_axis(scores[users], candidates, axis=1).astype(np.float32),
        positive=where[found].argmax(axis=1).astype(np.int32),
        negative=~held_out[users[:, None], candidates],
    )


# ---------------------------------------------------------------------------------------------
# Model


class PairTexts(tf.Module):
    """In-graph tables: user_id -> context text, item_id -> candidate text and log(1 + count),
    (user_id, item_id) -> EASE score (`ease` [U, I], rows `user_ids`, columns `item_ids`)."""

    def __init__(self, user_ids: np.ndarray, contexts: np.ndarray, item_ids: np.ndarray,
                 item_texts: np.ndarray, popularity: np.ndarray, ease: np.ndarray | None = None,
                 name: str | None = None):
        super().__init__(name=name)
        user_ids, item_ids = np.asarray(user_ids, str), np.asarray(item_ids, str)
        ease = (np.zeros((len(user_ids), len(item_ids)), np.float32) if ease is None
                else np.asarray(ease, np.float32))
        if ease.shape != (len(user_ids), len(item_ids)):
            raise ValueError(f"ease {ease.shape} must be [users, items] = "
                             f"[{len(user_ids)}, {len(item_ids)}]")
        self.arrays = dict(user_ids=user_ids, contexts=np.asarray(contexts, str),
                           item_ids=item_ids, item_texts=np.asarray(item_texts, str),
                           popularity=np.asarray(popularity, np.float32), ease=ease)
        table = lambda keys, values, default: tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default)
        # An unknown user is read as a context with no user features and no history.
        self.context = table(user_ids, self.arrays["contexts"], "")
        self.item_text = table(item_ids, self.arrays["item_texts"], "")
        self.popularity = table(item_ids, self.arrays["popularity"], 0.0)
        self.user_row = table(user_ids, np.arange(len(user_ids), dtype=np.int32), -1)
        self.item_row = table(item_ids, np.arange(len(item_ids), dtype=np.int32), -1)
        self.ease = tf.constant(ease)  # [U, I]; 6 MB on MovieLens-100K

    def ease_score(self, user_ids: tf.Tensor, item_ids: tf.Tensor) -> tf.Tensor:
        """string [N], string [N] -> float32 [N]; 0 for an unknown user or item (no history)."""
        users, items = self.user_row.lookup(user_ids), self.item_row.lookup(item_ids)
        known = (users >= 0) & (items >= 0)
        index = tf.stack([tf.maximum(users, 0), tf.maximum(items, 0)], axis=-1)
        return tf.where(known, tf.gather_nd(self.ease, index), 0.0)

    def ease_rows(self, user_ids: np.ndarray) -> np.ndarray:
        """float32 [len(user_ids), I]: the EASE rows of `user_ids` (zeros for an unknown user)."""
        row = {u: r for r, u in enumerate(self.arrays["user_ids"])}
        ease = np.concatenate([self.arrays["ease"], np.zeros((1, len(self.arrays["item_ids"])),
                                                             np.float32)])
        return ease[[row.get(str(u), -1) for u in user_ids]]

    @classmethod
    def build(cls, dataset: data.Dataset, rows: data.Interactions, user_ids: np.ndarray,
              item_ids: np.ndarray, history_titles: int,
              ease_l2: float | None = RerankerConfig.ease_l2) -> PairTexts:
        """Contexts, popularity and EASE scores from `rows` (training rows only), texts from the
        dataset's files, for every one of `user_ids` and `item_ids` (the run's feature tables',
        with or without training rows); `ease_l2=None` leaves the EASE table at zero."""
        user_ids = np.asarray(user_ids).astype(str)
        contexts = user_contexts(dataset, rows, user_ids, history_titles)
        item_ids = np.asarray(item_ids).astype(str)
        count = dict(zip(*np.unique(rows.item_id.astype(str), return_counts=True)))
        ease = None
        if ease_l2 is not None:
            user_row = {u: r for r, u in enumerate(user_ids)}
            item_row = {i: r for r, i in enumerate(item_ids)}
            seen = np.zeros((len(user_ids), len(item_ids)), bool)
            seen[[user_row[u] for u in rows.user_id], [item_row[i] for i in rows.item_id]] = True
            ease = peers.ease_scores(seen, ease_l2)
        return cls(user_ids, np.array([contexts[u] for u in user_ids]), item_ids,
                   candidate_texts(dataset, item_ids),
                   np.log1p([count.get(i, 0) for i in item_ids]).astype(np.float32), ease)

    def save(self, path: str | os.PathLike) -> None:
        path = pathlib.Path(path)
        staging = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(staging, **self.arrays)
        files.write_atomic(path, staging.read_bytes())
        staging.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairTexts:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(**{key: arrays[key] for key in arrays.files})


class CrossEncoder(keras.Model):
    """BERT logit of each pair plus the learned retrieval, popularity and EASE terms.

    The pair is read as sentence-transformers reads text, by the mean of BERT's last hidden states
    over the pair's tokens, then one linear unit. (MiniLM's [CLS] pooler was never trained: its
    output hardly varies between pairs, and a classifier on it measured no gain.)
    """

    def __init__(self, bert, popularity_feature: bool = True, ease_feature: bool = True,
                 dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.bert = bert  # a transformers TFBertModel
        self.dropout = keras.layers.Dropout(dropout)
        # Zero weights: training starts exactly from the retrieval (+ popularity) order.
        self.classifier = keras.layers.Dense(1, kernel_initializer="zeros", name="classifier")
        self.popularity_feature = popularity_feature
        self.retrieval_weight = self.add_weight(
            name="retrieval_weight", shape=(), initializer=keras.initializers.Constant(1.0))
        self.popularity_weight = self.add_weight(
            name="popularity_weight", shape=(), initializer="zeros",
            trainable=popularity_feature)
        self.ease_feature = ease_feature
        self.ease_weight = self.add_weight(
            name="ease_weight", shape=(), initializer="zeros", trainable=ease_feature)

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """`input_ids` etc. int32 [N, T]; `retrieval_score`, `popularity`, `ease` float32 [N]
        -> [N]."""
        hidden = self.bert(**{key: inputs[key] for key in TOKEN_KEYS},
                           training=training).last_hidden_state  # [N, T, H]
        mask = tf.cast(inputs["attention_mask"], hidden.dtype)[..., None]  # [N, T, 1]
        pooled = tf.reduce_sum(hidden * mask, axis=1) / tf.reduce_sum(mask, axis=1)  # [N, H]
        score = self.classifier(self.dropout(pooled, training=training))[:, 0]
        score += self.retrieval_weight * inputs["retrieval_score"]
        if self.popularity_feature:
            score += self.popularity_weight * inputs["popularity"]
        if self.ease_feature:
            score += self.ease_weight * inputs["ease"]
        return score


class Reranker(keras.Model):
    """{`user_id` string [B], `item_ids` string [B, M], `retrieval_score` float32 [B, M]} ->
    final scores [B, M]: text lookup, in-graph pair tokenization and the cross-encoder."""

    def __init__(self, encoder: CrossEncoder, texts: PairTexts,
                 tokenizer: tokenizers.PairTokenizer, max_length: int, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.texts, self.tokenizer = encoder, texts, tokenizer
        self.max_length = max_length

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        item_ids = inputs["item_ids"]  # [B, M]
        shape = tf.shape(item_ids)
        items = tf.reshape(item_ids, [-1])  # [B*M]
        users = tf.reshape(tf.repeat(inputs["user_id"][:, None], shape[1], axis=1), [-1])
        tokens = self.tokenizer.encode_pairs(self.texts.context.lookup(users),
                                             self.texts.item_text.lookup(items), self.max_length)
        scores = self.encoder({**tokens,
                               "retrieval_score": tf.reshape(inputs["retrieval_score"], [-1]),
                               "popularity": self.texts.popularity.lookup(items),
                               "ease": self.texts.ease_score(users, items)},
                              training=training)
        return tf.reshape(scores, shape)

    def rank(self, user_id: str, item_ids: list[str], retrieval_scores: list[float]
             ) -> list[tuple[str, float]]:
        """One user's candidates, best first, with their final scores."""
        scores = self(dict(user_id=tf.constant([user_id]), item_ids=tf.constant([item_ids]),
                           retrieval_score=tf.constant([retrieval_scores], tf.float32)))[0]
        order = np.argsort(-scores.numpy(), kind="stable")
        return [(item_ids[i], float(scores[i])) for i in order]


def listwise_loss(labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy over each group (ListNet with one-hot targets): for labels and
    scores [B, G], -sum_j labels_j log softmax(scores)_j / sum_j labels_j, averaged over groups."""
    labels = tf.cast(labels, scores.dtype)
    per_group = -tf.reduce_sum(labels * tf.nn.log_softmax(scores, axis=-1), axis=-1)
    return tf.reduce_mean(per_group / tf.maximum(tf.reduce_sum(labels, axis=-1), 1.0))


def write_base(source: str | os.PathLike, target: str | os.PathLike, layers: int) -> pathlib.Path:
    """Copies a local HF BERT directory keeping only its first `layers` encoder layers (a
    layer-dropped student, as in DistilBERT's initialization); returns `target`."""
    import safetensors.numpy

    source, target = pathlib.Path(source), pathlib.Path(target)
    config = json.loads((source / "config.json").read_text())
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise ValueError(f"layers must be between 1 and {config['num_hidden_layers']} "
                         f"({source / 'config.json'}), got {layers}")
    state_dict, _ = checkpoints._read_state_dict(checkpoints._weights_file(source))
    kept = {}
    for key, array in state_dict.items():
        parts = key.split(".")
        if parts[1:3] == ["encoder", "layer"] and int(parts[3]) >= layers:
            continue
        # safetensors 0.8.0 writes non-contiguous arrays wrongly; keep every array contiguous.
        kept[key] = np.ascontiguousarray(array)
    target.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(kept, str(target / "model.safetensors"))
    config.update(num_hidden_layers=layers, architectures=["BertModel"])
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.txt", "tokenizer_config.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def new_encoder(base: str | os.PathLike, config: RerankerConfig, pretrained: bool = True
                ) -> CrossEncoder:
    """The cross-encoder on `base` (see `write_base`) with a zero classifier, so that training
    starts from the retrieval order: pretrained weights, or random ones for loading a trained one."""
    import transformers

    if pretrained:
        bert = checkpoints.load_bert(base, head="base")
    else:
        bert = transformers.TFBertModel(
            transformers.BertConfig.from_json_file(str(pathlib.Path(base) / "config.json")))
        bert(bert.dummy_inputs, training=False)
    bert.bert.embeddings.trainable = config.train_embeddings
    encoder = CrossEncoder(bert, config.popularity_feature, config.ease_feature)
    tokens = {key: tf.ones([1, 4], tf.int32) for key in TOKEN_KEYS}
    encoder({**tokens, **{key: tf.zeros([1]) for key in ("retrieval_score", "popularity", "ease")}})
    return encoder


# ---------------------------------------------------------------------------------------------
# Training


def group_dataset(groups: Groups, user_ids: np.ndarray, item_ids: np.ndarray, group_size: int,
                  batch_groups: int, seed: int, shuffle: bool = True) -> tf.data.Dataset:
    """Batches of ({user_id [B], item_ids [B, G], retrieval_score [B, G]}, labels [B, G]): the
    positive first, then `group_size - 1` negatives drawn from the top-K afresh each epoch."""
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
        return inputs, tf.one_hot(0, group_size)

    dataset = tf.data.Dataset.from_tensor_slices(
        (groups.user_row, groups.candidates, groups.retrieval, groups.positive, groups.negative))
    if shuffle:
        dataset = dataset.shuffle(len(groups), seed=seed, reshuffle_each_iteration=True)
    return dataset.map(draw).batch(batch_groups).prefetch(tf.data.AUTOTUNE)


def fit_head(encoder: CrossEncoder, groups: Groups, popularity: np.ndarray,
             ease: np.ndarray | None = None, steps: int = 400) -> dict[str, float]:
    """Sets w_r, w_p and w_e by the listwise loss over each group's whole top-K with no BERT term
    (three parameters, seconds): the point BERT fine-tuning starts from, and an ablation.
    `popularity` is [I], `ease` [U, I] in the rows of `groups.user_row`."""
    terms = [(encoder.retrieval_weight, groups.retrieval)]  # each weight with its [P, K] feature
    if encoder.popularity_feature:
        terms.append((encoder.popularity_weight, popularity[groups.candidates]))
    if encoder.ease_feature:
        if ease is None:
            raise ValueError("the encoder has an EASE term: pass the EASE scores")
        terms.append((encoder.ease_weight, ease[groups.user_row[:, None], groups.candidates]))
    weights = [weight for weight, _ in terms]
    values = [tf.constant(value, tf.float32) for _, value in terms]
    allowed = tf.constant(groups.negative | (np.arange(groups.candidates.shape[1])
                                             == groups.positive[:, None]))
    labels = tf.one_hot(groups.positive, groups.candidates.shape[1])
    optimizer = keras.optimizers.Adam(0.05)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            scores = tf.add_n([weight * value for weight, value in zip(weights, values)])
            loss = listwise_loss(labels, tf.where(allowed, scores, -1e9))
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
    return {"loss": float(loss), **head_weights(encoder)}


def head_weights(encoder: CrossEncoder) -> dict[str, float]:
    """The learned weights of the scalar terms of the final score."""
    return {"retrieval_weight": float(encoder.retrieval_weight),
            "popularity_weight": float(encoder.popularity_weight),
            "ease_weight": float(encoder.ease_weight)}


def head_scores(encoder: CrossEncoder, retrieval: np.ndarray, popularity: np.ndarray,
                ease: np.ndarray) -> np.ndarray:
    """The final score without the BERT term, for features of any one shape (an ablation)."""
    return (float(encoder.retrieval_weight) * retrieval
            + float(encoder.popularity_weight) * popularity * encoder.popularity_feature
            + float(encoder.ease_weight) * ease * encoder.ease_feature)


def score_candidates(reranker: Reranker, user_ids: np.ndarray, item_ids: np.ndarray,
                     retrieval: np.ndarray, users_per_batch: int = 8) -> np.ndarray:
    """float32 [U, K] final scores of each user's candidates (str [U], str [U, K], [U, K])."""
    predict = tf.function(reranker, reduce_retracing=True)
    out = []
    for start in range(0, len(user_ids), users_per_batch):
        part = slice(start, start + users_per_batch)
        out.append(predict(dict(user_id=tf.constant(user_ids[part].astype(str)),
                                item_ids=tf.constant(item_ids[part].astype(str)),
                                retrieval_score=tf.constant(retrieval[part], tf.float32))).numpy())
    return np.concatenate(out)


def reordered(scores: np.ndarray, candidates: np.ndarray, final: np.ndarray) -> np.ndarray:
    """[U, I] scores whose ranking is the top-K (`candidates` [U, K] item rows) in the order of
    `final` [U, K], then every other item in the order of `scores` [U, I]."""
    out = np.asarray(scores, np.float64)
    out = out - out.max(axis=1, keepdims=True) - 1.0  # every item below 0, in retrieval order
    ranks = np.argsort(np.argsort(-final, axis=1, kind="stable"), axis=1)  # 0 = best
    np.put_along_axis(out, candidates, (final.shape[1] - ranks).astype(np.float64), axis=1)
    return out


class RerankValidation(keras.callbacks.Callback):
    """Hit rate / NDCG @10 of the re-ranked top-K on validation rows, logged each epoch."""

    def __init__(self, reranker: Reranker, scores: np.ndarray, seen: np.ndarray,
                 users: np.ndarray, items: np.ndarray, user_ids: np.ndarray,
                 item_ids: np.ndarray, k: int):
        super().__init__()
        self.reranker, self.scores, self.seen, self.users, self.items = (
            reranker, scores, seen, users, items)
        self.user_rows = np.unique(users)
        self.top = top_candidates(scores[self.user_rows], seen[self.user_rows], k)
        self.user_ids, self.item_ids, self.history = user_ids, item_ids, []

    def evaluate(self) -> dict[str, float]:
        final = score_candidates(
            self.reranker, self.user_ids[self.user_rows], self.item_ids[self.top],
            np.take_along_axis(self.scores[self.user_rows], self.top, axis=1))
        matrix = _rows_replaced(self.scores, self.user_rows,
                                reordered(self.scores[self.user_rows], self.top, final))
        return self.metrics(matrix)

    def metrics(self, matrix: np.ndarray) -> dict[str, float]:
        result = metrics.evaluate(matrix, self.users, self.items, self.seen, (10,))
        return {key: round(value, 4) for key, value in result.items()}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.history.append(self.evaluate())
        log.info("epoch %d validation %s", epoch + 1, self.history[-1])
        if logs is not None:
            logs.update({f"val_{key}": value for key, value in self.history[-1].items()})


def train_reranker(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   config: RerankerConfig = RerankerConfig(), verbose: int | None = None) -> dict:
    """Trains the re-ranker of a retrieval run and writes `<run_dir>/reranker/`: the config, the
    shadow retrieval run, the truncated BERT it starts from (`base/`), `texts.npz` (test-time
    contexts from all training rows), Keras checkpoints, TensorBoard logs; records training time,
    losses and validation metrics under `reranker` in `<run_dir>/metrics.json` and returns them.
    `checkpoint` is a local HF BERT directory, all-MiniLM-L6-v2 by default."""
    started = time.perf_counter()
    run = pathlib.Path(run_dir)
    dataset, split = towers_train.run_data(run)  # the run's data and split, test rows unread
    train_rows = split.train
    fit_rows, held_out = split_rows(train_rows, config.holdout)  # fails before any training
    record = json.loads((run / towers_train.CONFIG_FILE).read_text())
    out = run / RERANKER_DIR
    out.mkdir(parents=True, exist_ok=True)

    shadow, tables = _shadow_retrieval(run, out / "shadow", record, config, verbose)
    queries, candidates = towers_train.embeddings(shadow, tables)
    scores = queries @ candidates.T / shadow.config.temperature  # the retrieval logits [U, I]
    users, items, seen = towers_train.test_rows(tables, held_out)
    validation = len(held_out) - int(len(held_out) * config.validation_share)
    groups = build_groups(scores, seen, users[:validation], items[:validation], config.candidates)
    log.info("%d of %d held-out training rows are in the shadow's top %d: one group each",
             len(groups), validation, config.candidates)

    base = write_base(checkpoint or checkpoints.fetch_minilm(), out / BASE_DIR, config.layers)
    tf.keras.utils.set_random_seed(config.seed)
    encoder = new_encoder(base, config)
    ease_l2 = config.ease_l2 if config.ease_feature else None
    texts = PairTexts.build(dataset, fit_rows, tables.user_ids, tables.item_ids,
                            config.history_titles, ease_l2)
    reranker = Reranker(encoder, texts, tokenizers.PairTokenizer.from_directory(base),
                        config.max_length)
    ease = texts.ease_rows(tables.user_ids)  # [U, I] in the rows of the tables (and the groups)
    head = fit_head(encoder, groups, texts.arrays["popularity"], ease)

    rng = np.random.default_rng(config.seed)
    val_users = np.unique(users[validation:])
    if 0 < config.validation_users < len(val_users):
        val_users = rng.choice(val_users, config.validation_users, replace=False)
    keep = np.isin(users[validation:], val_users)
    check = RerankValidation(reranker, scores, seen, users[validation:][keep],
                             items[validation:][keep], tables.user_ids, tables.item_ids,
                             config.candidates)
    top = check.top
    head_only = head_scores(encoder, np.take_along_axis(scores[check.user_rows], top, 1),
                            texts.arrays["popularity"][top],
                            np.take_along_axis(ease[check.user_rows], top, 1))
    baselines = {"retrieval": check.metrics(scores),
                 "head": check.metrics(_rows_replaced(
                     scores, check.user_rows, reordered(scores[check.user_rows], top, head_only)))}
    log.info("validation before BERT: %s", baselines)

    batches = group_dataset(groups, tables.user_ids, tables.item_ids, config.group_size,
                            config.batch_groups, config.seed)
    steps = config.epochs * int(np.ceil(len(groups) / config.batch_groups))
    optimizer = keras.optimizers.AdamW(
        keras.optimizers.schedules.PolynomialDecay(config.learning_rate, steps, 0.0),
        weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(
        var_names=["LayerNorm", "bias", "retrieval_weight", "popularity_weight", "ease_weight"])
    reranker.compile(optimizer=optimizer, loss=listwise_loss)
    callbacks = [check, keras.callbacks.TensorBoard(log_dir=str(out / "logs")),
                 keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "epoch-{epoch:02d}"),
                                                 save_weights_only=True)]
    if verbose is None:  # a progress bar on a terminal, one line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    fit_started = time.perf_counter()
    history = reranker.fit(batches, epochs=config.epochs, callbacks=callbacks, verbose=verbose)
    fit_seconds = time.perf_counter() - fit_started
    encoder.save_weights(str(out / WEIGHTS))

    # Test-time texts for every ID of the run's own tables (the shadow's have the same IDs).
    run_tables = features.FeatureTables.load(run / towers_train.TABLES_FILE)
    PairTexts.build(dataset, train_rows, run_tables.user_ids, run_tables.item_ids,
                    config.history_titles, ease_l2).save(out / TEXTS_FILE)
    files.write_atomic(out / CONFIG_FILE, json.dumps(
        {"checkpoint": str(checkpoint or checkpoints.MINILM_NAME), **dataclasses.asdict(config)},
        indent=2).encode())
    result = {"training": {"seconds": round(time.perf_counter() - started, 1),
                           "fit_seconds": round(fit_seconds, 1), "groups": len(groups),
                           "epochs": config.epochs,
                           "loss": [round(float(v), 4) for v in history.history["loss"]],
                           "head": head},
              "validation": {**baselines, "reranked_per_epoch": check.history,
                             "rows": int(keep.sum()), "users": len(val_users)}}
    towers_train.update_metrics(run, {"reranker": result})
    return result


def load_reranker(run_dir: str | os.PathLike) -> Reranker:
    """The trained re-ranker of a run, reading test-time texts (all training rows)."""
    out = pathlib.Path(run_dir) / RERANKER_DIR
    for needed in (CONFIG_FILE, TEXTS_FILE, WEIGHTS + ".index", BASE_DIR + "/config.json"):
        if not (out / needed).exists():
            raise FileNotFoundError(f"{out / needed}: not found; train first with "
                                    f"`cascade train reranker --run {run_dir}`")
    record = json.loads((out / CONFIG_FILE).read_text())
    names = {f.name for f in dataclasses.fields(RerankerConfig)}
    config = RerankerConfig(**{k: v for k, v in record.items() if k in names})
    encoder = new_encoder(out / BASE_DIR, config, pretrained=False)
    encoder.load_weights(str(out / WEIGHTS)).expect_partial()
    return Reranker(encoder, PairTexts.load(out / TEXTS_FILE),
                    tokenizers.PairTokenizer.from_directory(out / BASE_DIR), config.max_length)


def _shadow_retrieval(run: pathlib.Path, shadow: pathlib.Path, record: dict,
                      config: RerankerConfig, verbose: int | None):
    """The run's retrieval config trained on the run's data and split without the held-out rows;
    reused when present with the same holdout and data."""
    names = {f.name for f in dataclasses.fields(towers_model.RetrievalConfig)}
    retrieval_config = towers_model.RetrievalConfig(
        **{k: v for k, v in record.items() if k in names})
    existing = shadow / towers_train.CONFIG_FILE
    previous = json.loads(existing.read_text()) if existing.exists() else {}
    if not (previous.get("holdout") == config.holdout and previous.get("data") == record.get("data")
            and (shadow / (towers_train.WEIGHTS + ".index")).exists()):
        log.info("training the shadow retrieval model without the last %d training rows",
                 config.holdout)
        towers_train.train(towers_train.data_config(run), shadow, retrieval_config,
                           holdout=config.holdout, verbose=verbose)
    return towers_train.load_run(shadow)


def _rows_replaced(matrix: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.array(matrix, np.float64)
    out[rows] = values
    return out
