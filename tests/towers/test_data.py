"""Loaders, the benchmark split, malformed files."""

from __future__ import annotations

import numpy as np
import pytest

from towers import data, metrics, peers


def _write_grouplens(movielens: data.MovieLens, out) -> None:
    """Writes a MovieLens record in GroupLens format (titles carry the year, genre flags, Latin-1)."""
    with open(out / "u.item", "w", encoding="latin-1") as f:
        for item in movielens.items.values():
            title = item.title if item.year == data.UNKNOWN_YEAR else f"{item.title} ({item.year})"
            date = "" if item.year == data.UNKNOWN_YEAR else f"01-Jan-{item.year}"
            flags = "|".join("1" if g in item.genres else "0" for g in data.GENRES)
            f.write(f"{item.item_id}|{title}|{date}||http://imdb|{flags}\n")
    with open(out / "u.user", "w") as f:
        for u in movielens.users.values():
            f.write(f"{u.user_id}|{u.age}|{u.gender}|{u.occupation}|{u.zip_code}\n")
    r = movielens.ratings
    with open(out / "u.data", "w") as f:
        for row in zip(r.user_id, r.item_id, r.rating.astype(int), r.timestamp):
            f.write("\t".join(map(str, row)) + "\n")


def test_recbole_loader_reads_the_real_data(movielens):
    assert (len(movielens.ratings), len(movielens.users), len(movielens.items)) == (100_000, 943, 1_682)
    first = movielens.ratings.take(np.arange(2))
    assert list(first.user_id) == ["196", "186"] and list(first.item_id) == ["242", "302"]
    assert list(first.rating) == [3.0, 3.0] and list(first.timestamp) == [881250949, 891717742]
    assert movielens.items["1"] == data.Item("1", "Toy Story", "1995", ("Animation", "Children's", "Comedy"))
    assert movielens.items["267"] == data.Item("267", "unknown", data.UNKNOWN_YEAR, ("unknown",))
    assert movielens.items["1"].text() == "Toy Story (1995); Animation, Children's, Comedy"
    assert movielens.users["1"].text() == "24-year-old man, technician"


def test_grouplens_and_recbole_loaders_agree(movielens, tmp_path):
    _write_grouplens(movielens, tmp_path)
    grouplens = data.load_movielens(tmp_path)
    assert grouplens.items == movielens.items
    assert grouplens.users == movielens.users
    for field in ("user_id", "item_id", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(grouplens.ratings, field), getattr(movielens.ratings, field))


def test_grouplens_real_lines(tmp_path, movielens):
    # Verbatim lines of GroupLens ml-100k (u.item is Latin-1, the year sits in the title).
    (tmp_path / "u.item").write_bytes(
        b"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
        b"|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
        b"267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (tmp_path / "u.data").write_text("1\t1\t5\t874965758\n2\t267\t4\t888551093\n")
    loaded = data.load_grouplens(tmp_path)
    assert loaded.items["1"] == movielens.items["1"]
    assert loaded.items["267"] == movielens.items["267"]
    assert loaded.users["2"] == movielens.users["2"]


def test_split_is_the_documented_one(movielens):
    split = data.benchmark_split(movielens.ratings)
    assert (len(split.train), len(split.test)) == (80_000, 20_000)
    # Golden rows of `from_tensor_slices(rows).shuffle(100_000, seed=42, reshuffle_each_iteration=False)`.
    assert list(zip(split.train.user_id[:3], split.train.item_id[:3])) == [
        ("343", "98"), ("450", "183"), ("551", "1314")]
    assert list(zip(split.test.user_id[:3], split.test.item_id[:3])) == [
        ("286", "535"), ("903", "651"), ("230", "650")]
    pairs = set(zip(split.train.user_id, split.train.item_id))
    assert not pairs & set(zip(split.test.user_id, split.test.item_id))


def test_split_reproduces_the_popularity_peer(benchmark_rows):
    """DESIGN.md's popularity peer on this protocol: hit rate 0.091 @10 and 0.412 @100."""
    seen, users, items = benchmark_rows
    result = metrics.evaluate(peers.popularity_scores(seen), users, items, seen)
    assert round(result["hit_rate@10"], 3) == 0.091
    assert round(result["hit_rate@100"], 3) == 0.413  # 0.4126


@pytest.mark.parametrize("name, content, expected", [
    ("ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\n",
     r"ml-100k.inter:2: expected 4 fields"),
    ("ml-100k.inter", "h\th\th\th\n1\t1\t5\t874965758\n1\t1\tfive\t874965758\n",
     r"ml-100k.inter:3: field 'rating' must be a number, got 'five'"),
    ("ml-100k.inter", "h\th\th\th\n99999\t1\t5\t874965758\n",
     r"ml-100k.inter:2: user_id '99999' is not in the user table"),
    ("ml-100k.inter", "h\th\th\th\n1\t1\t7\t874965758\n",
     r"ml-100k.inter:2: rating must be between 0 and 5"),
    ("ml-100k.item", "h\th\th\th\n1\tToy Story\t1995\tAnimation Cartoon\n",
     r"ml-100k.item:2: unknown genre 'Cartoon'"),
    ("ml-100k.user", "h\th\th\th\th\n1\ttwenty\tM\ttechnician\t85711\n",
     r"ml-100k.user:2: field 'age' must be an integer, got 'twenty'"),
])
def test_malformed_rows_name_file_line_and_expectation(movielens_dir, tmp_path, name, content, expected):
    for suffix in ("inter", "item", "user"):
        (tmp_path / f"ml-100k.{suffix}").write_bytes((movielens_dir / f"ml-100k.{suffix}").read_bytes())
    (tmp_path / name).write_text(content)
    with pytest.raises(data.DataError, match=expected):
        data.load_movielens(tmp_path)


def test_grouplens_bad_genre_flag(tmp_path):
    (tmp_path / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||x|" + "|".join(["2"] * 19) + "\n")
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n")
    (tmp_path / "u.data").write_text("1\t1\t5\t874965758\n")
    with pytest.raises(data.DataError, match=r"u.item:1: genre flags must be 0 or 1"):
        data.load_movielens(tmp_path)


def test_missing_folder_says_how_to_fetch(tmp_path):
    with pytest.raises(data.DataError, match="cascade data fetch movielens-100k"):
        data.load_movielens(tmp_path)


def test_split_ignores_the_global_seed(movielens):
    import tensorflow as tf

    tf.random.set_seed(42)  # what Keras training does; the protocol has no global seed
    try:
        split = data.benchmark_split(movielens.ratings)
    finally:
        tf.random.set_seed(None)
    assert list(zip(split.train.user_id[:2], split.train.item_id[:2])) == [("343", "98"), ("450", "183")]
