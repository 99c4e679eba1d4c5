"""Feature tables from a tiny hand-written dataset: every feature kind's integers or floats, the
cold ID rows, histories and seen lists, worked out by hand from the files below."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from towers import data, features

# Item IDs in ID order: 1, 2, 7, 10, 42 (42 occurs only in interactions, 7 only in the item file).
ITEMS = (
    "item_id:token\tgenre:token\ttags:token_seq\ttitle:token_seq\tyear:float\tvec:float_seq\n"
    "10\tdrama\tx y z\tThe Big Sleep\t1995\t1 2\n"
    "2\tcomedy\ty\tBig Fish\t2000\t3 4\n"
    "1\tdrama\t\tthe Fish, Again!\t\t5 6\n"
    "7\t\tx\tSleep\t1989.5\t7 8\n")
# User IDs in ID order: u1..u5 (u5 occurs only in interactions, u3 and u4 only in the user file).
USERS = ("user_id:token\tage:token\tjob:token\n"
         "u1\t17\tnurse\nu2\t30\tnurse\nu3\tn/a\tcook\nu4\t\tnurse\n")
INTER = ("user_id:token\titem_id:token\ttimestamp:float\n"
         "u1\t10\t5\nu1\t2\t9\nu1\t1\t9\nu1\t42\t1\nu2\t2\t3\nu2\t2\t8\nu5\t1\t2\n")
CARD = """
item_features:
  genre: category
  tags: {kind: categories, max_tokens: 2}
  title: {kind: text, min_count: 2}
  year: {kind: number, boundaries: [1990, 2000]}
  vec: numbers
user_features:
  age: {kind: number, boundaries: [18, 30]}
  job: {kind: category, min_count: 2}
"""
TRAIN_ROWS = 6  # the first six rows: u5's row is not training data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    for suffix, text in (("item", ITEMS), ("user", USERS), ("inter", INTER), ("yaml", CARD)):
        (folder / f"f.{suffix}").write_text(text)
    dataset = data.load(folder)
    train = dataset.interactions.take(np.arange(TRAIN_ROWS))
    return dataset, features.build_tables(dataset, train, history_length=3)


def test_ids_and_cold_id_rows(tiny):
    """Every ID in the files has a row; only IDs with a training interaction get an ID row (u5
    has a row in the files but not in train, item 7 none at all)."""
    _, tables = tiny
    assert list(tables.item_ids) == ["1", "2", "7", "10", "42"]
    assert list(tables.user_ids) == ["u1", "u2", "u3", "u4", "u5"]
    assert list(tables.user_id_row) == [1, 2, 0, 0, 0]
    assert list(tables.item_id_row) == [1, 2, 0, 3, 4]
    assert (tables.num_user_ids, tables.num_item_ids) == (3, 5)
    assert list(tables.item_count) == [1, 3, 0, 1, 1]
    np.testing.assert_allclose(tables.item_probability(), [1 / 6, 3 / 6, 0, 1 / 6, 1 / 6])


def test_history_is_newest_first_and_capped(tiny):
    """u1: items 1 and 2 at t=9 (a tie, broken by item ID), 10 at t=5, 42 at t=1 (cut by the cap
    of 3); u2 rated item 2 twice. Values are item row + 1 (rows: 1->0, 2->1, 7->2, 10->3, 42->4)."""
    _, tables = tiny
    assert [tables.history_of(r).tolist() for r in range(5)] == [[1, 2, 4], [2, 2], [], [], []]
    assert tables.history_splits.tolist() == [0, 3, 5, 5, 5, 5]
    values, splits = tables.history_ragged(2)  # the model's shorter cap: newest two per user
    assert values.tolist() == [1, 2, 2, 2] and splits.tolist() == [0, 2, 4, 4, 4, 4]
    assert [tables.seen_of(r).tolist() for r in range(5)] == [["1", "2", "10", "42"], ["2"], [],
                                                              [], []]
    assert tables.seen_matrix().toarray().tolist() == [[1, 1, 0, 1, 1], [0, 1, 0, 0, 0],
                                                       [0] * 5, [0] * 5, [0] * 5]


def test_category_ids_zero_for_missing_and_rare(tiny):
    _, tables = tiny
    # Vocabulary by frequency: drama (2), comedy (1); item 7's empty genre and item 42 (no row) -> 0.
    assert list(tables.vocabularies["item:genre"]) == ["drama", "comedy"]
    assert list(tables.values["item:genre"]) == [1, 2, 0, 1, 0]
    # min_count 2: nurse (3) is kept, cook (1) is not -> 0 like a missing value.
    assert list(tables.vocabularies["user:job"]) == ["nurse"]
    assert list(tables.values["user:job"]) == [1, 1, 0, 1, 0]


def test_categories_are_padded_token_ids(tiny):
    """0 pads, 1 is out of vocabulary, x=2, y=3, z=4 (x and y twice, ties in string order);
    max_tokens 2 cuts item 10's z."""
    _, tables = tiny
    assert list(tables.vocabularies["item:tags"]) == ["x", "y", "z"]
    assert tables.values["item:tags"].tolist() == [[0, 0], [3, 0], [2, 0], [2, 3], [0, 0]]


def test_text_word_ids_with_min_count(tiny):
    """Lower-cased, punctuation stripped; words in at least 2 titles: big, fish, sleep, the (2..5);
    "again" is in one title only -> 1 (out of vocabulary); 0 pads."""
    _, tables = tiny
    assert list(tables.vocabularies["item:title"]) == ["big", "fish", "sleep", "the"]
    assert tables.values["item:title"].tolist() == [[5, 3, 1], [2, 3, 0], [4, 0, 0], [5, 2, 4],
                                                    [0, 0, 0]]


def test_number_buckets_with_explicit_boundaries(tiny):
    """Boundaries [1990, 2000]: 1 below 1990, 2 in [1990, 2000), 3 from 2000 on; 0 missing."""
    _, tables = tiny
    # items 1 (empty), 2 (2000), 7 (1989.5), 10 (1995), 42 (no row)
    assert list(tables.values["item:year"]) == [0, 3, 1, 2, 0]
    # a token field: u1 17, u2 30 (on a boundary: upper bucket), u3 "n/a", u4 empty, u5 no row
    assert list(tables.values["user:age"]) == [1, 3, 0, 0, 0]


def test_numbers_are_standardized_per_position(tiny):
    """File rows [1 2], [3 4], [5 6], [7 8]: mean [4 5], variance 5 at both positions."""
    _, tables = tiny
    root = math.sqrt(5)
    expected = np.array([[1, 1], [-1, -1], [3, 3], [-3, -3], [0, 0]]) / root  # 1, 2, 7, 10, 42
    np.testing.assert_allclose(tables.values["item:vec"], expected, atol=1e-4)


def test_specs_sizes_and_widths(tiny):
    _, tables = tiny
    sizes = {s.key: (s.kind, s.size, s.width) for s in tables.specs}
    assert sizes == {
        "user:age": ("number", 4, 0), "user:job": ("category", 2, 0),
        "item:genre": ("category", 3, 0), "item:tags": ("categories", 5, 2),
        "item:title": ("text", 6, 3), "item:year": ("number", 4, 0), "item:vec": ("numbers", 2, 2)}
    assert [s.name for s in tables.side("item")] == ["genre", "tags", "title", "year", "vec"]


def test_tables_round_trip(tiny, tmp_path):
    _, tables = tiny
    tables.save(tmp_path / "features.npz")
    loaded = features.FeatureTables.load(tmp_path / "features.npz")
    assert loaded.specs == tables.specs
    arrays = [f.name for f in dataclasses.fields(tables) if f.name not in ("specs", "values", "vocabularies")]
    assert {"user_ids", "item_ids", "user_id_row", "item_id_row", "history_items",
            "history_splits", "seen_items", "seen_splits"} <= set(arrays)
    for name in arrays:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tables, name), err_msg=name)
        assert getattr(loaded, name).dtype == getattr(tables, name).dtype, name
    assert sorted(loaded.values) == sorted(tables.values)
    for key in tables.values:
        np.testing.assert_array_equal(loaded.values[key], tables.values[key], err_msg=key)
        np.testing.assert_array_equal(loaded.vocabularies[key], tables.vocabularies[key], err_msg=key)
    with np.load(tmp_path / "features.npz") as arrays:
        old = {name: arrays[name] for name in arrays.files}
    # A file from before histories were ragged ([U, H], 0 pads) loads to the same histories.
    dense = {k: v for k, v in old.items() if not k.startswith("history_")}
    np.savez(tmp_path / "dense.npz", **dense, history=np.array(
        [[1, 2, 4], [2, 2, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], np.int32))
    loaded = features.FeatureTables.load(tmp_path / "dense.npz")
    np.testing.assert_array_equal(loaded.history_items, tables.history_items)
    np.testing.assert_array_equal(loaded.history_splits, tables.history_splits)
    # A file from before seen items were ragged names itself and the command that rewrites it.
    np.savez(tmp_path / "old.npz", **old, seen=np.array([["1", ""]]))
    with pytest.raises(ValueError, match=r"old\.npz: written by an earlier Cascade .*cascade train retrieval"):
        features.FeatureTables.load(tmp_path / "old.npz")


def test_unknown_feature_option_is_named(tmp_path):
    (tmp_path / "f.item").write_text(ITEMS)
    (tmp_path / "f.inter").write_text(INTER)
    (tmp_path / "f.yaml").write_text("item_features: {genre: {kind: category, max_tokens: 3}}\n")
    dataset = data.load(tmp_path)
    with pytest.raises(data.DataError, match=r"f.yaml: item_features.genre: unknown option\(s\) "
                                             r"max_tokens for kind category; it takes min_count"):
        features.build_tables(dataset, dataset.interactions)


def test_quantile_bins_without_boundaries(tmp_path):
    """bins 2 on years 1995, 2000, 1989.5 (item 1 empty): the median, 1995, is the one boundary."""
    (tmp_path / "f.item").write_text(ITEMS)
    (tmp_path / "f.inter").write_text(INTER)
    (tmp_path / "f.yaml").write_text("item_features: {year: {kind: number, bins: 2}}\n")
    dataset = data.load(tmp_path)
    tables = features.build_tables(dataset, dataset.interactions)
    assert tables.specs == (features.FeatureSpec("item", "year", "number", 3),)
    assert list(tables.values["item:year"]) == [0, 2, 1, 2, 0]  # items 1, 2, 7, 10, 42


def test_text_on_a_token_field_keeps_every_word(tmp_path):
    """A `text` feature on a `token` field (a whole sentence in one value) keeps its words: a width
    taken from the token count (1) would keep only the first word."""
    from towers import data, features

    (tmp_path / "t.inter").write_text("user_id:token\titem_id:token\nu\ta\nu\tb\n")
    (tmp_path / "t.item").write_text("item_id:token\tblurb:token\na\tred fox jumps\nb\tred fox\n")
    (tmp_path / "t.yaml").write_text("item_features:\n  blurb: {kind: text, min_count: 1}\n")
    dataset = data.load(tmp_path)
    tables = features.build_tables(dataset, dataset.interactions)
    (spec,) = tables.specs
    vocabulary = list(tables.vocabularies[spec.key])
    assert spec.width == 3 and vocabulary == ["fox", "red", "jumps"]
    words = lambda *w: [vocabulary.index(x) + 2 for x in w]
    assert tables.values[spec.key].tolist() == [words("red", "fox", "jumps"), words("red", "fox") + [0]]
