"""The cross-encoder re-ranker (stage two): BERT reads (user context, candidate) text pairs and
re-scores the retrieval stage's top-K.

final score = cross-encoder logit + w_r * retrieval logit + w_p * log(1 + item training count)
              + w_e * EASE score of the item for the user,
with the three weights learned, so the re-ranker starts from the retrieval order and can only add
to it. The EASE score (`towers.peers.ease_item_weights`, an item-item ridge regression over the
user's training items) is the collaborative signal of the strongest peer on this benchmark: the
two-tower retrieval ranks well overall but EASE alone beats it at the top of the list, and the
re-ranker is where the two are combined (docs/results.md: the ablation).

The pair text and the in-graph tables are `rerank.pairs`, the training groups and their hard
negatives `rerank.negatives` (why they are honest is there), re-ordering a score matrix
`rerank.ranking`; this module holds the model and its training.

At test time the run's own retrieval model ranks, contexts and popularity come from all training
rows (`rerank.rerank_eval`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tf_keras as keras

from rerank import checkpoint as checkpoints
from rerank import config as rerank_config
from rerank import negatives, pairs, ranking
from rerank.copy import templates
from rerank import tokenizer as tokenizers
from rerank.config import RerankerConfig, source_config
from towers import data, features, files, metrics, peers
from towers import model as towers_model
from towers import retrieval_eval, runs, sources
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
# Model


class CrossEncoder(towers_model.BuiltFromRun, keras.Model):
    """BERT logit of each pair plus the learned retrieval, popularity and EASE terms, and three
    terms for items without a training interaction (popularity 0: EASE and popularity say nothing
    of them): a bias, an extra weight on their retrieval score and a weight on their content
    popularity, gated off (and so 0, as fine-tuning gives them no gradient) unless the held-out
    groups have such items as positives (`fit_head`).

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
        self.new_item_weight = self.add_weight(name="new_item_weight", shape=(),
                                               initializer="zeros")
        self.new_retrieval_weight = self.add_weight(name="new_retrieval_weight", shape=(),
                                                    initializer="zeros")
        # Items without a training interaction: a weight on their content popularity (their
        # count as predicted from categories and year, `peers.content_popularity`), gated too.
        self.new_prior_weight = self.add_weight(name="new_prior_weight", shape=(),
                                                initializer="zeros")
        self.new_item_gate = self.add_weight(name="new_item_gate", shape=(), initializer="zeros",
                                             trainable=False)  # 1: the three terms above are on
        # The BERT term's weight for items with and without a training interaction: 1 (the term
        # as fine-tuned) until `fit_text_weights` sets them on validation rows after fine-tuning.
        self.text_weight = self.add_weight(name="text_weight", shape=(), initializer="ones",
                                           trainable=False)
        self.new_text_weight = self.add_weight(name="new_text_weight", shape=(),
                                               initializer="ones", trainable=False)

    @tf.autograph.experimental.do_not_convert  # see Reranker.call
    def text_score(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The BERT term alone: `input_ids` etc. int32 [N, T] -> [N]."""
        hidden = self.bert(**{key: inputs[key] for key in TOKEN_KEYS},
                           training=training).last_hidden_state  # [N, T, H]
        mask = tf.cast(inputs["attention_mask"], hidden.dtype)[..., None]  # [N, T, 1]
        pooled = tf.reduce_sum(hidden * mask, axis=1) / tf.reduce_sum(mask, axis=1)  # [N, H]
        return self.classifier(self.dropout(pooled, training=training))[:, 0]

    def scalar_terms(self, retrieval: tf.Tensor, popularity: tf.Tensor, ease: tf.Tensor,
                     prior: tf.Tensor | None = None) -> tf.Tensor:
        """The final score's terms besides BERT's, for features of any one shape; `prior`: the
        items' content popularity (None: 0), which counts only for items without a training
        interaction."""
        new = self.new_item_gate * tf.cast(tf.equal(popularity, 0.0), retrieval.dtype)
        score = (self.retrieval_weight + self.new_retrieval_weight * new) * retrieval
        score += self.new_item_weight * new
        if prior is not None:
            score += self.new_prior_weight * new * prior
        if self.popularity_feature:
            score += self.popularity_weight * popularity
        if self.ease_feature:
            score += self.ease_weight * ease
        return score

    def text_weights(self, popularity: tf.Tensor) -> tf.Tensor:
        """The BERT term's weight for each item: `new_text_weight` where it has no training
        interaction (popularity 0), else `text_weight`."""
        return tf.where(tf.equal(popularity, 0.0), self.new_text_weight, self.text_weight)

    @tf.autograph.experimental.do_not_convert  # see Reranker.call
    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """`input_ids` etc. int32 [N, T]; `retrieval_score`, `popularity`, `ease` (and `prior`,
        optional) float32 [N] -> [N]."""
        return (self.text_score(inputs, training) * self.text_weights(inputs["popularity"])
                + self.scalar_terms(inputs["retrieval_score"], inputs["popularity"],
                                    inputs["ease"], inputs.get("prior")))


class Reranker(towers_model.BuiltFromRun, keras.Model):
    """{`user_id` string [B], `item_ids` string [B, M], `retrieval_score` float32 [B, M]} ->
    final scores [B, M]: text lookup, in-graph pair tokenization and the cross-encoder."""

    def __init__(self, encoder: CrossEncoder, texts: pairs.PairTexts,
                 tokenizer: tokenizers.PairTokenizer, max_length: int,
                 text_loss_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.texts, self.tokenizer = encoder, texts, tokenizer
        self.max_length = max_length
        self.text_loss_weight = text_loss_weight  # of the BERT-alone loss (`train_step`)

    # No Python control flow on tensors in here, BERT's or ours: autograph's rewrite of the
    # transformers code only cost time (about 10 s of every trace on 2 cores).
    @staticmethod
    def _pairs(user_id: tf.Tensor, item_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(shape [2] of `item_ids` [B, M], users [B*M], items [B*M]): one row per pair."""
        shape = tf.shape(item_ids)
        users = tf.reshape(tf.repeat(user_id[:, None], shape[1], axis=1), [-1])
        return shape, users, tf.reshape(item_ids, [-1])

    def pair_features(self, users: tf.Tensor, items: tf.Tensor
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(popularity, EASE score, content popularity) of each pair, the scalar terms' inputs
        besides retrieval's (EASE 0 when the head has no EASE term)."""
        ease = (self.texts.ease_score(users, items) if self.encoder.ease_feature
                else tf.zeros_like(items, tf.float32))
        return self.texts.popularity.lookup(items), ease, self.texts.prior.lookup(items)

    def _tokens(self, users: tf.Tensor, items: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.tokenizer.encode_pairs(self.texts.context.lookup(users),
                                           self.texts.item_text.lookup(items), self.max_length)

    @tf.autograph.experimental.do_not_convert
    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        shape, users, items = self._pairs(inputs["user_id"], inputs["item_ids"])
        popularity, ease, prior = self.pair_features(users, items)
        scores = self.encoder({**self._tokens(users, items),
                               "retrieval_score": tf.reshape(inputs["retrieval_score"], [-1]),
                               "popularity": popularity, "ease": ease, "prior": prior},
                              training=training)
        return tf.reshape(scores, shape)

    @tf.autograph.experimental.do_not_convert
    def text_scores(self, user_id: tf.Tensor, item_ids: tf.Tensor, training: bool = False
                    ) -> tf.Tensor:
        """The BERT term alone (string [B], string [B, M] -> [B, M])."""
        shape, users, items = self._pairs(user_id, item_ids)
        return tf.reshape(self.encoder.text_score(self._tokens(users, items), training=training),
                          shape)

    def train_step(self, data):
        """The listwise loss of the final score over each group of hard negatives, plus, when the
        batch has `text_item_ids` (the positive, then random catalog items), `text_loss_weight`
        x the listwise loss of the BERT term alone over those: retrieval already separates a
        random item, so only this loss makes BERT read the pair's text for the topic, the part
        that carries over to items retrieval knows nothing of."""
        inputs, labels = data
        if "text_item_ids" not in inputs:
            return super().train_step(data)
        inputs = dict(inputs)
        text_items = inputs.pop("text_item_ids")
        with tf.GradientTape() as tape:
            loss = self.compiled_loss(labels, self(inputs, training=True),
                                      regularization_losses=self.losses)
            text = self.text_scores(inputs["user_id"], text_items, training=True)
            text_loss = listwise_loss(tf.one_hot(tf.zeros(tf.shape(text)[:1], tf.int32),
                                                 tf.shape(text)[1]), text)
            total = loss + self.text_loss_weight * text_loss
        self.optimizer.minimize(total, self.trainable_variables, tape=tape)
        return {"loss": loss, "text_loss": text_loss}

    def head(self, user_id: tf.Tensor, item_ids: tf.Tensor, retrieval_score: tf.Tensor
             ) -> tf.Tensor:
        """The final score without the BERT term (string [B], string [B, M], float32 [B, M] ->
        [B, M]): the cheap first pass over many candidates."""
        shape, users, items = self._pairs(user_id, item_ids)
        score = self.encoder.scalar_terms(tf.reshape(retrieval_score, [-1]),
                                          *self.pair_features(users, items))
        return tf.reshape(score, shape)

    def head_scores(self, user_ids: np.ndarray, item_ids: np.ndarray,
                    retrieval: np.ndarray, users_per_batch: int = 64) -> np.ndarray:
        """numpy `head` over str [U], str [U, K], [U, K], in batches of users."""
        return np.concatenate([self.head(
            tf.constant(user_ids[i:i + users_per_batch].astype(str)),
            tf.constant(item_ids[i:i + users_per_batch].astype(str)),
            tf.constant(retrieval[i:i + users_per_batch], tf.float32)).numpy()
            for i in range(0, len(user_ids), users_per_batch)])

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
    if bert.bert.pooler is not None:  # the pair is read by mean pooling: the [CLS] pooler gets
        bert.bert.pooler.trainable = False  # no gradient, and Keras would warn of it each step
    encoder = CrossEncoder(bert, config.popularity_feature, config.ease_feature)
    tokens = {key: tf.ones([1, 4], tf.int32) for key in TOKEN_KEYS}
    encoder({**tokens, **{key: tf.zeros([1])
                          for key in ("retrieval_score", "popularity", "ease", "prior")}})
    return encoder


# ---------------------------------------------------------------------------------------------
# Training


def liked_rating(dataset: data.Dataset) -> float | None:
    """The rating from which a history item counts as liked, a possible reason for copy: the copy
    corpus's (4 of 5 stars on explicit feedback); every item on implicit feedback."""
    return None if dataset.implicit else templates.HIGH_RATING


MIN_FIT_ROWS = 20  # positives of a kind (warm / new items) needed to fit its weights


def fit_head(encoder: CrossEncoder, groups: negatives.Groups, popularity: np.ndarray,
             ease: np.ndarray | None = None, steps: int = 400,
             prior: np.ndarray | None = None) -> dict[str, float]:
    """Sets w_r, w_p and w_e by the listwise loss over each group's whole top-K with no BERT term
    (three parameters, seconds): the point BERT fine-tuning starts from, and an ablation; and,
    when at least `MIN_FIT_ROWS` positives have no training interaction, the new-item terms (bias,
    retrieval weight and, given `prior`, the content-popularity weight; with fewer they stay off). `popularity` and `prior` are [I]; `ease`
    [P, K], the EASE score of each group's candidates."""
    terms = [(encoder.retrieval_weight, groups.retrieval)]  # each weight with its [P, K] feature
    new = (popularity[groups.candidates] == 0).astype(np.float32)  # no training interaction
    new_positives = int(new[np.arange(len(new)), groups.positive].sum())
    # Fewer new positives than MIN_FIT_ROWS say too little to fit three weights on (5 positives
    # under user-temporal once fit a negative retrieval weight for new items).
    if new_positives >= MIN_FIT_ROWS:
        encoder.new_item_gate.assign(1.0)
        terms += [(encoder.new_item_weight, new),
                  (encoder.new_retrieval_weight, new * groups.retrieval)]
        if prior is not None:
            terms.append((encoder.new_prior_weight, new * prior[groups.candidates]))
    if encoder.popularity_feature:
        terms.append((encoder.popularity_weight, popularity[groups.candidates]))
    if encoder.ease_feature:
        if ease is None:
            raise ValueError("the encoder has an EASE term: pass the EASE scores")
        terms.append((encoder.ease_weight, ease))
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
    return {"loss": float(loss), "new_positives": new_positives, **head_weights(encoder)}


def fit_text_weights(encoder: CrossEncoder, text: np.ndarray, head: np.ndarray, new: np.ndarray,
                     positive: np.ndarray, allowed: np.ndarray, steps: int = 300
                     ) -> dict[str, float | int]:
    """Sets the BERT term's weights for items with and without training rows
    (`CrossEncoder.text_weight`, `new_text_weight`) by the listwise loss of validation rows: row p's
    positive `positive[p]` against the `allowed[p]` of its user's candidates, scored
    `head + weight * text` (`text`, `head`, `new` [P, K]: the BERT term at weight 1, the scalar
    terms, no training interaction). A weight is fit only when at least `MIN_FIT_ROWS` positives
    are of its kind, else it keeps its value; neither goes below 0 (the term may be switched off,
    never turned round). Returns both weights and the count of rows of each kind."""
    is_new = new[np.arange(len(positive)), positive]
    counts = {"text_weight": int((~is_new).sum()), "new_text_weight": int(is_new.sum())}
    weights = [getattr(encoder, name) for name, count in counts.items() if count >= MIN_FIT_ROWS]
    if weights:
        text, head, new = (tf.constant(a, tf.float32) for a in (text, head, new))
        labels = tf.one_hot(positive, text.shape[1])
        mask = tf.constant(allowed)
        optimizer = keras.optimizers.Adam(0.05)
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(weights)  # not trainable: fine-tuning leaves them alone
                scale = encoder.new_text_weight * new + encoder.text_weight * (1.0 - new)
                loss = listwise_loss(labels, tf.where(mask, head + scale * text, -1e9))
            optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))
            for weight in weights:
                weight.assign(tf.maximum(weight, 0.0))
    return {"text_weight": float(encoder.text_weight),
            "new_text_weight": float(encoder.new_text_weight),
            "rows": counts["text_weight"], "new_rows": counts["new_text_weight"]}


def head_weights(encoder: CrossEncoder) -> dict[str, float]:
    """The learned weights of the scalar terms of the final score."""
    return {"retrieval_weight": float(encoder.retrieval_weight),
            "popularity_weight": float(encoder.popularity_weight),
            "ease_weight": float(encoder.ease_weight),
            "new_item_weight": float(encoder.new_item_weight),
            "new_retrieval_weight": float(encoder.new_retrieval_weight),
            "new_prior_weight": float(encoder.new_prior_weight)}


def head_scores(encoder: CrossEncoder, retrieval: np.ndarray, popularity: np.ndarray,
                ease: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """The final score without the BERT term, for features of any one shape (an ablation)."""
    return encoder.scalar_terms(
        tf.constant(retrieval, tf.float32), tf.constant(popularity, tf.float32),
        tf.constant(ease, tf.float32),
        None if prior is None else tf.constant(prior, tf.float32)).numpy()


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


def rerank_candidates(reranker: Reranker, user_ids: np.ndarray, item_ids: np.ndarray,
                      candidates: np.ndarray, retrieval: np.ndarray, depth: int,
                      users_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(item rows [U, D], final scores [U, D]) of the served two passes: the scalar terms score
    each user's `candidates` [U, K] (item rows into `item_ids`; `retrieval` their logits) and
    keep the best D = min(depth, K), which the whole re-ranker re-scores (`user_ids` [U])."""
    if candidates.shape[1] > depth:
        head = reranker.head_scores(user_ids, item_ids[candidates], retrieval)
        keep = np.argsort(-head, axis=1, kind="stable")[:, :depth]
        keep.sort(axis=1)  # candidates keep their retrieval order
        candidates = np.take_along_axis(candidates, keep, axis=1)
        retrieval = np.take_along_axis(retrieval, keep, axis=1)
    return candidates, score_candidates(reranker, user_ids, item_ids[candidates], retrieval,
                                        users_per_batch)


class RerankValidation(keras.callbacks.Callback):
    """Hit rate / NDCG @10 of the re-ranked top-K on validation rows, logged each epoch."""

    def __init__(self, reranker: Reranker, scores, seen, users: np.ndarray, items: np.ndarray,
                 user_ids: np.ndarray, item_ids: np.ndarray, candidates: np.ndarray,
                 candidate_users: np.ndarray, depth: int):
        """`candidates` [N, K]: the merged candidate rows (`towers.sources`) of user rows
        `candidate_users` [N] (sorted, covering `users`); the scalar terms keep the best `depth`
        of them, which BERT re-scores, as in the served cascade. `scores` [U, I] and `seen` may be
        `towers.metrics.Scores` and sparse."""
        super().__init__()
        self.reranker, self.scores, self.seen, self.users, self.items = (
            reranker, scores, seen, users, items)
        self.user_rows = np.unique(users)
        self.candidates = candidates[np.searchsorted(candidate_users, self.user_rows)]
        self.retrieval = ranking.pair_scores(scores, self.user_rows, self.candidates)
        self.depth = depth
        self.user_ids, self.item_ids, self.history = user_ids, item_ids, []
        self.last = None  # (depth, candidates, final scores) of the last `evaluate`

    def evaluate(self) -> dict[str, float]:
        top, final = rerank_candidates(self.reranker, self.user_ids[self.user_rows],
                                       self.item_ids, self.candidates, self.retrieval, self.depth)
        self.last = (self.depth, top, final)  # the end of training's sweep reuses it
        return self.metrics(ranking.reranked(self.scores, self.user_rows, top, final))

    def metrics(self, matrix) -> dict[str, float]:
        result = metrics.evaluate(matrix, self.users, self.items, self.seen, (10,))
        return {key: round(value, 4) for key, value in result.items()}

    def fit_text_weights(self) -> dict[str, float | int]:
        """Fits the BERT term's weights for items with and without training rows
        (`fit_text_weights`) on these validation rows, over the candidates BERT re-scores at
        this validation's depth, and leaves `last` as the encoder now scores them (no second
        BERT pass). The listwise loss is not the hit rate: the fitted weights are kept only when
        validation (hit rate@10, NDCG@10) is at least what the fine-tuned weights (1, 1) give,
        else both go back to 1 (`accepted` False). Returns the weights, the rows of each kind,
        `accepted`, and the validation metrics at weight 1 (`before`) and at the weights kept
        (`after`)."""
        encoder = self.reranker.encoder
        if (self.last is None or self.last[0] != self.depth
                or float(encoder.text_weight) != 1.0 or float(encoder.new_text_weight) != 1.0):
            encoder.text_weight.assign(1.0)
            encoder.new_text_weight.assign(1.0)
            self.evaluate()  # the BERT term at weight 1: final - head
        _, top, final = self.last
        retrieval = ranking.pair_scores(self.scores, self.user_rows, top)
        head = self.reranker.head_scores(self.user_ids[self.user_rows], self.item_ids[top],
                                         retrieval)
        text = final - head
        new = self.reranker.texts.popularity.lookup(
            tf.constant(self.item_ids[top].astype(str))).numpy() == 0
        user = np.searchsorted(self.user_rows, self.users)  # each row's user position
        match = top[user] == self.items[:, None]  # [N, D]: where the row's item is
        positives = np.zeros(top.shape, bool)
        np.logical_or.at(positives, user, match)  # every validation item of the user
        found = match.any(axis=1)  # rows whose item BERT re-scores
        rows = user[found]
        before = self.metrics(ranking.reranked(self.scores, self.user_rows, top, final))
        result = fit_text_weights(encoder, text[rows], head[rows], new[rows],
                                  match[found].argmax(axis=1),
                                  ~positives[rows] | match[found])
        fitted = head + np.where(new, result["new_text_weight"], result["text_weight"]) * text
        after = self.metrics(ranking.reranked(self.scores, self.user_rows, top, fitted))
        key = lambda m: (m["hit_rate@10"], m["ndcg@10"])
        accepted = key(after) >= key(before)
        if accepted:
            final = fitted
        else:
            encoder.text_weight.assign(1.0)
            encoder.new_text_weight.assign(1.0)
            result = {**result, "text_weight": 1.0, "new_text_weight": 1.0,
                      "rejected": {"text_weight": result["text_weight"],
                                   "new_text_weight": result["new_text_weight"], "metrics": after}}
            after = before
        self.last = (self.depth, top, np.asarray(final, np.float32))
        return {**result, "accepted": accepted, "before": before, "after": after}

    def depth_rankings(self, depths: tuple[int, ...]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{D: (item rows [U, D], final scores [U, D])} when the scalar terms keep only their best
        D candidates for BERT, for each D in `depths` (D = 0: the scalar terms alone over the
        largest depth's candidates, no BERT), from one BERT pass over the largest: a pair's final
        score does not depend on the other candidates, and the head's best D are the first D of
        its best max(depths). The last `evaluate`'s pass serves when it was at that depth (the
        weights are not trained between them)."""
        if self.last is not None and self.last[0] == max(depths):
            _, top, final = self.last
        else:
            top, final = rerank_candidates(self.reranker, self.user_ids[self.user_rows],
                                           self.item_ids, self.candidates, self.retrieval,
                                           max(depths))
        head = self.reranker.head_scores(self.user_ids[self.user_rows], self.item_ids[top],
                                         ranking.pair_scores(self.scores, self.user_rows, top))
        order = np.argsort(-head, axis=1, kind="stable")  # the head's best first
        out = {}
        for depth in depths:
            keep = np.sort(order[:, :depth], axis=1)  # in retrieval order, as served
            out[depth] = ((top, head) if depth == 0 else
                          tuple(np.take_along_axis(t, keep, axis=1) for t in (top, final)))
        return out

    def depths(self, depths: tuple[int, ...]) -> list[dict]:
        """Hit rate / NDCG @10 of each of `depth_rankings`, smallest depth first."""
        return [{"depth": depth, **self.metrics(ranking.reranked(self.scores, self.user_rows,
                                                                 *ranked))}
                for depth, ranked in sorted(self.depth_rankings(depths).items())]


    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.history.append(self.evaluate())
        log.info("epoch %d validation %s", epoch + 1, self.history[-1])
        if logs is not None:
            logs.update({f"val_{key}": value for key, value in self.history[-1].items()})


DEPTHS = (0, 20, 30, 50, 100)  # candidates BERT re-scores in the cascade, tried on validation


def depth_grid(candidates: int) -> tuple[int, ...]:
    """The depths tried for a re-ranker of `candidates` candidates: `DEPTHS` up to it, and it."""
    return tuple(sorted({d for d in DEPTHS if d <= candidates} | {candidates}))


def choose_depth(rows: list[dict], served: int = 10) -> int:
    """The candidates the cascade's BERT re-scores: the fewest (at least twice the served list,
    so BERT can still change which items are served) whose validation hit rate@10 is no lower
    than the largest depth's. BERT's cost grows with the count; where it adds nothing the head's
    best few are enough, and where it pays the larger depth wins."""
    widest = max(r["depth"] for r in rows)
    tried = sorted((r for r in rows if r["depth"] >= min(2 * served, widest) and r["depth"]),
                   key=lambda r: r["depth"])
    if not tried:
        raise ValueError(f"no depth above 0 was tried: {rows}")
    best = tried[-1]["hit_rate@10"]
    return next(r["depth"] for r in tried if r["hit_rate@10"] >= best)


def record_depth(run_dir: str | os.PathLike, rows: list[dict]) -> int:
    """Chooses the cascade's BERT depth from validation `rows` (`RerankValidation.depths`) and
    records it as `serve_depth` in the re-ranker's config (what `cascade export` serves unless
    told otherwise) and the rows under `reranker.validation.depths` in metrics.json."""
    run = pathlib.Path(run_dir)
    record = {**_record(run), "serve_depth": choose_depth(rows)}
    files.write_atomic(run / RERANKER_DIR / CONFIG_FILE, json.dumps(record, indent=2).encode())
    runs.update_metrics(run, {"depths": rows, "serve_depth": record["serve_depth"]},
                        ("reranker", "validation"))
    return record["serve_depth"]


def choose_popularity_half_life(config: RerankerConfig, tables: features.FeatureTables,
                                fit_rows: data.Interactions, held_users: np.ndarray,
                                held_items: np.ndarray, seen) -> tuple[float | None, list[dict]]:
    """(half-life, rows tried) of the popularity term: the config's own when it names one (no
    rows tried), else chosen on the held-out rows (`towers.peers.choose_half_life`): all-time
    counts unless a half-life raises their popularity hit rate@100."""
    setting = rerank_config.half_life(config)
    if setting != "auto":
        return setting, []
    chosen, tried = peers.choose_half_life(
        features.rows_of(tables.item_ids, fit_rows.item_id, "item"), fit_rows.timestamp, seen,
        held_users, held_items)
    log.info("popularity term, chosen on held-out rows: %s", peers.format_half_life_search(chosen, tried))
    return chosen, tried


def _half_life_text(half_life: float | None) -> str:
    return "none" if half_life is None else repr(float(half_life))


def recorded_half_life(config: RerankerConfig) -> float | None:
    """The popularity half-life a trained re-ranker used (its config records the value; a run
    trained before the setting existed reads "auto" and used all-time counts)."""
    setting = rerank_config.half_life(config)
    return None if setting == "auto" else setting


def train_reranker(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   config: RerankerConfig = RerankerConfig(), verbose: int | None = None) -> dict:
    """Trains the re-ranker of a retrieval run and writes `<run_dir>/reranker/`: the config, the
    shadow retrieval run, the truncated BERT it starts from (`base/`), `texts.npz` (test-time
    contexts from all training rows), Keras checkpoints, TensorBoard logs; records training time,
    losses and validation metrics under `reranker` in `<run_dir>/metrics.json` and returns them.
    `checkpoint` is a local HF BERT directory, all-MiniLM-L6-v2 by default."""
    started = time.perf_counter()
    run = pathlib.Path(run_dir)
    dataset, split = runs.run_data(run)  # the run's data and split, test rows unread
    train_rows = split.train
    fit_rows, held_out = negatives.split_rows(train_rows, config.holdout)  # fails before any training
    rerank_config.half_life(config)  # so does a bad --popularity-half-life
    record = json.loads((run / runs.CONFIG_FILE).read_text())
    out = run / RERANKER_DIR
    out.mkdir(parents=True, exist_ok=True)

    shadow, tables = _shadow_retrieval(run, out / "shadow", record, config, verbose)
    queries, candidates = towers_model.embeddings(shadow, tables)
    # The retrieval logits [U, I], a block of users at a time.
    scores = metrics.embedding_scores(queries, candidates, 1.0 / shadow.config.temperature)
    users, items, seen = retrieval_eval.test_rows(tables, held_out)
    validation = len(held_out) - int(len(held_out) * config.validation_share)
    ease_l2 = config.ease_l2 if config.ease_feature or config.item_item_candidates else None
    half_life, tried = choose_popularity_half_life(config, tables, fit_rows, users, items, seen)
    config = dataclasses.replace(config, popularity_half_life=_half_life_text(half_life))
    texts = pairs.PairTexts.build(dataset, fit_rows, tables.user_ids, tables.item_ids,
                                  config.history_titles, ease_l2, config.ease_neighbours,
                                  liked_rating(dataset), config.ease_max_items, half_life)
    source = source_config(config)
    held_users = np.unique(users)  # candidates only for the users with held-out rows
    candidates, _ = sources.batched(scores, seen, texts.neighbours(), tables.item_count, source,
                                    users=held_users)
    fit_users = users[:validation]
    groups = negatives.build_groups(scores, seen, fit_users, items[:validation],
                                    candidates=candidates[np.searchsorted(held_users,
                                                                          np.unique(fit_users))])
    log.info("%d of %d held-out training rows are in the shadow's %d candidates: one group each",
             len(groups), validation, source.k)

    base = write_base(checkpoint or checkpoints.fetch_minilm(), out / BASE_DIR, config.layers)
    tf.keras.utils.set_random_seed(config.seed)
    encoder = new_encoder(base, config)
    reranker = Reranker(encoder, texts, tokenizers.PairTokenizer.from_directory(base),
                        config.max_length, config.text_loss_weight)
    head = fit_head(encoder, groups, texts.arrays["popularity"], texts.ease_pairs(
        tables.user_ids[groups.user_row], tables.item_ids[groups.candidates]),
        prior=texts.arrays["prior"])

    val_users = validation_users(users[validation:], config)
    keep = np.isin(users[validation:], val_users)
    check = RerankValidation(reranker, scores, seen, users[validation:][keep],
                             items[validation:][keep], tables.user_ids, tables.item_ids,
                             candidates, held_users, config.candidates)
    top = check.candidates
    head_only = head_scores(encoder, check.retrieval, texts.arrays["popularity"][top],
                            texts.ease_pairs(tables.user_ids[check.user_rows], tables.item_ids[top]),
                            texts.arrays["prior"][top])
    baselines = {"retrieval": check.metrics(scores),
                 "candidates_hit_rate": round(sources.hit_rate(
                     top, users[validation:][keep], items[validation:][keep], check.user_rows), 4),
                 "head": check.metrics(ranking.reranked(scores, check.user_rows, top, head_only))}
    log.info("validation before BERT: %s", baselines)

    batches = negatives.group_dataset(
        groups, tables.user_ids, tables.item_ids, config.group_size, config.batch_groups,
        config.seed, text_negatives=config.text_negatives if config.text_loss_weight else 0)
    steps = config.epochs * int(np.ceil(len(groups) / config.batch_groups))
    optimizer = keras.optimizers.AdamW(
        keras.optimizers.schedules.PolynomialDecay(config.learning_rate, steps, 0.0),
        weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(
        var_names=["LayerNorm", "bias", "retrieval_weight", "popularity_weight", "ease_weight",
                   "new_item_weight", "new_retrieval_weight", "new_prior_weight"])
    reranker.compile(optimizer=optimizer, loss=listwise_loss)
    callbacks = [check, keras.callbacks.TensorBoard(log_dir=str(out / "logs")),
                 keras.callbacks.ModelCheckpoint(str(out / "checkpoints" / "epoch-{epoch:02d}"),
                                                 save_weights_only=True)]
    if verbose is None:  # a progress bar on a terminal; in logs, a line a minute and per epoch
        verbose = 1 if sys.stdout.isatty() else 2
    if verbose == 2:
        callbacks.append(towers_train.ProgressLog())
    fit_started = time.perf_counter()
    history = reranker.fit(batches, epochs=config.epochs, callbacks=callbacks, verbose=verbose)
    fit_seconds = time.perf_counter() - fit_started
    # How much the BERT term counts, for items with and without training rows: set on the
    # validation rows from the last epoch's pass (where it hurts there, it is switched off).
    text_weights = check.fit_text_weights()
    log.info("BERT term weights on validation rows: %.3f for items with training rows, %.3f for "
             "items without%s", text_weights["text_weight"], text_weights["new_text_weight"],
             " (the fit lowered validation and was rejected)" if text_weights.get("rejected") else "")
    save_encoder(encoder, run)

    # Test-time texts for every ID of the run's own tables (the shadow's have the same IDs).
    run_tables = features.FeatureTables.load(run / runs.TABLES_FILE)
    pairs.PairTexts.build(dataset, train_rows, run_tables.user_ids, run_tables.item_ids,
                          config.history_titles, ease_l2, config.ease_neighbours,
                          liked_rating(dataset), config.ease_max_items, half_life
                          ).save(out / TEXTS_FILE)
    files.write_atomic(out / CONFIG_FILE, json.dumps(
        {"checkpoint": str(checkpoint or checkpoints.MINILM_NAME), **dataclasses.asdict(config)},
        indent=2).encode())
    result = {"training": {"seconds": round(time.perf_counter() - started, 1),
                           "fit_seconds": round(fit_seconds, 1), "groups": len(groups),
                           "epochs": config.epochs,
                           "loss": [round(float(v), 4) for v in history.history["loss"]],
                           "head": head, "popularity_half_life": {
                               "chosen": half_life, "tried": tried}},
              "validation": {**baselines, "reranked_per_epoch": check.history,
                             "text_weights": text_weights,
                             "rows": int(keep.sum()), "users": len(val_users)}}
    runs.update_metrics(run, {"reranker": result})
    # How many candidates the cascade's BERT re-scores, chosen on the same validation rows.
    rows = check.depths(depth_grid(config.candidates))
    result["validation"].update(depths=rows, serve_depth=record_depth(run, rows))
    return result


def save_encoder(encoder: CrossEncoder, run_dir: str | os.PathLike) -> None:
    """Writes the encoder's weights as the run's re-ranker (`WEIGHTS`): into a temporary folder
    beside them, then each file renamed into place, so a failed write leaves the old weights."""
    target = pathlib.Path(run_dir) / RERANKER_DIR / WEIGHTS
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".weights.", dir=target.parent.parent))
    try:
        encoder.save_weights(str(staging / target.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        written = sorted(staging.glob(target.name + ".*"), key=lambda f: f.suffix == ".index")
        for path in written:  # the data files first, the index that names them last
            os.replace(path, target.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def validation_users(users: np.ndarray, config: RerankerConfig) -> np.ndarray:
    """The user rows whose validation rows (`users`: the user row of each) the re-ranker is
    validated on: all, or a seeded sample of `config.validation_users`."""
    chosen = np.unique(users)
    if 0 < config.validation_users < len(chosen):
        chosen = np.random.default_rng(config.seed).choice(chosen, config.validation_users,
                                                           replace=False)
    return chosen


def _record(run_dir: str | os.PathLike) -> dict:
    """The run's reranker_config.json: the training config, the checkpoint, `serve_depth`."""
    path = pathlib.Path(run_dir) / RERANKER_DIR / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; train first with "
                                f"`cascade train reranker --run {run_dir}`")
    return json.loads(path.read_text())


def run_config(run_dir: str | os.PathLike) -> RerankerConfig:
    """The config the run's re-ranker was trained with."""
    names = {f.name for f in dataclasses.fields(RerankerConfig)}
    return RerankerConfig(**{k: v for k, v in _record(run_dir).items() if k in names})


def served_depth(run_dir: str | os.PathLike) -> int:
    """The candidates the run's cascade has BERT re-score: its `serve_depth` (`record_depth`),
    else all the re-ranker was trained on."""
    record = _record(run_dir)
    candidates = record.get("candidates", RerankerConfig.candidates)
    return min(candidates, record.get("serve_depth") or candidates)


def load_reranker(run_dir: str | os.PathLike) -> Reranker:
    """The trained re-ranker of a run, reading test-time texts (all training rows)."""
    out = pathlib.Path(run_dir) / RERANKER_DIR
    for needed in (CONFIG_FILE, TEXTS_FILE, WEIGHTS + ".index", BASE_DIR + "/config.json"):
        if not (out / needed).exists():
            raise FileNotFoundError(f"{out / needed}: not found; train first with "
                                    f"`cascade train reranker --run {run_dir}`")
    config = run_config(run_dir)
    encoder = new_encoder(out / BASE_DIR, config, pretrained=False)
    encoder.load_weights(str(out / WEIGHTS)).expect_partial()
    return Reranker(encoder, pairs.PairTexts.load(out / TEXTS_FILE),
                    tokenizers.PairTokenizer.from_directory(out / BASE_DIR), config.max_length)


def _shadow_retrieval(run: pathlib.Path, shadow: pathlib.Path, record: dict,
                      config: RerankerConfig, verbose: int | None):
    """The run's retrieval config trained on the run's data and split without the held-out rows;
    reused when present with the same holdout and data. A run trained with `--holdout` equal to the
    re-ranker's never saw those rows (the same last training rows): it is its own shadow, and no
    second retrieval model is trained (at a million users that training is most of the cost)."""
    if record.get("holdout") == config.holdout:
        log.info("the run was trained without the last %d training rows: it is the shadow",
                 config.holdout)
        return runs.load_run(run)
    names = {f.name for f in dataclasses.fields(towers_model.RetrievalConfig)}
    retrieval_config = towers_model.RetrievalConfig(
        **{k: v for k, v in record.items() if k in names})
    existing = shadow / runs.CONFIG_FILE
    previous = json.loads(existing.read_text()) if existing.exists() else {}
    if not (previous.get("holdout") == config.holdout and previous.get("data") == record.get("data")
            and (shadow / (runs.WEIGHTS + ".index")).exists()):
        log.info("training the shadow retrieval model without the last %d training rows",
                 config.holdout)
        towers_train.train(runs.data_config(run), shadow, retrieval_config,
                           holdout=config.holdout, verbose=verbose)
    return runs.load_run(shadow)


