"""Feature tables for the two towers, built from the dataset's schema with Keras preprocessing
layers, and the users' training histories.

Each item/user feature the card declares (or every field of the item/user file, by its type) is
turned into integers or floats once, here, by the Keras layer of its kind: `StringLookup` for
tokens (`category`) and token sequences (`categories`), `TextVectorization` for free text (`text`),
`Discretization` for numbers (`number`), `Normalization` for float sequences (`numbers`). The
towers gather these tables by row inside the graph, so an exported tower needs nothing but
`user_id` or `item_id`, and every user and item in the files, with or without a training
interaction, has its row. Tables come from the files' features and the training split only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import scipy.sparse

from towers import data, files

PAD = ""  # item ID that pads exclusion lists; never a real ID
MAX_TOKENS = 16  # default tokens kept per `categories` / `text` value
NUMBER_BINS = 10  # default quantile bins of a `number` without `boundaries`
MAX_NUMBERS = 32  # default values kept per `numbers` value
STRIP_REGEX = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'  # TextVectorization's punctuation


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One tower input: `values` [N] int32 (category, number), [N, width] int32 (categories,
    text: 0 pads, 1 out of vocabulary) or [N, width] float32 (numbers); `size` is the number of
    distinct integers (embedding rows) or the float width."""

    side: str  # "user" or "item"
    name: str
    kind: str
    size: int
    width: int = 0  # tokens or floats per row; 0 for one integer

    @property
    def key(self) -> str:
        return f"{self.side}:{self.name}"


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Arrays indexed by the row of an ID in `user_ids` / `item_ids` (every ID in the files)."""

    user_ids: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [I]
    user_id_row: np.ndarray  # int32 [U], row in the user ID embedding, 0: no training interaction
    item_id_row: np.ndarray  # int32 [I], same for items
    history_items: np.ndarray  # int32 [N], item row + 1, each user's newest first, at most H each
    history_splits: np.ndarray  # int64 [U + 1], user u's are history_items[splits[u]:splits[u + 1]]
    seen_items: np.ndarray  # int32 [S], item rows each user has in train, user by user, ascending
    seen_splits: np.ndarray  # int64 [U + 1], user u's are seen_items[splits[u]:splits[u + 1]]
    item_count: np.ndarray  # int64 [I], training interactions per item
    recency_boundaries: np.ndarray  # float64 [B], quantiles of training-row age (empty: no time)
    user_recency: np.ndarray  # int32 [U], bucket of the age of the user's newest training row
    train_end: np.ndarray  # int64 [], the newest training timestamp (ages count back from it)
    specs: tuple[FeatureSpec, ...]
    values: dict[str, np.ndarray]  # spec.key -> its table
    vocabularies: dict[str, np.ndarray]  # spec.key -> str [V] (tokens and words; empty otherwise)

    @property
    def num_user_ids(self) -> int:
        return int(self.user_id_row.max(initial=0)) + 1

    @property
    def num_item_ids(self) -> int:
        return int(self.item_id_row.max(initial=0)) + 1

    def side(self, side: str) -> tuple[FeatureSpec, ...]:
        return tuple(s for s in self.specs if s.side == side)

    def seen_matrix(self) -> scipy.sparse.csr_matrix:
        """float32 CSR [U, I], 1 where the user has the item in training: its size is the number
        of distinct training pairs, not users x items."""
        return scipy.sparse.csr_matrix(
            (np.ones(len(self.seen_items), np.float32), self.seen_items, self.seen_splits),
            shape=(len(self.user_ids), len(self.item_ids)))

    def seen_of(self, row: int) -> np.ndarray:
        """str [S]: the item IDs user row `row` has in training, in ID order."""
        return self.item_ids[self.seen_items[self.seen_splits[row]:self.seen_splits[row + 1]]]

    def history_of(self, row: int) -> np.ndarray:
        """int32 [<= H]: user row `row`'s newest training items (item row + 1), newest first."""
        return self.history_items[self.history_splits[row]:self.history_splits[row + 1]]

    def history_ragged(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(values int32, splits int64 [U + 1]): each user's newest `length` history items."""
        counts = np.minimum(np.diff(self.history_splits), length)
        splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        offset = np.arange(splits[-1]) - np.repeat(splits[:-1], counts)
        return self.history_items[np.repeat(self.history_splits[:-1], counts) + offset], splits

    def seen_padded(self, rows: np.ndarray) -> np.ndarray:
        """str [len(rows), S]: the seen item IDs of user rows `rows`, PAD-padded to the longest
        (the exclusion lists TFRS's `query_with_exclusions` takes)."""
        lists = [self.seen_of(row) for row in rows]
        out = np.full((len(lists), max([1, *map(len, lists)])), PAD, dtype=object)
        for at, ids in enumerate(lists):
            out[at, :len(ids)] = ids
        return out.astype(str)

    def item_probability(self) -> np.ndarray:
        """Each item's share of training interactions: the in-batch sampling probability."""
        return (self.item_count / max(self.item_count.sum(), 1)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        path = pathlib.Path(path)
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        arrays["specs"] = np.array(json.dumps([dataclasses.asdict(s) for s in self.specs]))
        arrays.update({f"values/{k}": v for k, v in self.values.items()})
        arrays.update({f"vocabulary/{k}": v for k, v in self.vocabularies.items()})
        staging = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(staging, **arrays)
        files.write_atomic(path, staging.read_bytes())
        staging.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureTables:
        with np.load(path, allow_pickle=False) as arrays:
            specs = tuple(FeatureSpec(**s) for s in json.loads(str(arrays["specs"])))
            history = {}
            if "history" in arrays.files:  # written before histories were ragged: [U, H], 0 pads
                dense = arrays["history"]
                history = {"history_items": dense[dense > 0].astype(np.int32),
                           "history_splits": np.concatenate(
                               [[0], np.cumsum((dense > 0).sum(axis=1))]).astype(np.int64)}
            if "seen" in arrays.files:  # written before seen items were ragged: [U, S] IDs
                raise ValueError(f"{path}: written by an earlier Cascade (a dense [users, items] "
                                 "seen table); train the run again (cascade train retrieval)")
            return cls(**{name: history[name] if name in history else arrays[name]
                          for name in _ARRAYS}, specs=specs,
                       values={s.key: arrays[f"values/{s.key}"] for s in specs},
                       vocabularies={s.key: arrays[f"vocabulary/{s.key}"] for s in specs})


_ARRAYS = ("user_ids", "item_ids", "user_id_row", "item_id_row", "history_items",
           "history_splits", "seen_items",
           "seen_splits", "item_count", "recency_boundaries", "user_recency", "train_end")
RECENCY_BINS = 10


def build_tables(dataset: data.Dataset, train: data.Interactions,
                 history_length: int = 256) -> FeatureTables:
    """Builds the tables from the dataset's files and the training interactions."""
    user_ids, item_ids = dataset.user_ids(), dataset.item_ids()

    specs, values, vocabularies = [], {}, {}
    for side, table, ids, declared in (("user", dataset.users, user_ids, dataset.user_features()),
                                       ("item", dataset.items, item_ids, dataset.item_features())):
        rows = _rows_in(table, ids)
        for feature in declared:
            spec, array, vocabulary = build_feature(side, feature, table, rows, dataset.card)
            specs.append(spec)
            values[spec.key] = array
            vocabularies[spec.key] = vocabulary

    train_users = rows_of(user_ids, train.user_id, "user")
    train_items = rows_of(item_ids, train.item_id, "item")
    # Newest first, ties by item ID (item rows are in ID order), without a Python object per row.
    order = np.lexsort((train_items, -train.timestamp, train_users))
    counts = np.bincount(train_users, minlength=len(user_ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    sorted_items = train_items[order]
    kept = rank < history_length  # rows stay grouped by user, newest first
    history_items = (sorted_items[kept] + 1).astype(np.int32)
    history_splits = np.concatenate([[0], np.cumsum(np.minimum(counts, history_length))])
    # Seen items in ID order (item rows are in ID order); duplicates of a pair appear once.
    pairs = np.unique(train_users * len(item_ids) + train_items)
    seen_users, seen_items = pairs // len(item_ids), pairs % len(item_ids)
    seen_splits = np.concatenate([[0], np.cumsum(np.bincount(seen_users, minlength=len(user_ids)))])

    item_count = np.bincount(train_items, minlength=len(item_ids)).astype(np.int64)
    user_count = counts
    # Recency ("example age", Covington et al. 2016): how long before the end of training a row
    # happened. Training feeds each row's age; serving feeds the user's newest row's, and 0 ("now")
    # for a user without one, so a new user's query reflects the newest training period.
    train_end = int(train.timestamp.max()) if dataset.has_time and len(train) else 0
    boundaries = np.array([], np.float64)
    last = np.full(len(user_ids), train_end, np.int64)
    if dataset.has_time and len(train):
        ages = (train_end - train.timestamp).astype(np.float64)
        boundaries = np.unique(np.quantile(ages, np.linspace(0, 1, RECENCY_BINS + 1)[1:-1]))
        has_rows = counts > 0
        newest = np.full(len(user_ids), np.iinfo(np.int64).min)
        np.maximum.at(newest, train_users, train.timestamp)
        last = np.where(has_rows, newest, train_end)
    user_recency = np.searchsorted(boundaries, (train_end - last).astype(np.float64),
                                   side="right").astype(np.int32)
    return FeatureTables(
        user_ids=user_ids, item_ids=item_ids,
        user_id_row=_id_rows(user_count), item_id_row=_id_rows(item_count),
        history_items=history_items, history_splits=history_splits.astype(np.int64),
        seen_items=seen_items.astype(np.int32),
        seen_splits=seen_splits.astype(np.int64), item_count=item_count,
        recency_boundaries=boundaries, user_recency=user_recency,
        train_end=np.array(train_end, np.int64), specs=tuple(specs), values=values, vocabularies=vocabularies)


def rows_of(ids: np.ndarray, values: np.ndarray, side: str = "item") -> np.ndarray:
    """int64 [N]: the row of each of `values` in `ids` (str [U] or [I]), vectorized (no Python
    object per value); a value that is not in `ids` is an error naming it."""
    ids, values = np.asarray(ids).astype(str), np.asarray(values).astype(str)
    order = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids[order], values).clip(max=max(len(ids) - 1, 0))
    if len(values) and (not len(ids) or np.any(ids[order][at] != values)):
        missing = values[ids[order][at] != values][0] if len(ids) else values[0]
        raise KeyError(f"{side} {missing!r} is not in the tables' {len(ids):,} {side} IDs")
    return order[at].astype(np.int64)


def _id_rows(count: np.ndarray) -> np.ndarray:
    """Row + 1 in the ID embedding for IDs with training interactions, 0 (the cold row) otherwise."""
    trained = count > 0
    rows = np.zeros(len(count), np.int32)
    rows[trained] = np.arange(1, trained.sum() + 1)
    return rows


def _rows_in(table: data.Table | None, ids: np.ndarray) -> np.ndarray:
    """The row of each ID in the item/user file, -1 where the file has none."""
    if table is None:
        return np.full(len(ids), -1)
    row_of = table.row_of()
    return np.array([row_of.get(i, -1) for i in ids], np.int64)


def build_feature(side: str, feature: data.Feature, table: data.Table, rows: np.ndarray,
                  card: data.Card) -> tuple[FeatureSpec, np.ndarray, np.ndarray]:
    """(spec, table [N] or [N, width] for the IDs at `rows`, vocabulary) of one feature."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf  # the Keras preprocessing layers; imported here so that reading
    import tf_keras as keras  # tables (serving, batch) does not pay for building them

    column = table.columns[feature.name]
    kind, options = feature.kind, feature.options
    unknown_options = set(options) - _OPTIONS[kind]
    if unknown_options:
        raise data.DataError(f"{card.source or 'card'}: {side}_features.{feature.name}: unknown "
                             f"option(s) {', '.join(sorted(unknown_options))} for kind {kind}; "
                             f"it takes {', '.join(sorted(_OPTIONS[kind])) or 'none'}")
    present = rows >= 0
    if kind == "category":
        tokens = np.where(present, column[np.maximum(rows, 0)], "").astype(str)
        vocabulary = _vocabulary([t for t in column if t != ""], options.get("min_count", 1))
        layer = keras.layers.StringLookup(vocabulary=vocabulary, num_oov_indices=1,
                                          mask_token=None) if vocabulary else None
        ids = (layer(tokens).numpy().astype(np.int32) if layer is not None
               else np.zeros(len(rows), np.int32))
        ids[tokens == ""] = 0
        return FeatureSpec(side, feature.name, kind, len(vocabulary) + 1), ids, np.array(vocabulary, str)
    if kind in ("categories", "text"):
        sequences = [_tokens(value) for value in column]
        # A text value's length is its words (a `token` field holds a whole sentence).
        longest = max((len(" ".join(s).split()) if kind == "text" else len(s) for s in sequences),
                      default=1)
        width = max(1, min(int(options.get("max_tokens", MAX_TOKENS)), longest))
        if kind == "text":
            texts = tf.constant([" ".join(s) for s in sequences] + [""])  # last: the empty value
            words = tf.strings.split(tf.strings.regex_replace(tf.strings.lower(texts), STRIP_REGEX, ""))
            vocabulary = _vocabulary([w.decode() for row in words.to_list()[:-1] for w in set(row)],
                                     options.get("min_count", 2))
            layer = keras.layers.TextVectorization(
                vocabulary=vocabulary or ["[none]"], output_sequence_length=width,
                standardize="lower_and_strip_punctuation", split="whitespace")
            encoded = layer(texts).numpy().astype(np.int32)
        else:
            vocabulary = _vocabulary([t for s in sequences for t in set(s)], options.get("min_count", 1))
            layer = keras.layers.StringLookup(vocabulary=vocabulary or ["[none]"], mask_token="",
                                                 num_oov_indices=1)
            padded = np.full((len(sequences) + 1, width), "", dtype=object)
            for row, sequence in enumerate(sequences):
                padded[row, :min(width, len(sequence))] = sequence[:width]
            encoded = layer(tf.constant(padded.astype(str))).numpy().astype(np.int32)
        table_rows = np.where(present, rows, len(sequences))  # the last row is the empty value
        return (FeatureSpec(side, feature.name, kind, len(vocabulary) + 2, width),
                encoded[table_rows], np.array(vocabulary, str))
    if kind == "number":
        numbers = _as_numbers(column)
        finite = numbers[np.isfinite(numbers)]
        if "boundaries" in options:
            boundaries = [float(b) for b in options["boundaries"]]
        else:
            bins = int(options.get("bins", NUMBER_BINS))
            boundaries = sorted(set(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]).tolist())) \
                if len(finite) else []
        layer = keras.layers.Discretization(bin_boundaries=boundaries)
        values = np.where(present, numbers[np.maximum(rows, 0)], np.nan)
        buckets = layer(tf.constant(np.nan_to_num(values, nan=0.0), tf.float32)).numpy().astype(np.int32) + 1
        buckets[~np.isfinite(values)] = 0  # missing or not a number
        return FeatureSpec(side, feature.name, kind, len(boundaries) + 2), buckets, np.array([], str)
    # numbers: a fixed-width float vector, standardized per position
    width = int(options.get("max_values", MAX_NUMBERS))
    width = min(width, max(1, max((len(v) for v in column), default=1)))
    dense = np.zeros((len(column) + 1, width), np.float32)
    for row, value in enumerate(column):
        value = np.nan_to_num(np.asarray(value, np.float32)[:width])
        dense[row, :len(value)] = value
    layer = keras.layers.Normalization(axis=-1)
    layer.adapt(dense[:-1] if len(column) else dense)
    normalized = layer(dense).numpy().astype(np.float32)
    normalized[-1] = 0.0
    table_rows = np.where(present, rows, len(column))
    return FeatureSpec(side, feature.name, kind, width, width), normalized[table_rows], np.array([], str)


_OPTIONS = {"category": {"min_count"}, "categories": {"min_count", "max_tokens"},
            "text": {"min_count", "max_tokens"}, "number": {"boundaries", "bins"},
            "numbers": {"max_values"}}


def _tokens(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def _as_numbers(column: np.ndarray) -> np.ndarray:
    """A float column as is; a token column parsed, NaN where a value is not a number."""
    if column.dtype.kind == "f":
        return column.astype(np.float64)
    out = np.full(len(column), np.nan)
    for row, value in enumerate(column):
        try:
            out[row] = float(value)
        except ValueError:
            pass
    return out


def _vocabulary(tokens, min_count: int) -> list[str]:
    """Tokens seen at least `min_count` times, most frequent first, ties in string order."""
    counts: dict[str, int] = {}
    for token in tokens:
        counts[token] = counts.get(token, 0) + 1
    return sorted((t for t, c in counts.items() if c >= min_count and t != ""),
                  key=lambda t: (-counts[t], t))
