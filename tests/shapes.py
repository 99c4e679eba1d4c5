"""MovieLens-100K re-expressed as the other dataset shapes Cascade must read (no other real data
set is reachable here): implicit clicks without a user file or card, renamed and reordered fields
with an extra free-text field, and a pre-split benchmark whose test holds new users and items."""

from __future__ import annotations

import pathlib

import numpy as np


def _read(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line]


def _write(path: pathlib.Path, header: list[str], rows) -> None:
    path.write_text("\n".join(["\t".join(header), *("\t".join(r) for r in rows)]) + "\n",
                    encoding="utf-8")


def implicit(source: pathlib.Path, out: pathlib.Path, rows: int) -> pathlib.Path:
    """`clicks.inter` (user_id, item_id, timestamp: no rating) and `clicks.item`; no user file, no
    card: every item field is a feature by its type."""
    out.mkdir(parents=True, exist_ok=True)
    _, inter = _read(source / "ml-100k.inter")
    _write(out / "clicks.inter", ["user_id:token", "item_id:token", "timestamp:float"],
           ([u, i, t] for u, i, _, t in inter[:rows]))
    (out / "clicks.item").write_bytes((source / "ml-100k.item").read_bytes())
    return out


CARD_RENAMED = """\
# A shop-like card: renamed fields, reordered columns, a free-text blurb.
fields: {user_id: member, item_id: sku, rating: stars, timestamp: when}
positive_threshold: 2
item_features:
  name: {kind: text, max_tokens: 8}
  blurb: {kind: text, max_tokens: 12}
  tags: categories
  launched: {kind: number, bins: 6}
user_features:
  job: category
text:
  title: name
  categories: tags
  year: launched
  item: "{name}[ ({launched})]: {blurb}"
  user: "works in {job}"
"""


def renamed(source: pathlib.Path, out: pathlib.Path, rows: int) -> pathlib.Path:
    """`shop.*`: fields renamed and reordered (card `shop.yaml`), a free-text `blurb` item field,
    ratings below 2 are not positives, the year as a float."""
    out.mkdir(parents=True, exist_ok=True)
    _, inter = _read(source / "ml-100k.inter")
    _write(out / "shop.inter", ["when:float", "stars:float", "member:token", "sku:token"],
           ([t, r, u, i] for u, i, r, t in inter[:rows]))
    _, items = _read(source / "ml-100k.item")
    _write(out / "shop.item", ["blurb:token_seq", "sku:token", "tags:token_seq", "name:token_seq",
                               "launched:float"],
           ([f"a {genres.split(' ')[0].lower()} pick with {len(title.split())} words in its name",
             item, genres, title, year if year.isdigit() else ""]
            for item, title, year, genres in items))
    _, users = _read(source / "ml-100k.user")
    _write(out / "shop.user", ["job:token", "member:token"], ([job, user] for user, _, _, job, _ in users))
    (out / "shop.yaml").write_text(CARD_RENAMED)
    return out


def presplit(source: pathlib.Path, out: pathlib.Path, rows: int, seed: int = 0) -> pathlib.Path:
    """`ps.train.inter` / `ps.test.inter`: a random 80/20 split of the first `rows` ratings in which
    8 users and 30 items occur only in test (all their rows moved there), plus item/user files and
    the MovieLens card."""
    out.mkdir(parents=True, exist_ok=True)
    header, inter = _read(source / "ml-100k.inter")
    inter = inter[:rows]
    rng = np.random.default_rng(seed)
    users = sorted({r[0] for r in inter})
    items = sorted({r[1] for r in inter})
    new_users = set(rng.choice(users, 8, replace=False))
    new_items = set(rng.choice(items, 30, replace=False))
    test_mask = rng.random(len(inter)) < 0.2
    train, test = [], []
    for row, is_test in zip(inter, test_mask):
        (test if is_test or row[0] in new_users or row[1] in new_items else train).append(row)
    _write(out / "ps.train.inter", header, train)
    _write(out / "ps.test.inter", header, test)
    for suffix in ("item", "user"):
        (out / f"ps.{suffix}").write_bytes((source / f"ml-100k.{suffix}").read_bytes())
    (out / "ps.yaml").write_text((source / "ml-100k.yaml").read_text().replace("name: ml-100k", "name: ps"))
    return out
