"""The re-ranker's inputs as text: (user context, candidate) pairs, and the in-graph tables.

Pair text, from the dataset's card. The user context is the user's text (`Dataset.user_texts`)
and their newest training interactions as item texts (`Dataset.item_texts`), each with its stars
when the dataset has explicit ratings (ML-100K: `24-year-old man, technician. 5 stars: Toy Story
(1995); Animation Children's Comedy. ...`; an implicit dataset without a user file: `Toy Story
(1995); Animation Children's Comedy. ...`); the candidate is its item text. Every user and item
of the run's feature tables has a text, those without a training interaction too (the user's
text alone, the item's text), so new users and new items are scored. Only training rows are read,
and the pair is truncated longest-first to `max_length` tokens, so the newest titles survive.

`PairTexts` holds, as ID lookup tables and variables of the exported graphs (the arrays in a
SavedModel's variables/, not in its graph), each user's context and training history, each item's
text and log(1 + training count), and the bounded EASE weights, from which the EASE score of (user,
item) is summed over the user's history.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import scipy.sparse
import tensorflow as tf

from rerank.config import RerankerConfig
from towers import data, features, files, peers, saving



def user_contexts(dataset: data.Dataset, rows: data.Interactions, user_ids: np.ndarray,
                  history_titles: int = RerankerConfig.history_titles) -> dict[str, str]:
    """The context text of each of `user_ids` from `rows` (training rows only): the user's text,
    then the item texts of their newest `history_titles` interactions, newest first (ties by item
    ID), each after its stars when the dataset has ratings. A user without rows gets their text
    alone; a user without text or rows, "". The rows are ordered by arrays, so only the kept
    `history_titles` per user become Python strings."""
    user_ids = np.asarray(user_ids).astype(str)
    try:
        user_rows = features.rows_of(user_ids, rows.user_id, "user")
    except KeyError:
        missing = str(sorted(set(rows.user_id.astype(str)) - set(user_ids))[0])
        raise ValueError(f"user {missing!r} of the training rows is not among the "
                         f"{len(user_ids)} user IDs the contexts are built for (the run's "
                         "feature tables)") from None
    items = np.array(sorted(set(np.unique(rows.item_id.astype(str))), key=data.id_key), dtype=str)
    item_rows = features.rows_of(items, rows.item_id, "item")  # rows in ID order
    # Newest first, ties by item ID; the first `history_titles` of each user.
    order = np.lexsort((item_rows, -np.asarray(rows.timestamp, np.int64), user_rows))
    counts = np.bincount(user_rows, minlength=len(user_ids))
    starts = np.concatenate([[0], np.cumsum(counts)])
    rank = np.arange(len(order)) - np.repeat(starts[:-1], counts)
    kept = order[rank < history_titles]  # still grouped by user, newest first
    kept_starts = np.concatenate([[0], np.cumsum(np.minimum(counts, history_titles))])
    item_text = np.array(dataset.item_texts(items), dtype=object)
    template = dataset.card.rating_text or "rated {rating}: "  # ML-100K's card: "{rating} stars: "
    stars = ((lambda rating: "") if dataset.implicit
             else (lambda rating: template.replace("{rating}", f"{rating:g}")))
    texts = item_text[item_rows[kept]]
    ratings = np.asarray(rows.rating, np.float64)[kept]
    contexts = {}
    for row, (user, user_text) in enumerate(zip(user_ids, dataset.user_texts(list(user_ids)))):
        span = range(kept_starts[row], kept_starts[row + 1])
        rated = [f"{stars(ratings[j])}{texts[j]}." for j in span]
        contexts[user] = " ".join(([user_text + "."] if user_text else []) + rated)
    return contexts


def candidate_texts(dataset: data.Dataset, item_ids: np.ndarray) -> np.ndarray:
    """str [I]: the item text (`Dataset.item_texts`) of each item ID."""
    return np.array(dataset.item_texts(np.asarray(item_ids).astype(str)), dtype=object)


class Column(tf.Module):
    """key -> value through a key -> row table (-1: unknown) and a variable of the values (the
    default in a last row): a SavedModel keeps the values in variables/, not in its graph."""

    def __init__(self, rows: tf.lookup.StaticHashTable, values: np.ndarray, default):
        super().__init__()
        self.rows = rows
        values = np.asarray(values)
        self.values = saving.frozen(np.append(values, np.array([default], values.dtype)), "values")

    def lookup(self, keys: tf.Tensor) -> tf.Tensor:
        row = self.rows.lookup(keys)
        values = saving.read(self.values)
        return tf.gather(values, tf.where(row >= 0, row, tf.shape(values)[0] - 1))


class PairTexts(tf.Module):
    """In-graph tables: user_id -> context text and training history (item rows, ragged),
    item_id -> candidate text and log(1 + count), and the bounded EASE weights
    (`peers.ItemNeighbours`: (source item row, target item row) -> weight, I x k entries), so the
    EASE score of (user, item) is the sum of the weights from the user's history. Nothing is
    sized users x items."""

    def __init__(self, user_ids: np.ndarray, contexts: np.ndarray, item_ids: np.ndarray,
                 item_texts: np.ndarray, popularity: np.ndarray,
                 history_values: np.ndarray | None = None, history_splits: np.ndarray | None = None,
                 neighbour_index: np.ndarray | None = None,
                 neighbour_weight: np.ndarray | None = None,
                 history_liked: np.ndarray | None = None, prior: np.ndarray | None = None,
                 name: str | None = None):
        super().__init__(name=name)
        user_ids, item_ids = np.asarray(user_ids, str), np.asarray(item_ids, str)
        if history_values is None:  # no EASE term: empty histories, no weights
            history_values = np.zeros(0, np.int32)
            history_splits = np.zeros(len(user_ids) + 1, np.int64)
            neighbour_index = np.zeros((len(item_ids), 0), np.int32)
            neighbour_weight = np.zeros((len(item_ids), 0), np.float32)
        if history_liked is None:  # every history item counts as liked (implicit feedback)
            history_liked = np.ones(len(history_values), bool)
        if prior is None:  # no content popularity (texts saved before it): 0 for every item
            prior = np.zeros(len(item_ids), np.float32)
        if len(history_splits) != len(user_ids) + 1 or neighbour_index.shape[0] != len(item_ids):
            raise ValueError(f"history splits {len(history_splits)} must be users + 1 = "
                             f"{len(user_ids) + 1}, neighbours {neighbour_index.shape} [items, k] "
                             f"with items = {len(item_ids)}")
        self.arrays = dict(user_ids=user_ids, contexts=np.asarray(contexts, str),
                           item_ids=item_ids, item_texts=np.asarray(item_texts, str),
                           popularity=np.asarray(popularity, np.float32),
                           history_values=np.asarray(history_values, np.int32),
                           history_splits=np.asarray(history_splits, np.int64),
                           neighbour_index=np.asarray(neighbour_index, np.int32),
                           neighbour_weight=np.asarray(neighbour_weight, np.float32),
                           history_liked=np.asarray(history_liked, bool),
                           prior=np.asarray(prior, np.float32))
        table = lambda keys, values, default: tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default)
        self.user_row = table(user_ids, np.arange(len(user_ids), dtype=np.int32), -1)
        self.item_row = table(item_ids, np.arange(len(item_ids), dtype=np.int32), -1)
        # An unknown user is read as a context with no user features and no history.
        self.context = Column(self.user_row, self.arrays["contexts"], "")
        self.item_text = Column(self.item_row, self.arrays["item_texts"], "")
        self.popularity = Column(self.item_row, self.arrays["popularity"], 0.0)
        # Content popularity (`peers.content_popularity`): what the head weighs for new items.
        self.prior = Column(self.item_row, self.arrays["prior"], 0.0)
        self.items = len(item_ids)
        self.users = len(user_ids)
        # Arrays as variables: a SavedModel keeps them in variables/, not in its graph.
        self.history_values = saving.frozen(self.arrays["history_values"], "history_values")
        splits = self.arrays["history_splits"]
        self.history_splits = saving.frozen(np.append(splits, splits[-1]), "history_splits")  # last: empty
        self.history_liked = saving.frozen(self.arrays["history_liked"], "history_liked")
        self.item_id = saving.frozen(np.append(item_ids, ""), "item_id")  # row -> ID; the last: none
        # The EASE weights by key source row x I + target row, sorted: a lookup is a binary search
        # over I x k keys (12 bytes an entry, in variables/; no hash table built at load).
        index, weight = self.arrays["neighbour_index"], self.arrays["neighbour_weight"]
        keys = (np.repeat(np.arange(len(item_ids), dtype=np.int64), index.shape[1]) * len(item_ids)
                + index.ravel())
        order = np.argsort(keys, kind="stable")  # a last key above every real one: never empty
        self.weight_keys = saving.frozen(np.append(keys[order], np.iinfo(np.int64).max),
                                         "weight_keys")
        self.weight_values = saving.frozen(
            np.append(weight.ravel()[order], np.float32(0)).astype(np.float32), "weight_values")

    def neighbours(self) -> peers.ItemNeighbours:
        return peers.ItemNeighbours(self.arrays["neighbour_index"], self.arrays["neighbour_weight"])

    def history(self, user_ids: np.ndarray) -> scipy.sparse.csr_matrix:
        """Binary CSR [len(user_ids), I]: each user's training items (an unknown user: none)."""
        row = {u: r for r, u in enumerate(self.arrays["user_ids"])}
        splits, values = self.arrays["history_splits"], self.arrays["history_values"]
        rows = [row.get(str(u), -1) for u in user_ids]
        pieces = [values[splits[r]:splits[r + 1]] if r >= 0 else values[:0] for r in rows]
        lengths = np.array([len(piece) for piece in pieces], np.int64)
        indices = np.concatenate(pieces) if pieces else values[:0]
        return scipy.sparse.csr_matrix(
            (np.ones(len(indices), np.float32), indices, np.concatenate([[0], np.cumsum(lengths)])),
            shape=(len(rows), self.items))

    def _history_of(self, user_ids: tf.Tensor) -> tf.RaggedTensor:
        """int32 [N, (h)]: the history item rows of each user (none for an unknown user)."""
        history = tf.RaggedTensor.from_row_splits(saving.read(self.history_values),
                                                  saving.read(self.history_splits))
        return tf.gather(history, self._history_rows(user_ids))

    def _history_rows(self, user_ids: tf.Tensor) -> tf.Tensor:
        """int32 [N]: each user's row of the history tables; the last, empty row when unknown."""
        users = self.user_row.lookup(user_ids)
        return tf.where(users >= 0, users, self.users)

    def contributions(self, user_ids: tf.Tensor, item_ids: tf.Tensor) -> tuple[tf.RaggedTensor,
                                                                                 tf.RaggedTensor]:
        """(history item rows int32 [N, (h)], each one's EASE weight towards the pair's item
        float32 [N, (h)]): the terms whose sum is `ease_score`."""
        history = self._history_of(user_ids)
        items = tf.gather(self.item_row.lookup(item_ids), history.value_rowids())
        return history, history.with_flat_values(self.weights(history.flat_values, items))

    def weights(self, sources: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """float32, `targets`' shape: the EASE weight of item row `sources` (broadcast over
        `targets`' last axes) towards item row `targets`; 0 when absent or a target is -1."""
        sources = tf.reshape(tf.cast(sources, tf.int64),
                             tf.concat([tf.shape(sources), tf.ones(tf.rank(targets) - tf.rank(sources),
                                                                   tf.int32)], axis=0))
        keys = sources * self.items + tf.cast(targets, tf.int64)
        found = tf.reshape(self._weight(tf.reshape(keys, [-1])), tf.shape(keys))
        return tf.where(targets >= 0, found, 0.0)

    def liked_history(self, user_ids: tf.Tensor) -> tf.RaggedTensor:
        """int32 [N, (h)]: each user's liked history item rows (the possible reasons)."""
        return tf.ragged.boolean_mask(self._history_of(user_ids), self._liked_of(user_ids))

    def _liked_of(self, user_ids: tf.Tensor) -> tf.RaggedTensor:
        """bool [N, (h)], aligned with `_history_of`: which history items the user liked."""
        return tf.gather(tf.RaggedTensor.from_row_splits(saving.read(self.history_liked),
                                                         saving.read(self.history_splits)),
                         self._history_rows(user_ids))

    def _weight(self, keys: tf.Tensor) -> tf.Tensor:
        """float32 [N]: the EASE weight of each key (source row x I + target row); 0 when absent."""
        sorted_keys = saving.read(self.weight_keys)
        at = tf.searchsorted(sorted_keys, keys)  # < size: the last key is above every key
        return tf.where(tf.gather(sorted_keys, at) == keys,
                        tf.gather(saving.read(self.weight_values), at), 0.0)

    def reasons(self, user_ids: tf.Tensor, item_ids: tf.Tensor, count: int = 2) -> tf.Tensor:
        """string [N, count]: the IDs of the user's liked history items whose EASE weight towards
        the pair's item is largest, largest first, only positive ones ("" where fewer qualify).
        The EASE term is a sum over history items, so each one's share of the item's final score
        is exactly w_e times its weight: these are the history items that raised it most."""
        history, weights = self.contributions(user_ids, item_ids)
        eligible = self._liked_of(user_ids) & (weights > 0)
        scores = tf.where(eligible, weights, -np.inf).to_tensor(-np.inf)  # [N, h]
        rows = history.to_tensor(self.items)
        pad = tf.maximum(count - tf.shape(scores)[1], 0)
        scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
        rows = tf.pad(rows, [[0, 0], [0, pad]], constant_values=self.items)
        best, order = tf.math.top_k(scores, k=count)  # ties: the lower item row first
        chosen = tf.where(best > -np.inf, tf.gather(rows, order, batch_dims=1), self.items)
        return tf.gather(saving.read(self.item_id), chosen)

    def ease_score(self, user_ids: tf.Tensor, item_ids: tf.Tensor) -> tf.Tensor:
        """string [N], string [N] -> float32 [N]; 0 for an unknown user or item (no history)."""
        return tf.reduce_sum(self.contributions(user_ids, item_ids)[1], axis=1)

    def ease_pairs(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """float32 [N, K]: the EASE score of user `user_ids[n]` for each of `item_ids[n]` [N, K]
        (item IDs), in batches of users (numpy, for training and evaluation)."""
        column = {i: c for c, i in enumerate(self.arrays["item_ids"])}
        items = np.vectorize(lambda i: column.get(str(i), -1), otypes=[np.int64])(item_ids)
        scores = self.neighbours().pair_scores(self.history(user_ids), np.maximum(items, 0))
        return np.where(items >= 0, scores, 0.0).astype(np.float32)

    @classmethod
    def build(cls, dataset: data.Dataset, rows: data.Interactions, user_ids: np.ndarray,
              item_ids: np.ndarray, history_titles: int,
              ease_l2: float | None = RerankerConfig.ease_l2,
              ease_neighbours: int = RerankerConfig.ease_neighbours,
              liked_rating: float | None = None,
              ease_max_items: int = RerankerConfig.ease_max_items,
              popularity_half_life: float | None = None) -> PairTexts:
        """Contexts, popularity, content popularity, histories and EASE weights from `rows`
        (training rows only),
        texts from the dataset's files, for every one of `user_ids` and `item_ids` (the run's
        feature tables', with or without training rows); `ease_l2=None`: no EASE term. A history
        item is liked (a possible reason) when its best rating is at least `liked_rating`
        (`None`: every one, as for implicit feedback). The popularity term reads log(1 + count),
        each row's count halved every `popularity_half_life` before the newest row (`None`:
        all-time counts; `towers.peers.decayed_counts`)."""
        user_ids = np.asarray(user_ids).astype(str)
        contexts = user_contexts(dataset, rows, user_ids, history_titles)
        item_ids = np.asarray(item_ids).astype(str)
        row_users = features.rows_of(user_ids, rows.user_id, "user")
        row_items = features.rows_of(item_ids, rows.item_id, "item")
        count = np.bincount(row_items, minlength=len(item_ids))
        ease = {}
        if ease_l2 is not None:
            seen = peers.seen_matrix(row_users, row_items, len(user_ids), len(item_ids))
            seen.sort_indices()
            neighbours = peers.ease_neighbours(seen, ease_l2, ease_neighbours, ease_max_items)
            liked = (np.ones(seen.nnz, bool) if liked_rating is None
                     else _best_ratings(rows.rating, row_users, row_items, len(item_ids))
                     >= liked_rating)
            ease = dict(history_values=seen.indices.astype(np.int32),
                        history_splits=seen.indptr.astype(np.int64),
                        neighbour_index=neighbours.index, neighbour_weight=neighbours.weight,
                        history_liked=liked)
        facts = dataset.facts(item_ids)
        prior = peers.content_popularity([f.categories for f in facts], [f.year for f in facts],
                                         count)
        popularity = np.log1p(peers.decayed_counts(row_items, rows.timestamp, len(item_ids),
                                                   popularity_half_life)).astype(np.float32)
        # An item with a row stays above 0 in float32 too: 0 is what marks an item as new.
        popularity[count > 0] = np.maximum(popularity[count > 0], np.finfo(np.float32).tiny)
        return cls(user_ids, np.array([contexts[u] for u in user_ids]), item_ids,
                   candidate_texts(dataset, item_ids), popularity, **ease, prior=prior)

    def save(self, path: str | os.PathLike) -> None:
        path = pathlib.Path(path)
        staging = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(staging, **self.arrays)
        files.write_atomic(path, staging.read_bytes())
        staging.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairTexts:
        with np.load(path, allow_pickle=False) as arrays:
            if "ease" in arrays.files:  # the dense users x items table of earlier versions
                raise ValueError(f"{path}: written by an earlier Cascade (a dense EASE table); "
                                 "train the re-ranker again: cascade train reranker --run RUN")
            return cls(**{key: arrays[key] for key in arrays.files})


def _best_ratings(rating: np.ndarray, users: np.ndarray, items: np.ndarray,
                  num_items: int) -> np.ndarray:
    """float32 [P]: the best rating of each distinct (user row, item row) pair of the rows, in
    (user, item) order, which is the order of the seen matrix's sorted CSR entries."""
    keys = users.astype(np.int64) * num_items + items
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    return np.maximum.reduceat(np.asarray(rating, np.float32)[order], starts)
