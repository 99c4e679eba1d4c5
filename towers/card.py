"""The dataset card: field roles, feature kinds and options, text templates (`docs/data.md`).

`<name>.yaml` or `<name>.json` beside the data, or a file given with `--card`; every key is
optional. `load_card` reads and checks it, naming the file and key of anything wrong; `render`
fills the text templates the language stages read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

from towers import protocols
from towers.files import DataError

# Feature kinds and the field types each may be declared on.
FEATURE_KINDS = {
    "category": ("token",),  # StringLookup -> embedding
    "categories": ("token_seq", "token"),  # StringLookup per token -> pooled embedding
    "text": ("token_seq", "token"),  # TextVectorization words -> mean-pooled embedding
    "number": ("float", "token"),  # Discretization -> embedding
    "numbers": ("float_seq",),  # Normalization -> dense inputs
}


DEFAULT_KIND = {"token": "category", "token_seq": "categories", "float": "number",
                "float_seq": "numbers"}


@dataclasses.dataclass(frozen=True)
class Feature:
    """A side feature of items or users: the file field, its kind and the options of that kind."""

    name: str
    kind: str  # one of FEATURE_KINDS
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Card:
    """What a dataset's files mean. Every field is optional; `from_dict` documents the keys."""

    name: str
    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str | None = "rating"  # absent from the file: implicit feedback
    timestamp: str | None = "timestamp"  # absent: no time-based protocol, file order is time
    positive_threshold: float | None = None  # explicit ratings: rows below it are not positives
    seq_separator: str = " "
    item_features: tuple[Feature, ...] | None = None  # None: every item field by its type
    user_features: tuple[Feature, ...] | None = None
    title: str | None = None  # item field holding the title; None: first of TITLE_FIELDS
    categories: str | None = None  # item field of category words (copy, cold-start baseline)
    year: str | None = None  # item field holding a date or year (copy claims, `label`)
    item_text: str | None = None  # template; None: the item's fields in file order
    user_text: str | None = None  # template; None: the user's fields in file order
    label: str | None = None  # short display name; None: title [(year)]
    rating_text: str | None = None  # how a rating reads before an item text; None: "rated {rating}: "
    values: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # display words
    split: str = "random"  # default protocol when the folder is not pre-split
    source: pathlib.Path | None = None  # the card file, None when defaulted
    declared: tuple[str, ...] = ()  # the roles the card's `fields` named: they must exist

    KEYS = ("name", "fields", "positive_threshold", "seq_separator", "item_features",
            "user_features", "text", "values", "split")

    @classmethod
    def from_dict(cls, record: dict, name: str, source: pathlib.Path | None = None) -> Card:
        """Keys: `fields` (`user_id`, `item_id`, `rating`, `timestamp`: the file field of each
        role, null to say the role is absent), `positive_threshold`, `seq_separator`,
        `item_features` / `user_features` (field: kind, or field: {kind: ..., options}),
        `text` (`title`, `categories`, `year`, `item`, `user`, `label`), `values` (field: {file
        value: display word}), `split` (the default protocol)."""
        where = source or "card"
        if not isinstance(record, dict):
            raise DataError(f"{where}: a card must be a mapping of keys, got {type(record).__name__}")
        unknown = sorted(set(record) - set(cls.KEYS))
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; a card may have "
                            f"{', '.join(cls.KEYS)}")
        fields = record.get("fields") or {}
        bad = sorted(set(fields) - {"user_id", "item_id", "rating", "timestamp"})
        if bad:
            raise DataError(f"{where}: fields: unknown role(s) {', '.join(bad)}; roles are "
                            "user_id, item_id, rating, timestamp")
        text = record.get("text") or {}
        bad = sorted(set(text) - {"title", "categories", "year", "item", "user", "label", "rating"})
        if bad:
            raise DataError(f"{where}: text: unknown key(s) {', '.join(bad)}; keys are title, "
                            "categories, year, item, user, label, rating")
        for key in ("fields", "text", "values"):
            if not isinstance(record.get(key) or {}, dict):
                raise DataError(f"{where}: {key} must be a mapping, got {record[key]!r}")
        for key, mapping in (record.get("values") or {}).items():
            if not isinstance(mapping, dict):
                raise DataError(f"{where}: values.{key} must map file values to display words, "
                                f"got {mapping!r}")
        if record.get("split", "random") not in protocols.PROTOCOLS:
            raise DataError(f"{where}: split: unknown protocol {record['split']!r}; expected one "
                            f"of {', '.join(protocols.PROTOCOLS)}")
        threshold = record.get("positive_threshold")
        return cls(
            name=str(record.get("name", name)),
            user_id=fields.get("user_id", "user_id"),
            item_id=fields.get("item_id", "item_id"),
            rating=fields.get("rating", "rating"),
            timestamp=fields.get("timestamp", "timestamp"),
            positive_threshold=None if threshold is None else float(threshold),
            seq_separator=record.get("seq_separator", " "),
            item_features=_features(record, "item_features", where),
            user_features=_features(record, "user_features", where),
            title=text.get("title"), categories=text.get("categories"), year=text.get("year"),
            item_text=text.get("item"), user_text=text.get("user"), label=text.get("label"),
            rating_text=text.get("rating"),
            values={k: {str(a): str(b) for a, b in v.items()} for k, v in
                    (record.get("values") or {}).items()},
            split=record.get("split", "random"),
            source=source,
            declared=tuple(k for k, v in fields.items() if v is not None),
        )


def _features(record: dict, key: str, where) -> tuple[Feature, ...] | None:
    if key not in record:
        return None
    entries = record[key] or {}
    if not isinstance(entries, dict):
        raise DataError(f"{where}: {key} must map field names to kinds, got {entries!r}")
    features = []
    for name, spec in entries.items():
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict) or "kind" not in spec:
            raise DataError(f"{where}: {key}.{name} must be a kind or a mapping with `kind`, got "
                            f"{spec!r}")
        if spec["kind"] not in FEATURE_KINDS:
            raise DataError(f"{where}: {key}.{name}: unknown kind {spec['kind']!r}; expected one of "
                            f"{', '.join(FEATURE_KINDS)}")
        features.append(Feature(str(name), spec["kind"], {k: v for k, v in spec.items() if k != "kind"}))
    return tuple(features)


def load_card(path: str | os.PathLike, name: str) -> Card:
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: card not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            record = json.loads(text)
        else:
            import yaml  # only when a YAML card is there

            record = yaml.safe_load(text)
    except (ValueError, ImportError) as error:
        raise DataError(f"{path}: cannot parse the card: {error}") from None
    except Exception as error:  # yaml.YAMLError carries the line and column
        raise DataError(f"{path}: cannot parse the card: {error}") from None
    return Card.from_dict(record or {}, name, source=path)


def render(template: str, values: dict[str, str]) -> str:
    """Fills `{field}` placeholders; a `[...]` part is kept only when each field in it is non-empty.

    `"{name}[ ({year})]; {genre}"` -> `Toy Story (1995); Animation Comedy`, `Heat; Action`."""
    def optional(match: re.Match) -> str:
        inner = match.group(1)
        names = re.findall(r"\{([^{}]+)\}", inner)
        return inner if all(values.get(n) for n in names) else ""

    text = re.sub(r"\[([^\[\]]*)\]", optional, template)
    return re.sub(r"\{([^{}]+)\}", lambda m: values.get(m.group(1), ""), text).strip()


def template_fields(template: str) -> list[str]:
    return re.findall(r"\{([^{}]+)\}", template)
