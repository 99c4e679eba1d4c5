"""Feature tables for the two towers: vocabularies, side features and training histories.

The towers take raw string IDs and look every feature up in these tables inside the graph, so
an exported tower needs nothing but `user_id` or `item_id`. Tables are built from the catalog and
the training split only (never from test data) and saved in the run directory.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import numpy as np

from towers import data

AGE_BOUNDARIES = (18, 25, 35, 45, 50, 56)  # the MovieLens-1M age groups
YEAR_BUCKET = 5  # years per release-year bucket
FIRST_YEAR = 1920
TITLE_TOKENS = 8  # title words kept per item (99% of titles have fewer)
PAD = ""  # item ID that pads exclusion lists; never a real ID


@dataclasses.dataclass(frozen=True)
class FeatureTables:
    """Every array is indexed by the row of an ID in `user_ids` / `item_ids`."""

    user_ids: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [I]
    user_age: np.ndarray  # int32 [U], age bucket
    user_gender: np.ndarray  # int32 [U]
    user_occupation: np.ndarray  # int32 [U]
    occupations: np.ndarray  # str [O]
    history: np.ndarray  # int32 [U, H], item row + 1, newest first, 0 pads
    seen: np.ndarray  # str [U, S], item IDs the user has in train, PAD pads
    item_genres: np.ndarray  # float32 [I, G] multi-hot
    item_year: np.ndarray  # int32 [I], 0 unknown, else 1 + year bucket
    item_title: np.ndarray  # int32 [I, T], title word IDs (0 pads, 1 out of vocabulary)
    title_vocabulary: np.ndarray  # str [W]
    item_count: np.ndarray  # int64 [I], training interactions per item

    @property
    def num_year_buckets(self) -> int:
        return int(self.item_year.max()) + 1

    def item_probability(self) -> np.ndarray:
        """Each item's share of training interactions: the in-batch sampling probability."""
        return (self.item_count / self.item_count.sum()).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        from towers import fetch  # atomic write helper

        path = pathlib.Path(path)
        staging = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(staging, **{f.name: getattr(self, f.name)
                                        for f in dataclasses.fields(self)})
        fetch.write_atomic(path, staging.read_bytes())
        staging.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureTables:
        with np.load(path, allow_pickle=False) as arrays:
            return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})


def build_tables(movielens: data.MovieLens, train: data.Ratings, history_length: int = 256,
                 title_min_count: int = 2) -> FeatureTables:
    """Builds the tables from the catalog and the training interactions."""
    user_ids = np.array(sorted(movielens.users, key=_id_key), dtype=str)
    item_ids = np.array(sorted(movielens.items, key=_id_key), dtype=str)
    item_row = {item: row for row, item in enumerate(item_ids)}
    users = [movielens.users[u] for u in user_ids]
    items = [movielens.items[i] for i in item_ids]

    occupations = np.array(sorted({u.occupation for u in users}), dtype=str)
    occupation_row = {o: row for row, o in enumerate(occupations)}

    words = [_title_words(item.title) for item in items]
    counts: dict[str, int] = {}
    for title in words:
        for word in set(title):
            counts[word] = counts.get(word, 0) + 1
    vocabulary = sorted(w for w, c in counts.items() if c >= title_min_count)
    word_id = {w: index + 2 for index, w in enumerate(vocabulary)}
    item_title = np.zeros((len(items), TITLE_TOKENS), np.int32)
    for row, title in enumerate(words):
        ids = [word_id.get(w, 1) for w in title[:TITLE_TOKENS]]
        item_title[row, :len(ids)] = ids

    per_user: dict[str, list[tuple[int, str]]] = {u: [] for u in user_ids}
    for user, item, timestamp in zip(train.user_id, train.item_id, train.timestamp):
        per_user[user].append((int(timestamp), item))
    newest_first = {u: [item for _, item in sorted(events, reverse=True)]
                    for u, events in per_user.items()}
    history = np.zeros((len(users), history_length), np.int32)
    widest = max(1, max(len(v) for v in newest_first.values()))
    seen = np.full((len(users), widest), PAD, dtype=object)
    for row, user in enumerate(user_ids):
        events = newest_first[user]
        kept = [item_row[i] + 1 for i in events[:history_length]]
        history[row, :len(kept)] = kept
        seen[row, :len(events)] = sorted(events, key=_id_key)

    item_count = np.zeros(len(items), np.int64)
    np.add.at(item_count, [item_row[i] for i in train.item_id], 1)

    return FeatureTables(
        user_ids=user_ids,
        item_ids=item_ids,
        user_age=np.searchsorted(AGE_BOUNDARIES, [u.age for u in users], side="right").astype(np.int32),
        user_gender=np.array([1 if u.gender == "F" else 0 for u in users], np.int32),
        user_occupation=np.array([occupation_row[u.occupation] for u in users], np.int32),
        occupations=occupations,
        history=history,
        seen=seen.astype(str),
        item_genres=np.array([[g in item.genres for g in data.GENRES] for item in items], np.float32),
        item_year=np.array([_year_bucket(item.year) for item in items], np.int32),
        item_title=item_title,
        title_vocabulary=np.array(vocabulary, dtype=str),
        item_count=item_count,
    )


def _year_bucket(year: str) -> int:
    if year == data.UNKNOWN_YEAR:
        return 0
    return 1 + max(0, int(year) - FIRST_YEAR) // YEAR_BUCKET


def _title_words(title: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", title.lower())


def _id_key(identifier: str) -> tuple[int, str]:
    """Numeric IDs in numeric order, anything else after them in string order."""
    return (int(identifier), "") if identifier.isdigit() else (1 << 62, identifier)
