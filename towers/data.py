"""MovieLens-100K: loaders for the GroupLens and RecBole files, the data model, the benchmark split.

Both file formats load into the same `MovieLens` record (ratings in file order, item and user
tables). Item text (title, year, genres) and user text (age, gender, occupation) live here so
every later stage reads them from one place.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import numpy as np

# Genre columns of GroupLens `u.item`, in file order.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
UNKNOWN_YEAR = "unknown"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the line and what was expected."""


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    year: str  # four digits, or UNKNOWN_YEAR
    genres: tuple[str, ...]

    def label(self) -> str:
        """Title and year, e.g. `Toy Story (1995)`."""
        return self.title if self.year == UNKNOWN_YEAR else f"{self.title} ({self.year})"

    def text(self) -> str:
        """The item as one line of text, e.g. `Toy Story (1995); Animation, Children's, Comedy`."""
        return f"{self.label()}; {', '.join(self.genres)}"


@dataclasses.dataclass(frozen=True)
class User:
    user_id: str
    age: int
    gender: str  # "M" or "F"
    occupation: str
    zip_code: str

    def text(self) -> str:
        """The user's demographics as text, e.g. `24-year-old man, technician`."""
        person = {"M": "man", "F": "woman"}.get(self.gender, "person")
        return f"{self.age}-year-old {person}, {self.occupation}"


@dataclasses.dataclass(frozen=True)
class Ratings:
    """Rating events as parallel arrays, in file order."""

    user_id: np.ndarray  # str [N]
    item_id: np.ndarray  # str [N]
    rating: np.ndarray  # float32 [N]
    timestamp: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, indices: np.ndarray) -> Ratings:
        """The rows at `indices`, in that order."""
        return Ratings(self.user_id[indices], self.item_id[indices], self.rating[indices],
                       self.timestamp[indices])


@dataclasses.dataclass(frozen=True)
class MovieLens:
    ratings: Ratings
    items: dict[str, Item]
    users: dict[str, User]


@dataclasses.dataclass(frozen=True)
class Split:
    train: Ratings
    test: Ratings


def load_movielens(path: str | os.PathLike) -> MovieLens:
    """Loads a directory holding either GroupLens (`u.data`, ...) or RecBole (`ml-100k.inter`, ...) files."""
    path = pathlib.Path(path)
    if (path / "u.data").exists():
        return load_grouplens(path)
    if (path / "ml-100k.inter").exists():
        return load_recbole(path)
    raise DataError(f"{path}: expected GroupLens files (u.data, u.item, u.user) or RecBole files "
                    "(ml-100k.inter, .item, .user); run `cascade data fetch movielens-100k` first")


def load_grouplens(path: str | os.PathLike) -> MovieLens:
    """Loads GroupLens `u.data` (tab-separated), `u.item` and `u.user` (`|`-separated, Latin-1)."""
    path = pathlib.Path(path)
    items = {}
    for where, f in _rows(path / "u.item", "|", 5 + len(GENRES), encoding="latin-1"):
        flags = f[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(f"{where}: genre flags must be 0 or 1, got {'|'.join(flags)}")
        title, year = _split_year(f[1], f[2])
        items[f[0]] = Item(f[0], title, year, tuple(g for g, flag in zip(GENRES, flags) if flag == "1"))
    users = {}
    for where, f in _rows(path / "u.user", "|", 5):
        users[f[0]] = User(f[0], _int(f[1], where, "age"), f[2], f[3], f[4])
    ratings = _ratings(_rows(path / "u.data", "\t", 4), items, users)
    return MovieLens(ratings, items, users)


def load_recbole(path: str | os.PathLike) -> MovieLens:
    """Loads RecBole's atomic files `ml-100k.inter`, `.item`, `.user` (tab-separated, one header line)."""
    path = pathlib.Path(path)
    items = {}
    for where, f in _rows(path / "ml-100k.item", "\t", 4, header=True):
        # RecBole spells item 267's unknown title and year "unkonwn"; GroupLens has "unknown".
        title, year = ("unknown", "") if f[1] == "unkonwn" else (f[1], f[2])
        if not re.fullmatch(r"\d{4}", year):  # item 1412 keeps its year in the title, "V" here
            title, year = _split_year(title, "")
        genres = tuple(f[3].split(" ")) if f[3] else ()
        bad = [g for g in genres if g not in GENRES]
        if bad:
            raise DataError(f"{where}: unknown genre {bad[0]!r}; expected one of {', '.join(GENRES)}")
        items[f[0]] = Item(f[0], title, year, genres)
    users = {}
    for where, f in _rows(path / "ml-100k.user", "\t", 5, header=True):
        users[f[0]] = User(f[0], _int(f[1], where, "age"), f[2], f[3], f[4])
    ratings = _ratings(_rows(path / "ml-100k.inter", "\t", 4, header=True), items, users)
    return MovieLens(ratings, items, users)


def benchmark_split(ratings: Ratings, seed: int = 42, train_size: int = 80_000) -> Split:
    """The TFRS-tutorial split of DESIGN.md: a seeded `tf.data` shuffle of the rows, first 80,000 train.

    `Dataset.shuffle` permutes positions independently of the element values, so shuffling the row
    indices gives exactly the order that shuffling the rows would. The shuffle runs in a fresh graph:
    its seed pair also depends on TensorFlow's global seed, and the protocol is defined with none
    set, so a `tf.random.set_seed` elsewhere in the process (Keras training does one) must not move
    the split.
    """
    import tensorflow as tf  # imported here so that loading data does not pay for TensorFlow

    if len(ratings) <= train_size:
        raise DataError(f"benchmark split needs more than {train_size} ratings, got {len(ratings)}")
    with tf.Graph().as_default():
        shuffled = tf.data.Dataset.range(len(ratings)).shuffle(
            100_000, seed=seed, reshuffle_each_iteration=False)
        everything = shuffled.batch(len(ratings)).get_single_element()
        with tf.compat.v1.Session() as session:
            order = session.run(everything)
    return Split(ratings.take(order[:train_size]), ratings.take(order[train_size:]))


def _rows(file: pathlib.Path, sep: str, fields: int, header: bool = False,
          encoding: str = "utf-8"):
    """Yields ("file:line", fields) for each non-empty line, checking the field count."""
    if not file.exists():
        raise DataError(f"{file}: file not found")
    with open(file, encoding=encoding, newline="") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if (header and number == 1) or not line:
                continue
            parts = line.split(sep)
            if len(parts) != fields:
                raise DataError(f"{file}:{number}: expected {fields} fields separated by {sep!r}, "
                                f"got {len(parts)}: {line[:80]!r}")
            yield f"{file}:{number}", parts


def _ratings(rows, items: dict[str, Item], users: dict[str, User]) -> Ratings:
    user_ids, item_ids, values, times = [], [], [], []
    for where, (user, item, rating, timestamp) in rows:
        if user not in users:
            raise DataError(f"{where}: user_id {user!r} is not in the user table")
        if item not in items:
            raise DataError(f"{where}: item_id {item!r} is not in the item table")
        value = _float(rating, where, "rating")
        if not 0.0 <= value <= 5.0:
            raise DataError(f"{where}: rating must be between 0 and 5, got {rating!r}")
        user_ids.append(user)
        item_ids.append(item)
        values.append(value)
        times.append(_int(timestamp, where, "timestamp"))
    if not user_ids:
        raise DataError("no ratings found")
    return Ratings(np.array(user_ids, dtype=object), np.array(item_ids, dtype=object),
                   np.array(values, dtype=np.float32), np.array(times, dtype=np.int64))


def _split_year(title: str, release_date: str) -> tuple[str, str]:
    """GroupLens keeps the year in the title, `Toy Story (1995)`; RecBole splits it off."""
    match = re.fullmatch(r"(.*\S)\s+\((\d{4})\)(?:\s+\(V\))?", title.strip())  # (V): video release
    if match:
        return match.group(1), match.group(2)
    date_year = re.search(r"(\d{4})$", release_date)
    return title.strip(), date_year.group(1) if date_year else UNKNOWN_YEAR


def _int(text: str, where: str, field: str) -> int:
    try:
        return int(float(text)) if "." in text else int(text)
    except ValueError:
        raise DataError(f"{where}: field {field!r} must be an integer, got {text!r}") from None


def _float(text: str, where: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{where}: field {field!r} must be a number, got {text!r}") from None
