"""The synthetic dataset generator: files `data.load` reads cleanly, determinism, chunking, the
planted structure (checked by hand with numpy, no model), new items, errors and the CLI flags."""

from __future__ import annotations

import argparse
import re
import shlex
import warnings

import numpy as np
import pytest

from towers import data, files, synth

FILES = ("synth.inter", "synth.item", "synth.yaml")


def contents(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def load_quietly(folder) -> data.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return data.load(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth.synthesize(tmp_path_factory.mktemp("tiny"), 200, 100, 3000, topics=5,
                            progress=False)


def test_round_trip_counts_fields_and_card(tiny):
    """`data.load` reads exactly what was asked for: a wrong header, a card naming a missing field,
    a lost user or item, repeated (user, item) pairs or unsorted times fail here."""
    dataset = load_quietly(tiny)
    rows = dataset.interactions
    assert len(rows) == 3000
    assert len(dataset.user_ids()) == 200 and len(dataset.item_ids()) == 100
    assert dataset.implicit and dataset.has_time
    header = (tiny / "synth.inter").read_text().split("\n", 1)[0]
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    assert [(f.name, f.kind) for f in dataset.item_features()] == [("title", "text"),
                                                                   ("categories", "categories")]
    pairs = set(zip(rows.user_id, rows.item_id))
    assert len(pairs) == len(rows), "a user takes an item at most once"
    assert ((rows.timestamp >= synth.START) & (rows.timestamp <= synth.START + synth.SPAN)).all()
    same_user = rows.user_id[1:] == rows.user_id[:-1]
    assert (np.diff(rows.timestamp)[same_user] >= 0).all(), "each user's rows in time order"
    counts = np.unique(rows.user_id, return_counts=True)[1]
    assert counts.min() <= 3 and counts.max() >= 5 * np.median(counts), "skewed activity"


def test_card_text_titles_and_protocols(tiny):
    """The card's text template renders each item's own title and categories; titles are
    readable and unique; the temporal and cold-items protocols split the rows."""
    dataset = load_quietly(tiny)
    lines = (tiny / "synth.item").read_text().splitlines()
    assert lines[0] == "item_id:token\ttitle:token_seq\tcategories:token_seq"
    item_id, title, categories = lines[7].split("\t")
    assert dataset.item_texts([item_id]) == [f"{title}; {categories}"]
    assert dataset.facts([item_id])[0].title == title
    assert 1 <= len(categories.split()) <= 3
    titles = [line.split("\t")[1] for line in lines[1:]]
    assert len(set(titles)) == len(titles)
    assert all(t.split()[:3] == [w.capitalize() for w in t.split()[:3]] for t in titles)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        temporal = dataset.split("temporal")
        cold = dataset.split("cold-items")
    assert temporal.train.timestamp.max() <= temporal.test.timestamp.min()
    assert not set(cold.test.item_id) & set(cold.train.item_id)


def test_same_seed_same_bytes_other_seed_other_data(tiny, tmp_path):
    again = synth.synthesize(tmp_path / "again", 200, 100, 3000, topics=5, progress=False)
    assert contents(again) == contents(tiny)
    other = contents(synth.synthesize(tmp_path / "other", 200, 100, 3000, topics=5, seed=1,
                                      progress=False))
    assert other["synth.inter"] != contents(tiny)["synth.inter"]
    assert other["synth.item"] != contents(tiny)["synth.item"]


def test_chunks_do_not_change_the_files(tmp_path):
    """Users generated 7 at a time give the very files of one chunk: no random stream or
    state (activity, redraws, ratings, new items) depends on where a chunk starts."""
    options = dict(topics=6, explicit=True, new_item_share=0.2, progress=False)
    small = synth.synthesize(tmp_path / "small", 150, 120, 2500, chunk_users=7, **options)
    whole = synth.synthesize(tmp_path / "whole", 150, 120, 2500, chunk_users=10_000, **options)
    assert contents(small) == contents(whole)


def test_explicit_ratings_are_higher_on_preferred_topics(tmp_path):
    """1-5 ratings; rows of the user's most frequent category (the topic's, category_signal 1)
    rate at least a star higher than the others. Fails if ratings ignore the preference."""
    dataset = load_quietly(synth.synthesize(tmp_path, 500, 400, 5000, topics=16, explicit=True,
                                            category_signal=1.0, progress=False))
    assert not dataset.implicit
    rating = dataset.interactions.rating
    assert set(np.unique(rating)) == {1, 2, 3, 4, 5}
    users, items, _, _ = indices(dataset)
    first = np.unique([c[0] for c in dataset.items.columns["categories"]], return_inverse=True)[1]
    histogram = np.zeros((users.max() + 1, first.max() + 1))
    np.add.at(histogram, (users, first[items]), 1)
    preferred = histogram[users, first[items]] == histogram[users].max(axis=1)
    assert rating[preferred].mean() >= rating[~preferred].mean() + 1.0


# -- Planted structure, checked by hand: a topic-profile scorer against popularity ---------------


def indices(dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Each row's user and item position in `user_ids()` / `item_ids()`, and the two counts."""
    user_row = {u: k for k, u in enumerate(dataset.user_ids())}
    item_row = {i: k for k, i in enumerate(dataset.item_ids())}
    users = np.array([user_row[u] for u in dataset.interactions.user_id])
    items = np.array([item_row[i] for i in dataset.interactions.item_id])
    return users, items, len(user_row), len(item_row)


def token_shares(dataset: data.Dataset, field: str) -> np.ndarray:
    """float [items, tokens]: each item's tokens of `field`, as shares summing to 1."""
    column, row_of = dataset.items.columns[field], dataset.items.row_of()
    vocabulary = {t: k for k, t in enumerate(sorted({t for tokens in column for t in tokens}))}
    shares = np.zeros((len(row_of), len(vocabulary)))
    for position, item in enumerate(dataset.item_ids()):
        for token in column[row_of[item]]:
            shares[position, vocabulary[token]] = 1.0
    return shares / shares.sum(axis=1, keepdims=True)


def hit_rates(dataset: data.Dataset) -> dict[str, float]:
    """HR@10 on a seeded 20% of the rows (seen items excluded) of popularity (training counts)
    and of popularity x the user's training profile of title words or of categories."""
    users, items, n_users, n_items = indices(dataset)
    test = np.random.default_rng(0).random(len(users)) < 0.2
    seen = np.zeros((n_users, n_items), bool)
    seen[users[~test], items[~test]] = True
    popularity = np.bincount(items[~test], minlength=n_items) + 1.0
    scores = {"popularity": np.broadcast_to(popularity, (n_users, n_items))}
    for field in ("title", "categories"):
        shares = token_shares(dataset, field)
        profile = np.zeros((n_users, shares.shape[1]))
        np.add.at(profile, users[~test], shares[items[~test]])
        scores[field] = profile @ shares.T * popularity
    rates = {}
    for name, score in scores.items():
        top = np.argsort(-np.where(seen, -np.inf, score), axis=1, kind="stable")[:, :10]
        rates[name] = float((top[users[test]] == items[test][:, None]).any(axis=1).mean())
    return rates


def planted(folder, **options) -> dict[str, float]:
    return hit_rates(load_quietly(synth.synthesize(folder, 500, 400, 5000, topics=16,
                                                   progress=False, **options)))


def test_title_and_category_profiles_beat_popularity(tmp_path):
    """With the signals on, a user's title-word or category profile finds held-out items far
    better than popularity (~0.24 and ~0.21 against ~0.10); with them off, no better (fails if the
    text or categories ignore the topic, or the picks ignore the user's preference)."""
    on = planted(tmp_path / "on", text_signal=0.9, category_signal=0.9)
    assert on["title"] >= 1.8 * on["popularity"] and on["categories"] >= 1.8 * on["popularity"], on
    off = planted(tmp_path / "off", text_signal=0.0, category_signal=0.0)
    assert off["title"] <= 1.1 * off["popularity"], off
    assert off["categories"] <= 1.1 * off["popularity"], off


def test_text_only_puts_the_preference_in_titles_alone(tmp_path):
    """text_only: flat popularity and random categories (both ~0.03, chance level), while title
    words still find held-out items (~0.23)."""
    rates = planted(tmp_path, text_only=True, text_signal=0.9)
    assert rates["title"] >= 5 * rates["popularity"], rates
    assert rates["categories"] <= rates["popularity"] + 0.02, rates
    assert rates["categories"] <= 0.25 * rates["title"], rates


def test_new_items_appear_late_and_go_to_matching_users(tmp_path):
    """new_item_share: items whose rows all lie in the newest NEW_WINDOW of time, so the temporal
    protocol tests on items training never saw; their takers mostly prefer their topic (the
    item's category is among the user's two most frequent training categories: ~0.57, chance
    2/16). Without new items, hardly any test item is unseen."""
    folder = synth.synthesize(tmp_path / "new", 500, 400, 5000, topics=16, new_item_share=0.25,
                              category_signal=1.0, progress=False)
    dataset = load_quietly(folder)
    split = dataset.split("temporal")
    new = np.setdiff1d(split.test.item_id, split.train.item_id)
    assert len(new) >= 40
    cutoff = synth.START + (1 - synth.NEW_WINDOW) * synth.SPAN
    assert (dataset.interactions.timestamp[np.isin(dataset.interactions.item_id, new)]
            >= cutoff).all()
    category = {i: c[0] for i, c in zip(dataset.items.ids, dataset.items.columns["categories"])}
    taste: dict[str, dict[str, int]] = {}
    for user, item in zip(split.train.user_id, split.train.item_id):
        counts = taste.setdefault(user, {})
        counts[category[item]] = counts.get(category[item], 0) + 1
    fresh = set(new)
    matches = [category[item] in sorted(taste[user], key=taste[user].get)[-2:]
               for user, item in zip(split.test.user_id, split.test.item_id)
               if item in fresh and user in taste]
    assert len(matches) >= 50 and np.mean(matches) >= 0.4, (len(matches), np.mean(matches))

    old = load_quietly(synth.synthesize(tmp_path / "old", 500, 400, 5000, topics=16,
                                        progress=False)).split("temporal")
    assert len(np.setdiff1d(old.test.item_id, old.train.item_id)) <= 5


def test_new_words_name_new_items_with_words_no_old_item_has(tmp_path):
    """new_words: titles carry a topic's field words (old items the field's first OLD_WORDS, new
    items only the rest), so no word of a new item's title was ever in an old item's; the topic
    is still readable: both words of a title come from one field. New items have no training row
    under the temporal protocol. Too many topics for the fields is refused by name."""
    options = dict(topics=6, new_item_share=0.3, text_only=True, new_words=True, text_signal=1.0)
    folder = synth.synthesize(tmp_path / "words", 400, 300, 4000, progress=False, **options)
    dataset = load_quietly(folder)
    catalog = synth.Catalog.build(synth.SynthConfig(400, 300, 4000, **options))
    new = {str(i + 1) for i in np.flatnonzero(catalog.new)}
    assert len(new) >= 60
    split = dataset.split("temporal")
    assert new.isdisjoint(split.train.item_id)
    kinds = {k.lower() for k in synth.KINDS}
    titles = dict(zip(dataset.items.ids, (" ".join(t) for t in dataset.items.columns["title"])))
    words = lambda item_id: {w for w in titles[item_id].lower().split()
                             if w not in kinds and not w.isdigit()}
    old_words = set().union(*(words(i) for i in set(dataset.items.ids) - new))
    new_words = set().union(*(words(i) for i in new))
    assert new_words <= {w for field in synth.FIELDS[:6] for w in field[synth.OLD_WORDS:]}
    assert old_words <= {w for field in synth.FIELDS[:6] for w in field[:synth.OLD_WORDS]}
    field_of = {w: k for k, field in enumerate(synth.FIELDS) for w in field}
    assert all(len({field_of[w] for w in words(i)}) == 1 for i in dataset.items.ids)
    assert [field_of[min(words(str(i + 1)))] for i in range(20)] == list(catalog.topic[:20])
    assert "--new-words" in (folder / "synth.yaml").read_text()
    with pytest.raises(ValueError, match=rf"new_words names at most {len(synth.FIELDS)} topics"):
        synth.SynthConfig(100, 100, 1000, topics=len(synth.FIELDS) + 1, new_words=True)


# -- Errors, atomic writes, the CLI -------------------------------------------------------------


@pytest.mark.parametrize("arguments, options, named", [
    ((0, 100, 3000), {}, "users"),
    ((200, 0, 3000), {}, "items"),
    ((200, 100, 150), {}, "interactions (150) must be at least users"),
    ((200, 100, 20_000), {}, "interactions (20000) must be at most"),
    ((200, 100, 3000), {"topics": 101}, "topics"),
    ((200, 100, 3000), {"text_signal": 1.5}, "text_signal"),
    ((200, 100, 3000), {"new_item_share": 0.9}, "new_item_share"),
    ((200, 100, 3000), {"concentration": 0.0}, "concentration"),
    ((200, 100, 3000), {"name": "a/b"}, "name"),
])
def test_bad_arguments_name_the_argument_and_write_nothing(tmp_path, arguments, options, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        synth.synthesize(tmp_path / "out", *arguments, progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_holding_another_dataset(tiny, tmp_path):
    (tmp_path / "other.inter").write_text("user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(files.DataError, match="other.inter"):
        synth.synthesize(tmp_path, 200, 100, 3000, progress=False)


def test_a_crash_leaves_the_previous_dataset_whole(tmp_path, monkeypatch):
    """A failure in the second chunk leaves the earlier files byte for byte and no temporary
    file behind (fails if any file is written in place or renamed before the end)."""
    folder = synth.synthesize(tmp_path, 60, 40, 600, topics=4, progress=False)
    before = contents(folder)
    generate, calls = synth.generate, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return generate(*args)

    monkeypatch.setattr(synth, "generate", failing)
    with pytest.raises(MemoryError):
        synth.synthesize(tmp_path, 60, 40, 600, topics=4, seed=5, chunk_users=20, progress=False)
    assert contents(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)


def test_flags_and_the_cards_own_command_rewrite_the_same_files(tmp_path):
    """`add_arguments` flags reach the config, and the command the card records rebuilds the
    very same files (fails if a flag is dropped or mis-spelled in either direction, or a help
    text breaks `--help`)."""
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    assert "--new-item-share" in parser.format_help()
    first = synth.from_arguments(parser.parse_args(
        ["--users", "80", "--items", "60", "--interactions", "900", "--out", str(tmp_path / "a"),
         "--topics", "4", "--seed", "3", "--explicit", "--new-item-share", "0.1",
         "--text-signal", "0.8", "--popularity", "0.5", "--no-progress"]))
    card = (first / "synth.yaml").read_text()
    command = next(line for line in card.splitlines() if "cascade data synth" in line)
    flags = shlex.split(command.split("cascade data synth", 1)[1])
    assert "--explicit" in flags and "--text-only" not in flags
    second = synth.from_arguments(parser.parse_args(
        flags + ["--out", str(tmp_path / "b"), "--no-progress"]))
    assert contents(second) == contents(first)
    assert not load_quietly(first).implicit
