"""Any dataset in RecBole's atomic format: the files, the dataset card, and the data model.

A dataset is a folder holding `<name>.inter` (required), `<name>.item` and `<name>.user`
(optional), tab-separated with a `field:type` header (types `token`, `token_seq`, `float`,
`float_seq`, any column order), or the pre-split `<name>.train.inter` / `<name>.test.inter`
(optional `<name>.valid.inter`). Interactions may come as Parquet instead, under the same names
with `.parquet` appended (`<name>.inter.parquet`, `<name>.train.inter.parquet`...), the same field
names, types from the Parquet schema. An optional card, `<name>.yaml` or `<name>.json`, renames fields,
declares which item/user fields are features and of what kind, the positive threshold of explicit
ratings, and the text templates the language stages read (`docs/data.md`). Every stage reads the
dataset through `Dataset`, so no stage names one dataset's fields.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re

import numpy as np

from towers import protocols
from towers.card import (DEFAULT_KIND, FEATURE_KINDS, Card, Feature,  # noqa: F401 (data.Feature)
                         load_card, render, template_fields)
from towers.files import (AtomicFile, DataError, Field, id_key,  # noqa: F401 (data.DataError)
                          parse_number, read_atomic, read_parquet)

TITLE_FIELDS = ("title", "movie_title", "name")
UNKNOWN_YEAR = "unknown"
SPLIT_SUFFIXES = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# The data model


@dataclasses.dataclass(frozen=True)
class Interactions:
    """Interaction events as parallel arrays, in file order. Implicit feedback has rating 1;
    without a timestamp field, `timestamp` is the row's position in the files."""

    user_id: np.ndarray  # str [N]
    item_id: np.ndarray  # str [N]
    rating: np.ndarray  # float32 [N]
    timestamp: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.user_id)

    def take(self, indices: np.ndarray) -> Interactions:
        """The rows at `indices`, in that order."""
        return Interactions(self.user_id[indices], self.item_id[indices], self.rating[indices],
                            self.timestamp[indices])

    @staticmethod
    def concat(parts: list[Interactions]) -> Interactions:
        return Interactions(*(np.concatenate([getattr(p, f.name) for p in parts])
                              for f in dataclasses.fields(Interactions)))


@dataclasses.dataclass(frozen=True)
class Table:
    """An item or user file: IDs in file order and each non-ID field's column (see AtomicFile)."""

    ids: np.ndarray  # str [N]
    fields: tuple[Field, ...]  # the non-ID fields, in file order
    columns: dict[str, np.ndarray]
    path: pathlib.Path

    def row_of(self) -> dict[str, int]:
        return {identifier: row for row, identifier in enumerate(self.ids)}

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclasses.dataclass(frozen=True)
class Split:
    train: Interactions
    test: Interactions
    protocol: str  # random | temporal | user-temporal | cold-items | pre-split
    valid: int = 0  # the last `valid` training rows came from `<name>.valid.inter`
    train_index: np.ndarray | None = None  # rows of `Dataset.interactions` (None: pre-split)
    test_index: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ItemFacts:
    """What the language stages may say of an item: title, year (4 digits or UNKNOWN_YEAR) and
    category words, from the card's `text.title`, `text.year` and `text.categories`."""

    item_id: str
    title: str
    year: str
    categories: tuple[str, ...]

    def label(self) -> str:
        return self.title if self.year == UNKNOWN_YEAR else f"{self.title} ({self.year})"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    path: pathlib.Path
    card: Card
    interactions: Interactions  # every row; pre-split: train, valid, then test rows
    items: Table | None
    users: Table | None
    presplit: Split | None
    implicit: bool  # no rating field: every row a positive
    has_time: bool
    lines: np.ndarray | None = None  # int64 [N], the `.inter` file line of each row (not pre-split)

    # -- IDs ---------------------------------------------------------------------------------

    def item_ids(self) -> np.ndarray:
        """str [I]: every item in the files (item file and interactions), in ID order."""
        known = set(self.interactions.item_id)
        if self.items is not None:
            known.update(self.items.ids)
        return np.array(sorted(known, key=id_key), dtype=str)

    def user_ids(self) -> np.ndarray:
        """str [U]: every user in the files, in ID order."""
        known = set(self.interactions.user_id)
        if self.users is not None:
            known.update(self.users.ids)
        return np.array(sorted(known, key=id_key), dtype=str)

    # -- Features ----------------------------------------------------------------------------

    def item_features(self) -> tuple[Feature, ...]:
        return _resolved_features(self.card.item_features, self.items, "item_features", self.card)

    def user_features(self) -> tuple[Feature, ...]:
        return _resolved_features(self.card.user_features, self.users, "user_features", self.card)

    # -- Text --------------------------------------------------------------------------------

    def title_field(self) -> str | None:
        if self.items is None:
            return None
        if self.card.title:
            return self.card.title
        names = [f.name for f in self.items.fields]
        return next((n for n in TITLE_FIELDS if n in names), None)

    def item_texts(self, item_ids) -> list[str]:
        """The item text of each ID: the card's `text.item` template, else every field in file
        order; an item without a row in the item file is its ID."""
        return self._texts(self.items, self.card.item_text, item_ids, "item")

    def user_texts(self, user_ids) -> list[str]:
        """The user text of each ID (`text.user`, else every field); "" without a user file."""
        return self._texts(self.users, self.card.user_text, user_ids, "user")

    def facts(self, item_ids) -> list[ItemFacts]:
        """Title, year and categories of each ID (title = the ID when there is no title field)."""
        rows = self._rows(self.items, item_ids)
        title, year, categories = self.title_field(), self.card.year, self.card.categories
        out = []
        for item_id, row in zip(item_ids, rows):
            values = self._values(self.items, row)
            name = values.get(title, "") if title else ""
            date = values.get(year, "") if year else ""
            match = re.search(r"(1[89]\d\d|20\d\d)", date)
            cats = self.items.columns[categories][row] if categories and row >= 0 else ()
            if isinstance(cats, str):  # a token field: one category, none when empty
                cats = (cats,) if cats else ()
            out.append(ItemFacts(str(item_id), name or str(item_id),
                                 match.group(1) if match else UNKNOWN_YEAR, tuple(cats)))
        return out

    def labels(self, item_ids) -> list[str]:
        """Short display names: the card's `text.label` template, else `title (year)`."""
        if self.card.label:
            return self._texts(self.items, self.card.label, item_ids, "item")
        return [f.label() for f in self.facts(item_ids)]

    def _texts(self, table: Table | None, template: str | None, ids, side: str) -> list[str]:
        if table is None:
            return [str(i) if side == "item" else "" for i in ids]
        rows = self._rows(table, ids)
        texts = []
        for identifier, row in zip(ids, rows):
            if row < 0:
                texts.append(str(identifier) if side == "item" else "")
                continue
            values = self._values(table, row)
            if template:
                texts.append(render(template, values))
            else:
                texts.append("; ".join(v for v in values.values() if v))
        return texts

    def _rows(self, table: Table | None, ids) -> list[int]:
        if table is None:
            return [-1] * len(ids)
        cache = "_item_rows" if table is self.items else "_user_rows"
        row_of = self.__dict__.get(cache)
        if row_of is None:
            row_of = table.row_of()
            object.__setattr__(self, cache, row_of)
        return [row_of.get(str(i), -1) for i in ids]

    def _values(self, table: Table, row: int) -> dict[str, str]:
        """Each field of one row as display text (sequences joined by spaces, `values` mapped)."""
        if row < 0:
            return {}
        out = {}
        for f in table.fields:
            value = table.columns[f.name][row]
            mapping = self.card.values.get(f.name, {})
            if f.type == "token":
                text = mapping.get(value, value)
            elif f.type == "token_seq":
                text = " ".join(mapping.get(v, v) for v in value)
            elif f.type == "float":
                text = "" if math.isnan(value) else f"{value:g}"
            else:
                text = " ".join(f"{v:g}" for v in value)
            out[f.name] = text
        return out

    # -- Splits ------------------------------------------------------------------------------

    def split(self, protocol: str | None = None, test_share: float = 0.2, seed: int = 42) -> Split:
        """The pre-split files when the folder has them, else `protocol` (default: the card's)."""
        if self.presplit is not None:
            if protocol not in (None, "pre-split"):
                raise DataError(f"{self.path}: the folder is pre-split ({self.name}.train.inter, "
                                f"{self.name}.test.inter); --split {protocol} would re-split it. "
                                "Leave out --split to use the files as given")
            return self.presplit
        protocol = protocol or self.card.split
        if protocol in ("temporal", "user-temporal") and not self.has_time:
            raise DataError(f"{self.path}: --split {protocol} needs a timestamp field; "
                            f"{self.name}.inter has none (a card's fields.timestamp can name it)")
        train, test = protocols.split_rows(self.interactions, protocol, test_share, seed)
        return Split(self.interactions.take(train), self.interactions.take(test), protocol,
                     train_index=train, test_index=test)


def _resolved_features(declared, table: Table | None, key: str, card: Card) -> tuple[Feature, ...]:
    if table is None:
        return ()
    if declared is not None:
        return declared
    return tuple(Feature(f.name, DEFAULT_KIND[f.type]) for f in table.fields)


# ---------------------------------------------------------------------------------------------
# Loading


def dataset_name(path: pathlib.Path) -> str:
    """The `<name>` of the folder's `<name>.inter` (or `<name>.train.inter`)."""
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; --data takes a folder of RecBole atomic files")
    names = {p.name[:-len(".inter")] for p in path.glob("*.inter")} | {
        p.name[:-len(".inter.parquet")] for p in path.glob("*.inter.parquet")}
    plain = {n for n in names if not n.endswith(tuple(f".{s}" for s in SPLIT_SUFFIXES))}
    split = {n.rsplit(".", 1)[0] for n in names if n.endswith(".train")}
    found = sorted(plain | split)
    if len(found) != 1:
        what = "no `<name>.inter` or `<name>.train.inter`" if not found else \
            f"several datasets ({', '.join(found)})"
        raise DataError(f"{path}: expected one RecBole dataset, found {what}; see docs/data.md "
                        "(`cascade data fetch movielens-100k` makes one)")
    return found[0]


def find_card(path: pathlib.Path, name: str, card: str | os.PathLike | Card | None = None) -> Card:
    """The card a folder is read with: `card` (a file, or a Card), else the folder's own
    `<name>.yaml/.yml/.json`, else the defaults."""
    if isinstance(card, Card):
        return card
    if card is not None:
        return load_card(card, name)
    found = [path / f"{name}{s}" for s in (".yaml", ".yml", ".json") if (path / f"{name}{s}").exists()]
    return load_card(found[0], name) if found else Card(name=name)


def load(path: str | os.PathLike, card: str | os.PathLike | Card | None = None) -> Dataset:
    """Loads a dataset folder; `card` overrides the folder's own `<name>.yaml`/`.json`."""
    path = pathlib.Path(path)
    name = dataset_name(path)
    card = find_card(path, name, card)
    items = _side_table(path / f"{name}.item", card.item_id, card, "item")
    users = _side_table(path / f"{name}.user", card.user_id, card, "user")
    _check_card(card, items, users, path, name)

    split_files = {s: _inter_file(path, f"{name}.{s}") for s in SPLIT_SUFFIXES}
    if split_files["train"].exists():
        if not split_files["test"].exists():
            raise DataError(f"{split_files['test']}: file not found; a pre-split dataset needs "
                            f"{name}.train.inter and {name}.test.inter")
        parts = {s: _interactions(f, card)[:3] for s, f in split_files.items() if f.exists()}
        implicit, has_time = parts["train"][1], parts["train"][2]
        for s, (_, other_implicit, other_time) in parts.items():
            if (other_implicit, other_time) != (implicit, has_time):
                raise DataError(f"{split_files[s]}: its header differs from "
                                f"{split_files['train'].name}'s; the split files must share fields")
        if not has_time:  # file order is time: positions run on through train, valid, test
            offset = 0
            for s in ("train", "valid", "test"):
                if s in parts:
                    rows = parts[s][0]
                    parts[s] = (dataclasses.replace(rows, timestamp=rows.timestamp + offset),
                                *parts[s][1:])
                    offset += len(rows)
        train = parts["train"][0]
        valid = parts["valid"][0] if "valid" in parts else None
        if valid is not None:  # validation rows come last in train: --holdout takes them
            train = Interactions.concat([train, valid])
        test = parts["test"][0]
        presplit = Split(train, test, "pre-split", len(valid) if valid is not None else 0)
        interactions, lines = Interactions.concat([train, test]), None
    else:
        interactions, implicit, has_time, lines = _interactions(_inter_file(path, name), card)
        presplit = None
    if not len(interactions):
        raise DataError(f"{path}: no interactions")
    return Dataset(name, path, card, interactions, items, users, presplit, implicit, has_time, lines)


def _inter_file(path: pathlib.Path, stem: str) -> pathlib.Path:
    """`<stem>.inter`, or `<stem>.inter.parquet` when that is the one there (never both)."""
    text, parquet = path / f"{stem}.inter", path / f"{stem}.inter.parquet"
    if text.exists() and parquet.exists():
        raise DataError(f"{path}: both {text.name} and {parquet.name}; keep one of them")
    return parquet if parquet.exists() else text


def _interactions(file: pathlib.Path, card: Card) -> tuple[Interactions, bool, bool, np.ndarray]:
    atomic = (read_parquet(file) if file.name.endswith(".parquet")
              else read_atomic(file, card.seq_separator))
    names = [f.name for f in atomic.fields]
    for role in ("user_id", "item_id"):
        field = getattr(card, role)
        if field not in atomic.columns:
            raise DataError(f"{file}:1: no {role} field {field!r}; the file has {', '.join(names)}"
                            + ("" if card.source else f" (a card, {card.name}.yaml, can rename it)"))
        if atomic.field(field).type != "token":
            raise DataError(f"{file}:1: field {field!r} ({role}) must be token, is "
                            f"{atomic.field(field).type}")
    for role in ("rating", "timestamp"):
        if role in card.declared and getattr(card, role) not in atomic.columns:
            raise DataError(f"{file}:1: the card names {role} field {getattr(card, role)!r}, "
                            f"which the file does not have; its fields are {', '.join(names)}")
    implicit = card.rating is None or card.rating not in atomic.columns
    has_time = card.timestamp is not None and card.timestamp in atomic.columns
    n = len(atomic)
    rating = np.ones(n, np.float32)
    if not implicit:
        rating = _required_floats(atomic, card.rating, np.float32)
    timestamp = np.arange(n, dtype=np.int64)
    if has_time:
        timestamp = _required_floats(atomic, card.timestamp, np.float64).astype(np.int64)
    keep = slice(None)
    if card.positive_threshold is not None and not implicit:
        keep = rating >= card.positive_threshold
    users = atomic.columns[card.user_id]
    items = atomic.columns[card.item_id]
    for column, role in ((users, card.user_id), (items, card.item_id)):
        empty = np.flatnonzero(column == "")
        if len(empty):
            raise DataError(f"{file}:{atomic.lines[empty[0]]}: field {role!r} is empty")
    return (Interactions(users[keep].astype(str), items[keep].astype(str), rating[keep],
                         timestamp[keep]), implicit, has_time, atomic.lines[keep])


def _required_floats(atomic: AtomicFile, name: str, dtype: type) -> np.ndarray:
    field = atomic.field(name)
    column = atomic.columns[name]
    if field.type == "token":
        try:  # one conversion of the whole column; row by row only to name a bad value
            column = column.astype(np.float64)
        except ValueError:
            out = np.empty(len(column), np.float64)
            for row, value in enumerate(column):
                out[row] = parse_number(value, atomic.path, atomic.lines[row], Field(name, "float"))
            column = out
    elif field.type != "float":
        raise DataError(f"{atomic.path}:1: field {name!r} must be float, is {field.type}")
    missing = np.flatnonzero(np.isnan(column))
    if len(missing):
        raise DataError(f"{atomic.path}:{atomic.lines[missing[0]]}: field {name!r} is empty; "
                        "expected a number")
    return column.astype(dtype)  # timestamps stay float64: float32 rounds Unix seconds


def _side_table(file: pathlib.Path, key: str, card: Card, side: str) -> Table | None:
    if not file.exists():
        return None
    atomic = read_atomic(file, card.seq_separator)
    if key not in atomic.columns:
        raise DataError(f"{file}:1: no {side} ID field {key!r}; the file has "
                        f"{', '.join(f.name for f in atomic.fields)}")
    ids = atomic.columns[key].astype(str)
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][0]
        lines = atomic.lines[ids == repeated]
        raise DataError(f"{file}:{lines[1]}: {side} {str(repeated)!r} repeats line {lines[0]}")
    fields = tuple(f for f in atomic.fields if f.name != key)
    return Table(ids, fields, {f.name: atomic.columns[f.name] for f in fields}, file)


def _check_card(card: Card, items: Table | None, users: Table | None, path: pathlib.Path,
                name: str) -> None:
    where = card.source or path
    for side, table, declared in (("item", items, card.item_features), ("user", users, card.user_features)):
        if not declared:
            continue
        if table is None:
            raise DataError(f"{where}: {side}_features are declared but {path / f'{name}.{side}'} "
                            "does not exist")
        for feature in declared:
            field = table.field(feature.name)
            if field is None:
                raise DataError(f"{where}: {side}_features names field {feature.name!r}, which "
                                f"{table.path.name} does not have; its fields are "
                                f"{', '.join(f.name for f in table.fields)}")
            if field.type not in FEATURE_KINDS[feature.kind]:
                raise DataError(f"{where}: {side}_features.{feature.name}: kind {feature.kind!r} "
                                f"needs a field of type {' or '.join(FEATURE_KINDS[feature.kind])}, "
                                f"{feature.name} is {field.type}")
    for key in ("title", "categories", "year"):
        value = getattr(card, key)
        if value and (items is None or items.field(value) is None):
            raise DataError(f"{where}: text.{key} names item field {value!r}, which does not "
                            f"exist; item fields: {_names(items)}")
    for key, table, template in (("item", items, card.item_text), ("label", items, card.label),
                                 ("user", users, card.user_text)):
        if not template:
            continue
        missing = [f for f in template_fields(template) if table is None or table.field(f) is None]
        if missing:
            raise DataError(f"{where}: text.{key} template names {', '.join(map(repr, missing))}, "
                            f"not a field of the {('user' if key == 'user' else 'item')} file; "
                            f"fields: {_names(table)}")


def _names(table: Table | None) -> str:
    return "(no file)" if table is None else ", ".join(f.name for f in table.fields)
