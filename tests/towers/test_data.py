"""The loader of RecBole atomic files: field types, cards, texts, pre-split folders, bad input,
and MovieLens-100K through it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from towers import data, metrics, peers


def _write(folder, name="d", **files):
    """Writes `<name>.<suffix>` for each keyword (suffix `train_inter` -> `train.inter`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in files.items():
        (folder / f"{name}.{suffix.replace('_', '.')}").write_text(text)
    return folder


def _rows(interactions: data.Interactions) -> list[tuple]:
    return list(zip(interactions.user_id, interactions.item_id, interactions.rating.tolist(),
                    interactions.timestamp.tolist()))


# ---------------------------------------------------------------------------------------------
# Files and cards


def test_every_field_type_in_any_column_order(tmp_path):
    _write(tmp_path,
           inter="item_id:token\ttimestamp:float\tuser_id:token\tnote:token\trating:float\n"
                 "i1\t881250949\tu1\tfirst\t4.5\ni2\t881250950\tu2\t\t1\n",
           item="tags:token_seq\titem_id:token\tprice:float\temb:float_seq\tkind:token\n"
                "a b\ti1\t9.5\t0.5 1.5\tbook\n\ti2\t\t\tfilm\n",
           user="age:float\tuser_id:token\nNaN\tu1\n31\tu2\n")
    dataset = data.load(tmp_path)
    assert (dataset.name, dataset.implicit, dataset.has_time, dataset.presplit) == ("d", False, True, None)
    assert _rows(dataset.interactions) == [("u1", "i1", 4.5, 881250949), ("u2", "i2", 1.0, 881250950)]
    assert dataset.interactions.rating.dtype == np.float32
    assert dataset.interactions.timestamp.dtype == np.int64
    items = dataset.items
    assert list(items.ids) == ["i1", "i2"]
    assert items.fields == (data.Field("tags", "token_seq"), data.Field("price", "float"),
                            data.Field("emb", "float_seq"), data.Field("kind", "token"))
    assert list(items.columns["tags"]) == [("a", "b"), ()]
    assert items.columns["price"][0] == 9.5 and math.isnan(items.columns["price"][1])
    assert items.columns["emb"][0].tolist() == [0.5, 1.5] and items.columns["emb"][1].tolist() == []
    assert list(items.columns["kind"]) == ["book", "film"]
    assert math.isnan(dataset.users.columns["age"][0]) and dataset.users.columns["age"][1] == 31.0
    # Without a card every field is a feature, of its type's default kind.
    assert dataset.item_features() == (data.Feature("tags", "categories"), data.Feature("price", "number"),
                                       data.Feature("emb", "numbers"), data.Feature("kind", "category"))
    assert dataset.user_features() == (data.Feature("age", "number"),)


def test_ids_cover_every_file_in_id_order(tmp_path):
    """Numeric IDs in numeric order, then the others in string order; users and items from the
    side files without interactions are included."""
    _write(tmp_path, inter="user_id:token\titem_id:token\n10\t9\n2\tb\n",
           item="item_id:token\n100\na\n", user="user_id:token\nz\n1\n")
    dataset = data.load(tmp_path)
    assert list(dataset.item_ids()) == ["9", "100", "a", "b"]
    assert list(dataset.user_ids()) == ["1", "2", "10", "z"]


def test_implicit_feedback_without_rating(tmp_path):
    _write(tmp_path, inter="user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t7\nu1\ti2\t3\n")
    dataset = data.load(tmp_path)
    assert dataset.implicit and dataset.has_time
    assert _rows(dataset.interactions) == [("u1", "i1", 1.0, 7), ("u1", "i2", 1.0, 3)]


def test_card_can_say_a_rating_column_is_not_a_rating(tmp_path):
    _write(tmp_path, yaml="fields: {rating: null, timestamp: null}\n",
           inter="user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t2\t50\nu1\ti2\t4\t10\n")
    dataset = data.load(tmp_path)
    assert dataset.implicit and not dataset.has_time
    assert _rows(dataset.interactions) == [("u1", "i1", 1.0, 0), ("u1", "i2", 1.0, 1)]


def test_no_timestamp_means_file_order(tmp_path):
    _write(tmp_path, inter="user_id:token\titem_id:token\trating:float\nu1\ti1\t3\nu2\ti1\t5\nu1\ti2\t2\n")
    dataset = data.load(tmp_path)
    assert not dataset.has_time and not dataset.implicit
    assert dataset.interactions.timestamp.tolist() == [0, 1, 2]
    with pytest.raises(data.DataError, match=r"--split temporal needs a timestamp field; d.inter has none"):
        dataset.split("temporal")


def test_no_user_file_and_no_item_file(tmp_path):
    _write(tmp_path, inter="user_id:token\titem_id:token\nu1\t5\nu2\t7\n")
    dataset = data.load(tmp_path)
    assert dataset.users is None and dataset.items is None
    assert dataset.user_features() == () and dataset.item_features() == ()
    assert dataset.user_texts(["u1"]) == [""]
    assert dataset.item_texts(["7"]) == ["7"]
    assert dataset.facts(["7"]) == [data.ItemFacts("7", "7", data.UNKNOWN_YEAR, ())]
    assert dataset.labels(["5"]) == ["5"]


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_card_renames_the_roles(tmp_path, suffix):
    card = {"fields": {"user_id": "uid", "item_id": "iid", "rating": "stars", "timestamp": "when"}}
    text = json.dumps(card) if suffix == "json" else (
        "fields:\n  user_id: uid\n  item_id: iid\n  rating: stars\n  timestamp: when\n")
    _write(tmp_path, **{suffix: text},
           inter="when:float\tstars:float\tiid:token\tuid:token\trating:float\n"
                 "881250949\t2\tm1\tp1\t9\n881250950\t5\tm2\tp1\t9\n",
           item="iid:token\tgenre:token\nm1\tdrama\n", user="uid:token\tjob:token\np1\tcook\n")
    dataset = data.load(tmp_path)
    assert dataset.card.source == tmp_path / f"d.{suffix}"
    # A float32 on the way would make 881250949 881250944.
    assert _rows(dataset.interactions) == [("p1", "m1", 2.0, 881250949), ("p1", "m2", 5.0, 881250950)]
    assert list(dataset.items.ids) == ["m1"] and dataset.items.fields == (data.Field("genre", "token"),)
    assert list(dataset.users.ids) == ["p1"]


def test_card_given_apart_from_the_folder_wins(tmp_path):
    _write(tmp_path / "d", inter="user_id:token\titem_id:token\tr:float\nu1\ti1\t2\nu1\ti2\t4\n",
           yaml="positive_threshold: 1\n")
    (tmp_path / "other.json").write_text(json.dumps({"fields": {"rating": "r"}, "positive_threshold": 3}))
    own = data.load(tmp_path / "d")  # no rating field named `rating`: implicit, both rows
    assert own.implicit and _rows(own.interactions) == [("u1", "i1", 1.0, 0), ("u1", "i2", 1.0, 1)]
    dataset = data.load(tmp_path / "d", card=tmp_path / "other.json")
    assert dataset.card.source == tmp_path / "other.json"
    assert _rows(dataset.interactions) == [("u1", "i2", 4.0, 1)]


def test_positive_threshold_drops_rows_below_it(tmp_path):
    _write(tmp_path, yaml="positive_threshold: 3.5\n",
           inter="user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "u1\ti1\t3.5\t1\nu1\ti2\t3.4\t2\nu2\ti1\t5\t3\nu2\ti3\t1\t4\n")
    dataset = data.load(tmp_path)
    assert _rows(dataset.interactions) == [("u1", "i1", 3.5, 1), ("u2", "i1", 5.0, 3)]
    assert dataset.lines.tolist() == [2, 4]  # the file lines the kept rows came from
    assert list(dataset.item_ids()) == ["i1"]  # i2, i3 are only in dropped rows, no item file


TEXT_CARD = """
text:
  title: name
  year: date
  categories: genre
  item: "{name}[ ({date})]: {genre}"
  user: "{age}-year-old {gender}[, {job}]"
values:
  gender: {M: man, F: woman}
  genre: {Sci-Fi: science fiction}
  date: {"?": ""}
"""


@pytest.fixture
def texts(tmp_path):
    _write(tmp_path, yaml=TEXT_CARD,
           inter="user_id:token\titem_id:token\nu1\t1\nu2\t2\nu2\t9\n",
           item="item_id:token\tname:token_seq\tdate:token\tgenre:token_seq\n"
                "1\tHeat\t14-Aug-1995\tCrime Drama\n2\tSolo\t?\tSci-Fi\n3\tOld\t1921\t\n",
           user="user_id:token\tage:token\tgender:token\tjob:token\nu1\t24\tM\tnurse\nu2\t53\tF\t\n")
    return data.load(tmp_path)


def test_text_templates_with_optional_parts_and_values(texts):
    assert texts.item_texts(["1", "2", "3", "9"]) == [
        "Heat (14-Aug-1995): Crime Drama",  # the template shows the field as it is
        "Solo: science fiction",  # date "?" maps to "": the [...] part goes
        "Old (1921):",
        "9",  # no item-file row: its ID
    ]
    assert texts.user_texts(["u1", "u2", "nobody"]) == ["24-year-old man, nurse", "53-year-old woman", ""]


def test_facts_and_labels(texts):
    assert texts.facts(["1", "2", "3", "9"]) == [
        data.ItemFacts("1", "Heat", "1995", ("Crime", "Drama")),  # the year found in the date
        data.ItemFacts("2", "Solo", data.UNKNOWN_YEAR, ("Sci-Fi",)),
        data.ItemFacts("3", "Old", "1921", ()),
        data.ItemFacts("9", "9", data.UNKNOWN_YEAR, ()),
    ]
    assert texts.labels(["1", "2"]) == ["Heat (1995)", "Solo"]


def test_default_texts_and_label_template(tmp_path):
    """Without templates a text is the row's non-empty fields in file order; `text.label` is a
    template too; the title field defaults to a field called `title`."""
    _write(tmp_path, yaml='text: {label: "#{title}"}\n',
           inter="user_id:token\titem_id:token\nu1\t1\n",
           item="item_id:token\tgenre:token\ttitle:token_seq\tscore:float\n1\tnoir\tThe Big Sleep\t7.5\n"
                "2\t\tUp\t\n",
           user="user_id:token\tage:token\tjob:token\nu1\t\tcook\n")
    dataset = data.load(tmp_path)
    assert dataset.item_texts(["1", "2"]) == ["noir; The Big Sleep; 7.5", "Up"]
    assert dataset.user_texts(["u1"]) == ["cook"]
    assert dataset.labels(["1", "2"]) == ["#The Big Sleep", "#Up"]
    assert [f.title for f in dataset.facts(["1", "2"])] == ["The Big Sleep", "Up"]


def test_category_token_field(tmp_path):
    """A `token` categories field is one category; an empty one is none."""
    _write(tmp_path, yaml="text: {categories: genre}\n", inter="user_id:token\titem_id:token\nu1\t1\n",
           item="item_id:token\tgenre:token\n1\tnoir\n2\t\n")
    dataset = data.load(tmp_path)
    assert [f.categories for f in dataset.facts(["1", "2"])] == [("noir",), ()]


# ---------------------------------------------------------------------------------------------
# Pre-split folders

PRESPLIT = dict(
    train_inter="user_id:token\titem_id:token\nu1\ti1\nu1\ti2\nu2\ti1\n",
    valid_inter="user_id:token\titem_id:token\nu2\ti2\n",
    test_inter="user_id:token\titem_id:token\nu3\ti3\nu1\ti3\n",
    item="item_id:token\tname:token\ni1\tone\ni2\ttwo\n",
)


def test_pre_split_folder_with_validation_rows(tmp_path):
    dataset = data.load(_write(tmp_path, "x", **PRESPLIT))
    split = dataset.split()
    assert split.protocol == "pre-split" and split.valid == 1
    assert [(u, i) for u, i, _, _ in _rows(split.train)] == [("u1", "i1"), ("u1", "i2"), ("u2", "i1"),
                                                             ("u2", "i2")]  # valid rows last
    assert [(u, i) for u, i, _, _ in _rows(split.test)] == [("u3", "i3"), ("u1", "i3")]
    # Without timestamps, time is the position in train, valid, test: the valid row is newer.
    assert split.train.timestamp.tolist() == [0, 1, 2, 3] and split.test.timestamp.tolist() == [4, 5]
    assert list(dataset.user_ids()) == ["u1", "u2", "u3"]  # u3 only in test
    assert list(dataset.item_ids()) == ["i1", "i2", "i3"]  # i3 only in test, not in the item file
    assert dataset.split("pre-split").train is split.train
    with pytest.raises(data.DataError, match=r"the folder is pre-split \(x.train.inter, x.test.inter\); "
                                             r"--split random would re-split it"):
        dataset.split("random")


def test_pre_split_folder_without_validation_rows(tmp_path):
    files = {k: v for k, v in PRESPLIT.items() if k != "valid_inter"}
    split = data.load(_write(tmp_path, "x", **files)).split()
    assert (len(split.train), split.valid, len(split.test)) == (3, 0, 2)


def test_pre_split_files_must_share_fields(tmp_path):
    _write(tmp_path, "x", train_inter=PRESPLIT["train_inter"],
           test_inter="user_id:token\titem_id:token\trating:float\nu3\ti3\t4\n")
    with pytest.raises(data.DataError, match=r"x.test.inter: its header differs from x.train.inter's"):
        data.load(tmp_path)


def test_pre_split_folder_needs_a_test_file(tmp_path):
    _write(tmp_path, "x", train_inter=PRESPLIT["train_inter"])
    with pytest.raises(data.DataError, match=r"x.test.inter: file not found"):
        data.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input

INTER = "user_id:token\titem_id:token\trating:float\nu1\ti1\t4\nu2\ti2\t5\n"
ITEM = "item_id:token\ttitle:token_seq\tgenre:token\n1\tHeat\tCrime\n2\tSolo\tSci-Fi\n"


@pytest.mark.parametrize("files, expected", [
    ({"inter": "user_id\titem_id:token\nu1\ti1\n"},
     r"d.inter:1: column 1 header 'user_id' must be `field:type` with type one of token, token_seq"),
    ({"inter": "user_id:token\titem_id:int\nu1\ti1\n"},
     r"d.inter:1: field 'item_id' has unknown type 'int'; expected one of token, token_seq, float, float_seq"),
    ({"inter": "user_id:token\titem_id:token\trating:float\nu1\ti1\t4\nu1\ti2\n"},
     r"d.inter:3: expected 3 tab-separated fields \(user_id, item_id, rating\), got 2"),
    ({"inter": "user_id:token\titem_id:token\trating:float\nu1\ti1\t4\n\nu1\ti2\tfive\n"},
     r"d.inter:4: field 'rating' is float, got 'five', not a number"),
    ({"inter": INTER, "item": "item_id:token\tprice:float_seq\ni1\t1 x\n"},
     r"d.item:2: field 'price' is float_seq, got 'x', not a number"),
    ({"inter": "user_id:token\titem_id:token\nu1\ti1\n\ti2\n"}, r"d.inter:3: field 'user_id' is empty"),
    ({"inter": INTER, "item": ITEM + "1\tHeat again\tCrime\n"}, r"d.item:4: item '1' repeats line 2"),
    ({"inter": "uid:token\titem_id:token\nu1\ti1\n"},
     r"d.inter:1: no user_id field 'user_id'; the file has uid, item_id \(a card, d.yaml, can rename it\)"),
    ({"inter": INTER, "yaml": "fields: {user_id: uid}\n"},
     r"d.inter:1: no user_id field 'uid'; the file has user_id, item_id, rating$"),
    ({"inter": INTER, "yaml": "fields: {timestamp: when}\n"},
     r"d.inter:1: the card names timestamp field 'when', which the file does not have; its fields "
     r"are user_id, item_id, rating"),
    ({"inter": INTER, "item": ITEM, "yaml": "item_features: {year: number}\n"},
     r"d.yaml: item_features names field 'year', which d.item does not have; its fields are title, genre"),
    ({"inter": INTER, "yaml": "user_features: {age: number}\n"},
     r"d.yaml: user_features are declared but .*d.user does not exist"),
    ({"inter": INTER, "item": ITEM, "yaml": "item_features: {genre: bag}\n"},
     r"d.yaml: item_features.genre: unknown kind 'bag'; expected one of category, categories, text"),
    ({"inter": INTER, "yaml": "colour: blue\nname: d\n"},
     r"d.yaml: unknown key\(s\) colour; a card may have name, fields"),
    ({"inter": INTER, "yaml": "fields: {label: x}\n"}, r"d.yaml: fields: unknown role\(s\) label"),
    ({"inter": INTER, "item": ITEM, "yaml": "item_features: {genre: numbers}\n"},
     r"d.yaml: item_features.genre: kind 'numbers' needs a field of type float_seq, genre is token"),
    ({"inter": INTER, "item": ITEM, "yaml": "item_features: {title: category}\n"},
     r"item_features.title: kind 'category' needs a field of type token, title is token_seq"),
    ({"inter": INTER, "item": ITEM, "yaml": 'text: {item: "{title} ({year}) {plot}"}\n'},
     r"d.yaml: text.item template names 'year', 'plot', not a field of the item file; fields: title, genre"),
    ({"inter": INTER, "yaml": 'text: {user: "{age}"}\n'},
     r"d.yaml: text.user template names 'age', not a field of the user file; fields: \(no file\)"),
    ({"inter": INTER, "item": ITEM, "yaml": "text: {year: year}\n"},
     r"d.yaml: text.year names item field 'year', which does not exist; item fields: title, genre"),
    ({"inter": INTER, "yaml": "fields: [user_id\n"}, r"d.yaml: cannot parse the card"),
    ({"inter": INTER, "yaml": "split: leave-one-out\n"},
     r"d.yaml: split: unknown protocol 'leave-one-out'; expected one of random, temporal"),
    ({"inter": INTER, "yaml": "values: {gender: M}\n"},
     r"d.yaml: values.gender must map file values to display words, got 'M'"),
    ({"inter": INTER, "yaml": "fields: [user_id]\n"}, r"d.yaml: fields must be a mapping"),
])
def test_bad_input_names_file_line_and_field(tmp_path, files, expected):
    _write(tmp_path, **files)
    with pytest.raises(data.DataError, match=expected):
        data.load(tmp_path)


def test_a_card_given_by_path_must_exist(tmp_path):
    _write(tmp_path, inter=INTER)
    with pytest.raises(data.DataError, match=r"missing.yaml: card not found"):
        data.load(tmp_path, tmp_path / "missing.yaml")


@pytest.mark.parametrize("files", [{"inter": "user_id:token\titem_id:token\n\n"},
                                   {"inter": INTER, "yaml": "positive_threshold: 9\n"}])
def test_no_interactions_is_an_error(tmp_path, files):
    with pytest.raises(data.DataError, match=re.escape(f"{tmp_path}: no interactions")):
        data.load(_write(tmp_path, **files))


def test_folder_with_no_dataset_or_two(tmp_path):
    with pytest.raises(data.DataError, match=r"expected one RecBole dataset, found no `<name>.inter`"):
        data.load(tmp_path)
    _write(tmp_path, "a", inter=INTER)
    _write(tmp_path, "b", inter=INTER)
    with pytest.raises(data.DataError, match=r"found several datasets \(a, b\)"):
        data.load(tmp_path)
    with pytest.raises(data.DataError, match=r"a.inter: not a folder"):
        data.load(tmp_path / "a.inter")


# ---------------------------------------------------------------------------------------------
# MovieLens-100K through the data layer


def test_movielens_100k_loads(movielens):
    assert (len(movielens.interactions), len(movielens.user_ids()), len(movielens.item_ids())) == (
        100_000, 943, 1_682)
    assert not movielens.implicit and movielens.has_time and movielens.presplit is None
    first = movielens.interactions.take(np.arange(2))
    assert _rows(first) == [("196", "242", 3.0, 881250949), ("186", "302", 3.0, 891717742)]
    assert movielens.facts(["1", "267"]) == [
        data.ItemFacts("1", "Toy Story", "1995", ("Animation", "Children's", "Comedy")),
        data.ItemFacts("267", "unknown", data.UNKNOWN_YEAR, ("unknown",)),  # RecBole's "unkonwn"
    ]
    assert movielens.item_texts(["1"]) == ["Toy Story (1995); Animation Children's Comedy"]
    assert movielens.user_texts(["1"]) == ["24-year-old man, technician"]
    assert movielens.labels(["1", "267"]) == ["Toy Story (1995)", "unknown"]


def test_split_reproduces_the_popularity_peer(benchmark_rows):
    """docs/evaluation.md's popularity peer on this protocol: hit rate 0.091 @10 and 0.413 @100."""
    seen, users, items = benchmark_rows
    result = metrics.evaluate(peers.popularity_scores(seen), users, items, seen)
    assert round(result["hit_rate@10"], 3) == 0.091
    assert round(result["hit_rate@100"], 3) == 0.413  # 0.4126


def _parquet_copy(source, out, name="ml-100k"):
    """The folder's `.inter` as `.inter.parquet`, typed as a data team would write it (integer
    IDs, float32 ratings, int64 timestamps); the item and user files and the card as they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from towers import files

    atomic = files.read_atomic(source / f"{name}.inter")
    out.mkdir()
    pq.write_table(pa.table({
        "item_id": pa.array(atomic.columns["item_id"].astype(np.int32)),  # any column order
        "user_id": pa.array(atomic.columns["user_id"].astype(np.int64)),
        "rating": pa.array(atomic.columns["rating"].astype(np.float32)),
        "timestamp": pa.array(atomic.columns["timestamp"].astype(np.int64))}),
        out / f"{name}.inter.parquet")
    for suffix in ("item", "user", "yaml"):
        (out / f"{name}.{suffix}").write_bytes((source / f"{name}.{suffix}").read_bytes())
    return out


def test_parquet_interactions_are_the_atomic_files_rows(tiny_data_dir, tmp_path):
    """`<name>.inter.parquet` loads the same rows, split the same way, as `<name>.inter`; a split
    of it is written as Parquet and reloads as the atomic file's split does."""
    from towers import protocols

    text = data.load(tiny_data_dir)
    parquet = data.load(_parquet_copy(tiny_data_dir, tmp_path / "parquet"))
    for field in ("user_id", "item_id", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(parquet.interactions, field),
                                      getattr(text.interactions, field), err_msg=field)
    assert (parquet.implicit, parquet.has_time) == (False, True)
    expected, got = text.split("random"), parquet.split("random")
    np.testing.assert_array_equal(got.test_index, expected.test_index)
    for folder, dataset, split in ((tmp_path / "a", text, expected), (tmp_path / "b", parquet, got)):
        protocols.write_split(dataset, split, folder)
    assert sorted(p.name for p in (tmp_path / "b").glob("*.inter.parquet")) == [
        "ml-100k.test.inter.parquet", "ml-100k.train.inter.parquet"]
    a, b = data.load(tmp_path / "a").split(), data.load(tmp_path / "b").split()
    assert b.protocol == "pre-split"
    for part in ("train", "test"):
        np.testing.assert_array_equal(getattr(b, part).item_id, getattr(a, part).item_id)
        np.testing.assert_array_equal(getattr(b, part).timestamp, getattr(a, part).timestamp)


def test_bad_parquet_is_named(tiny_data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _parquet_copy(tiny_data_dir, tmp_path / "both")
    (folder / "ml-100k.inter").write_bytes((tiny_data_dir / "ml-100k.inter").read_bytes())
    with pytest.raises(data.DataError, match="both ml-100k.inter and ml-100k.inter.parquet"):
        data.load(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"user_id": ["1", "2"], "item_id": ["5", "6"],
                             "seen": pa.array([True, False])}), bad / "x.inter.parquet")
    with pytest.raises(data.DataError, match=r"x.inter.parquet: column 'seen' has Parquet type bool"):
        data.load(bad)
    pq.write_table(pa.table({"user_id": ["1", None, "3"], "item_id": ["5", "6", "7"]}),
                   bad / "x.inter.parquet")
    with pytest.raises(data.DataError, match=r"x.inter.parquet:2: field 'user_id' is empty"):
        data.load(bad)
    (bad / "x.inter.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DataError, match="x.inter.parquet: not a readable Parquet file"):
        data.load(bad)


def test_arrow_reader_gives_what_the_line_reader_gives(tmp_path):
    """Token and float columns are parsed whole by Arrow; a blank line sends the file to the
    line reader, which must agree value for value (missing floats NaN, IDs that look numeric kept
    as text, a quote kept as a character) and count lines past the blank one. A value that is not
    a number still gets the line reader's error, naming file, line and field."""
    from towers import files

    body = ('user_id:token\titem_id:token\trating:float\n7\t"007"\t4.5\n8\t042\t\n'
            '9\ta b\t-1e3\n')
    (tmp_path / "fast.inter").write_text(body)
    (tmp_path / "slow.inter").write_text(body.replace("\n8\t", "\n\n8\t"))
    fast = files.read_atomic(tmp_path / "fast.inter")
    slow = files.read_atomic(tmp_path / "slow.inter")
    assert files._read_atomic_arrow(tmp_path / "fast.inter") is not None  # the paths compared
    assert files._read_atomic_arrow(tmp_path / "slow.inter") is None
    assert fast.columns["item_id"].tolist() == slow.columns["item_id"].tolist() == ['"007"', "042", "a b"]
    assert fast.columns["user_id"].tolist() == slow.columns["user_id"].tolist() == ["7", "8", "9"]
    np.testing.assert_array_equal(fast.columns["rating"], [4.5, math.nan, -1000.0])
    np.testing.assert_array_equal(slow.columns["rating"], fast.columns["rating"])
    assert fast.lines.tolist() == [2, 3, 4] and slow.lines.tolist() == [2, 4, 5]
    (tmp_path / "bad.inter").write_text(body.replace("-1e3", "lots"))
    with pytest.raises(data.DataError, match=r"bad\.inter:4: field 'rating' is float, got 'lots'"):
        files.read_atomic(tmp_path / "bad.inter")
