"""The four split protocols on a hand-written dataset (expected rows worked out by hand), the
benchmark split's golden rows on MovieLens-100K, and `write_split` round trips."""

from __future__ import annotations

import numpy as np
import pytest

from towers import data, protocols

# Row r of the file is "u<user> i<item> <timestamp>"; ties at t=20 (rows 3, 11), t=30 (2, 7) and
# t=50 (1, 4). Per user: u1 rows 0 2 5 7 10, u2 1 4 8, u3 3 6 11, u4 9, u5 12 13.
ROWS = [("u1", "i1", 10), ("u2", "i2", 50), ("u1", "i3", 30), ("u3", "i1", 20), ("u2", "i4", 50),
        ("u1", "i2", 40), ("u3", "i5", 60), ("u1", "i4", 30), ("u2", "i3", 70), ("u4", "i5", 80),
        ("u1", "i5", 90), ("u3", "i2", 20), ("u5", "i1", 5), ("u5", "i3", 100)]
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _write(folder, rows=ROWS, name="p", ratings=None):
    folder.mkdir(parents=True, exist_ok=True)
    ratings = ratings or [4] * len(rows)
    (folder / f"{name}.inter").write_text(HEADER + "".join(
        f"{u}\t{i}\t{r}\t{t}\n" for (u, i, t), r in zip(rows, ratings)))
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return data.load(_write(tmp_path_factory.mktemp("protocols")))


def _rows(interactions: data.Interactions) -> list[tuple[str, str, int]]:
    return list(zip(interactions.user_id, interactions.item_id, interactions.timestamp.tolist()))


def _check(split: data.Split, train: list[int], test: list[int]) -> None:
    assert _rows(split.train) == [ROWS[r] for r in train]
    assert _rows(split.test) == [ROWS[r] for r in test]
    assert list(split.train_index) == train and list(split.test_index) == test


def test_temporal_cut_keeps_file_order_within_ties(small):
    """share 0.4 of 14 rows: round(5.6) = 6 test rows. Time order (ties in file order) is
    12 0 3 11 2 7 5 1 | 4 6 8 9 10 13: the cut falls inside the t=50 tie, whose earlier row (1)
    trains and later row (4) tests."""
    split = small.split("temporal", test_share=0.4)
    assert split.protocol == "temporal"
    _check(split, [12, 0, 3, 11, 2, 7, 5, 1], [4, 6, 8, 9, 10, 13])


@pytest.mark.parametrize("share, train, test", [
    # u1 5 rows * 0.25 = 1.25 -> 1 (row 10); u2 0.75 -> 1 (row 8); u3 0.75 -> 1 (row 6);
    # u4 0.25 -> 0; u5 2 * 0.25 = 0.5 -> 1 by round-half-up (banker's rounding would give 0).
    (0.25, [0, 1, 2, 3, 4, 5, 7, 9, 11, 12], [6, 8, 10, 13]),
    # u1 2.5 -> 3 (half up): rows 7 5 10, since row 7 follows row 2 in the file at t=30; u2 1.5
    # -> 2: rows 4 8; u3 1.5 -> 2: rows 11 (file order breaks the t=20 tie with row 3) and 6;
    # u4 0.5 -> 1, capped at n_u - 1 = 0; u5 1 -> row 13.
    (0.5, [0, 1, 2, 3, 9, 12], [4, 5, 6, 7, 8, 10, 11, 13]),
])
def test_user_temporal_rounds_half_up_and_keeps_a_training_row(small, share, train, test):
    split = small.split("user-temporal", test_share=share)
    _check(split, train, test)


def test_the_card_names_the_default_protocol(tmp_path):
    folder = _write(tmp_path)
    assert data.load(folder).split(test_share=0.5).protocol == "random"
    (folder / "p.yaml").write_text("split: user-temporal\n")
    _check(data.load(folder).split(test_share=0.5), [0, 1, 2, 3, 9, 12], [4, 5, 6, 7, 8, 10, 11, 13])


def test_time_protocols_need_a_timestamp(tmp_path):
    (tmp_path / "n.inter").write_text("user_id:token\titem_id:token\nu1\ti1\nu1\ti2\nu2\ti1\n")
    dataset = data.load(tmp_path)
    for protocol in ("temporal", "user-temporal"):
        with pytest.raises(data.DataError, match=rf"--split {protocol} needs a timestamp field; "
                                                 r"n.inter has none"):
            dataset.split(protocol)


def _cold_rows(folder):
    """20 items in interactions (each rated by two of five users) and 4 more only in the item file."""
    rows = [(f"u{(n + k) % 5}", f"i{n}", 100 * n + k) for n in range(20) for k in range(2)]
    _write(folder, rows)
    (folder / "p.item").write_text("item_id:token\n" + "".join(f"i{n}\n" for n in range(24)))
    return data.load(folder), rows


def test_cold_items_holds_out_whole_items(tmp_path):
    dataset, rows = _cold_rows(tmp_path)
    split = dataset.split("cold-items", test_share=0.25, seed=3)
    held = set(split.test.item_id)
    assert len(held) == 5  # round(0.25 * 20): the items in interactions, not the item file's 24
    assert not held & set(split.train.item_id)
    assert sorted(_rows(split.test)) == sorted(r for r in rows if r[1] in held)  # all their rows
    assert len(split.train) + len(split.test) == len(rows) == 40
    again = dataset.split("cold-items", test_share=0.25, seed=3)
    np.testing.assert_array_equal(again.test_index, split.test_index)
    other = dataset.split("cold-items", test_share=0.25, seed=4)
    assert set(other.test.item_id) != held
    # Training rows come grouped by item, so the last rows (what --holdout takes) are whole items.
    train_items = list(split.train.item_id)
    blocks = [item for k, item in enumerate(train_items) if k == 0 or item != train_items[k - 1]]
    assert len(blocks) == len(set(train_items)) == 15
    assert set(train_items[-4:]).isdisjoint(train_items[:-4])  # two items, two rows each
    assert sorted(_rows(split.train)) == sorted(r for r in rows if r[1] not in held)


def test_unknown_protocol_and_bad_share(small):
    with pytest.raises(data.DataError, match=r"unknown split protocol 'leave-one-out'; expected "
                                             r"one of random, temporal, user-temporal, cold-items"):
        small.split("leave-one-out")
    with pytest.raises(data.DataError, match=r"--test-share must be between 0 and 1, got 1.5"):
        small.split("temporal", test_share=1.5)


def test_split_is_the_documented_one(movielens):
    split = movielens.split("random")
    assert split.protocol == "random"
    assert (len(split.train), len(split.test)) == (80_000, 20_000)
    # Golden rows of `from_tensor_slices(rows).shuffle(100_000, seed=42, reshuffle_each_iteration=False)`.
    assert list(zip(split.train.user_id[:3], split.train.item_id[:3])) == [
        ("343", "98"), ("450", "183"), ("551", "1314")]
    assert list(zip(split.test.user_id[:3], split.test.item_id[:3])) == [
        ("286", "535"), ("903", "651"), ("230", "650")]
    pairs = set(zip(split.train.user_id, split.train.item_id))
    assert not pairs & set(zip(split.test.user_id, split.test.item_id))
    assert sorted(np.concatenate([split.train_index, split.test_index])) == list(range(100_000))


def test_split_ignores_the_global_seed(movielens):
    import tensorflow as tf

    tf.random.set_seed(42)  # what Keras training does; the protocol has no global seed
    try:
        split = movielens.split("random")
    finally:
        tf.random.set_seed(None)
    assert list(zip(split.train.user_id[:2], split.train.item_id[:2])) == [("343", "98"), ("450", "183")]


def _interactions_rows(i: data.Interactions):
    return list(zip(i.user_id, i.item_id, i.rating.tolist(), i.timestamp.tolist()))


@pytest.mark.parametrize("protocol", ["temporal", "user-temporal", "cold-items", "random"])
def test_write_split_round_trips(tmp_path, protocol):
    """The written files load as a pre-split folder with exactly the split's rows, in its order.
    The source has CRLF lines, a blank line and rows under the card's positive threshold, so the
    file line of each kept row is not its row number."""
    source = tmp_path / "source"
    source.mkdir()
    lines = [f"{u}\t{i}\t{r}\t{t}" for (u, i, t), r in zip(ROWS, [4, 2, 5, 3, 1, 4, 5, 3, 4, 5, 3, 4, 2, 5])]
    lines.insert(5, "")
    (source / "p.inter").write_bytes((HEADER.rstrip("\n") + "\r\n" + "\r\n".join(lines) + "\r\n").encode())
    (source / "p.yaml").write_text("positive_threshold: 3\n")
    (source / "p.item").write_text("item_id:token\tname:token\n" + "".join(f"i{n}\tx{n}\n" for n in range(1, 6)))
    dataset = data.load(source)
    assert len(dataset.interactions) == 11  # rows 1, 4 and 12 are below 3
    split = dataset.split(protocol, test_share=0.4)
    out = protocols.write_split(dataset, split, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["p.item", "p.test.inter", "p.train.inter", "p.yaml"]
    again = data.load(out)
    presplit = again.split()
    assert presplit.protocol == "pre-split" and presplit.valid == 0
    assert _interactions_rows(presplit.train) == _interactions_rows(split.train)
    assert _interactions_rows(presplit.test) == _interactions_rows(split.test)


def test_write_split_refuses_the_source_folder_and_pre_split_data(small, tmp_path):
    split = small.split("temporal")
    with pytest.raises(data.DataError, match="write the split to another folder"):
        protocols.write_split(small, split, small.path)
    out = protocols.write_split(small, split, tmp_path / "out")
    presplit = data.load(out)
    with pytest.raises(data.DataError, match="already pre-split"):
        protocols.write_split(presplit, presplit.split(), tmp_path / "again")


def test_write_split_carries_the_card_it_was_loaded_with(tmp_path):
    """A card given apart from the folder (`--card`) renames the fields and drops rows under 3:
    the written folder must read the same with no card argument."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "p.inter").write_text("who:token\twhat:token\tstars:float\twhen:float\n" + "".join(
        f"{u}\t{i}\t{r}\t{t}\n" for (u, i, t), r in zip(ROWS, [4, 2, 5, 3, 1, 4, 5, 3, 4, 5, 3, 4, 2, 5])))
    card = tmp_path / "card.json"
    card.write_text('{"fields": {"user_id": "who", "item_id": "what", "rating": "stars", '
                    '"timestamp": "when"}, "positive_threshold": 3}')
    dataset = data.load(source, card=card)
    split = dataset.split("temporal", test_share=0.4)
    again = data.load(protocols.write_split(dataset, split, tmp_path / "out")).split()
    assert _interactions_rows(again.train) == _interactions_rows(split.train)
    assert _interactions_rows(again.test) == _interactions_rows(split.test)
