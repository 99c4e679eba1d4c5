"""The re-ranker's inputs as text: (user context, candidate) pairs, and the in-graph tables.

Pair text, from the dataset's card. The user context is the user's text (`Dataset.user_texts`)
and their newest training interactions as item texts (`Dataset.item_texts`), each with its stars
when the dataset has explicit ratings (ML-100K: `24-year-old man, technician. 5 stars: Toy Story
(1995); Animation Children's Comedy. ...`; an implicit dataset without a user file: `Toy Story
(1995); Animation Children's Comedy. ...`); the candidate is its item text. Every user and item
of the run's feature tables has a text, those without a training interaction too (the user's
text alone, the item's text), so new users and new items are scored. Only training rows are read,
and the pair is truncated longest-first to `max_length` tokens, so the newest titles survive.

`PairTexts` holds, as lookup tables inside the exported graphs, each user's context, each item's
text and log(1 + training count), and the EASE score of (user, item).
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank.config import RerankerConfig
from towers import data, files, peers



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
