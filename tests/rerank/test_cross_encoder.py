"""The cross-encoder re-ranker on a tiny random BERT (vocab 99, hidden 32, 2 layers): pair text
from the schema and training rows only (stars only for explicit ratings), groups without test
items, the listwise loss against a hand-computed value, the retrieval term of the final score, a
training step that lowers the loss, and a tiny end-to-end `train_reranker` whose saved re-ranker
reloads to the same scores and has a text for every user and item of the run."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import scipy.sparse
import tensorflow as tf

from rerank import config as rerank_config
from rerank import cross_encoder as ce
from rerank import negatives, pairs, ranking, rerank_eval
from rerank import tokenizer
from rerank.config import RerankerConfig
from tests.conftest import TINY_RERANKER, TINY_TRAIN
from towers import data, features, metrics, peers
from towers import runs

TINY_CONFIG = ce.RerankerConfig(**TINY_RERANKER)


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    """The session's tiny random BERT directory (conftest), under this module's older name."""
    return tiny_bert_dir


@pytest.fixture(scope="module")
def tiny_base(tiny_bert, tmp_path_factory):
    return ce.write_base(tiny_bert, tmp_path_factory.mktemp("base"), layers=1)


@pytest.fixture(scope="module")
def tiny_split(movielens):
    """The full MovieLens-100K random split (the benchmark's)."""
    return movielens.split("random")


def _write_dataset(folder, name: str, files: dict[str, list[str]]) -> data.Dataset:
    """Writes `<name>.<suffix>` for each suffix (header line first) and loads the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, lines in files.items():
        (folder / f"{name}.{suffix}").write_text("\n".join(lines) + "\n")
    return data.load(folder)


def _catalog(folder, card) -> data.Dataset:
    """Three rated films of user 7, two of user 9 (no user row) at one timestamp, user 8 with no
    ratings and item 4 with none, in ML-100K's files and card."""
    folder.mkdir(parents=True)
    (folder / "ml-100k.yaml").write_bytes(card.read_bytes())
    return _write_dataset(folder, "ml-100k", {
        "inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                  "7\t1\t5\t10", "7\t2\t3\t30", "7\t3\t4\t20", "9\t3\t4\t15", "9\t1\t5\t15"],
        "item": ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                 "1\tToy Story\t1995\tAnimation Comedy", "2\tHeat\t1995\tAction",
                 "3\tFargo\t1996\tCrime Drama", "4\tCasino\t1995\tDrama"],
        "user": ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
                 "7\t24\tM\ttechnician\t85711", "8\t53\tF\tother\t94043"]})


def test_user_context_golden_newest_first(movielens_dir, tmp_path):
    """ML-100K's format: demographics, then stars and item text of the newest ratings (a bug in
    the order, the tie-break by item ID, or a lone "." for a user without a user row fails)."""
    catalog = _catalog(tmp_path / "ml", movielens_dir / "ml-100k.yaml")
    assert not catalog.implicit
    contexts = pairs.user_contexts(catalog, catalog.interactions, catalog.user_ids(), history_titles=2)
    assert contexts == {
        "7": "24-year-old man, technician. 3 stars: Heat (1995); Action. "
             "4 stars: Fargo (1996); Crime Drama.",
        "8": "53-year-old woman, other.",  # a new user: demographics alone
        "9": "5 stars: Toy Story (1995); Animation Comedy. 4 stars: Fargo (1996); Crime Drama."}
    np.testing.assert_array_equal(pairs.candidate_texts(catalog, np.array(["1", "4"])),
                                  ["Toy Story (1995); Animation Comedy", "Casino (1995); Drama"])
    with pytest.raises(ValueError, match="user '9' of the training rows is not among the 2"):
        pairs.user_contexts(catalog, catalog.interactions, np.array(["7", "8"]))


def test_implicit_contexts_have_no_stars(tmp_path):
    """An implicit dataset without a user file: the newest items' texts alone, no "N stars:" (the
    rating is 1 everywhere, not a star count) and no lone "." for the missing user text."""
    dataset = _write_dataset(tmp_path / "x", "x", {
        "inter": ["user_id:token\titem_id:token\ttimestamp:float",
                  "u1\ti1\t100", "u1\ti2\t300", "u1\ti3\t200", "u2\ti2\t50"],
        "item": ["item_id:token\ttitle:token_seq\tgenre:token_seq",
                 "i1\tToy Story\tAnimation Comedy", "i2\tHeat\tAction",
                 "i3\tFargo\tCrime Drama", "i4\tCasino\tDrama"]})
    assert dataset.implicit and dataset.users is None
    user_ids = np.array(["u1", "u2", "u3"])  # u3: a user the files do not have
    contexts = pairs.user_contexts(dataset, dataset.interactions, user_ids, history_titles=2)
    assert contexts == {"u1": "Heat; Action. Fargo; Crime Drama.", "u2": "Heat; Action.",
                        "u3": ""}
    texts = pairs.PairTexts.build(dataset, dataset.interactions, user_ids, dataset.item_ids(), 2)
    np.testing.assert_array_equal(texts.arrays["contexts"], [contexts[u] for u in user_ids])
    np.testing.assert_array_equal(texts.arrays["item_texts"], [
        "Toy Story; Animation Comedy", "Heat; Action", "Fargo; Crime Drama", "Casino; Drama"])
    np.testing.assert_allclose(texts.arrays["popularity"], np.log1p([1, 2, 1, 0]), rtol=1e-6)


def test_popularity_term_counts_recent_rows_more_with_a_half_life(tmp_path):
    """Trending popularity: with a half-life of 100 timestamp units, i1's rows (ages 0 and 200)
    count 1 + 1/4 and i2's (age 100) 1/2; a row 10^6 units old still counts above 0 in float32
    (0 would mark i3 as a new item); i4 has no row."""
    dataset = _write_dataset(tmp_path / "x", "x", {
        "inter": ["user_id:token\titem_id:token\ttimestamp:float",
                  "u1\ti1\t1000000", "u2\ti1\t999800", "u1\ti2\t999900", "u2\ti3\t0"],
        "item": ["item_id:token\ttitle:token_seq", "i1\tHeat", "i2\tFargo", "i3\tCasino",
                 "i4\tBrazil"]})
    user_ids = np.array(["u1", "u2"])
    texts = pairs.PairTexts.build(dataset, dataset.interactions, user_ids, dataset.item_ids(), 2,
                                  popularity_half_life=100.0)
    popularity = texts.arrays["popularity"]
    np.testing.assert_allclose(popularity[:2], np.log1p([1.25, 0.5]), rtol=1e-6)
    assert popularity[2] > 0 and popularity[3] == 0
    all_time = pairs.PairTexts.build(dataset, dataset.interactions, user_ids, dataset.item_ids(), 2)
    np.testing.assert_allclose(all_time.arrays["popularity"], np.log1p([2, 1, 1, 0]), rtol=1e-6)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("None", None), ("86400", 86400.0)])
def test_popularity_half_life_setting(value, expected):
    assert rerank_config.half_life(RerankerConfig(popularity_half_life=value)) == expected


@pytest.mark.parametrize("value", ["0", "-3", "weekly", "inf", "nan"])
def test_bad_popularity_half_life_is_refused(value):
    with pytest.raises(ValueError, match=f"--popularity-half-life: expected auto, none or a "
                                         f"positive number .*got '{value}'"):
        rerank_config.half_life(RerankerConfig(popularity_half_life=value))


@pytest.mark.parametrize("card, prefix", [(None, "rated 4.5: "), ('text: {rating: "{rating}/5 "}\n', "4.5/5 ")])
def test_explicit_ratings_read_through_the_cards_template(tmp_path, card, prefix):
    """Explicit ratings precede each item text, worded by the card's `text.rating` (a stage that
    wrote MovieLens' "stars" for every dataset would fail the default case)."""
    files = {"inter": ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                       "u1\ti1\t4.5\t100"],
             "item": ["item_id:token\ttitle:token_seq", "i1\tHeat"]}
    if card:
        files["yaml"] = [card.rstrip("\n")]
    dataset = _write_dataset(tmp_path / "x", "x", files)
    contexts = pairs.user_contexts(dataset, dataset.interactions, np.array(["u1"]), history_titles=2)
    assert contexts == {"u1": f"{prefix}Heat."}


def test_pair_text_uses_training_rows_only(movielens, tiny_split):
    fit_rows, held_out = negatives.split_rows(tiny_split.train, 2_000)
    texts = pairs.PairTexts.build(movielens, fit_rows, movielens.user_ids(), movielens.item_ids(), 50)
    context = dict(zip(texts.arrays["user_ids"], texts.arrays["contexts"]))
    item_ids = movielens.item_ids()
    item_text = dict(zip(item_ids, movielens.item_texts(item_ids)))
    fit_texts: dict[str, set[str]] = {}
    for user, item in zip(fit_rows.user_id, fit_rows.item_id):
        fit_texts.setdefault(user, set()).add(item_text[item])
    outside = [(u, i) for u, i in zip(np.concatenate([held_out.user_id, tiny_split.test.user_id]),
                                      np.concatenate([held_out.item_id, tiny_split.test.item_id]))]
    for user, item in outside[::10]:
        text = f"stars: {item_text[item]}."
        # A title the user also rated in the fit rows (a re-release, a same-named film) may appear.
        if item_text[item] not in fit_texts.get(user, ()):
            assert text not in context[user], (user, item)
    count = dict(zip(*np.unique(fit_rows.item_id.astype(str), return_counts=True)))
    np.testing.assert_allclose(texts.arrays["popularity"],
                               np.log1p([count.get(i, 0) for i in texts.arrays["item_ids"]]))
    # The EASE term is the peer's weights on the fit rows alone, each item's 200 largest kept,
    # summed over each user's fit-row history.
    user_row = {u: r for r, u in enumerate(texts.arrays["user_ids"])}
    item_row = {i: r for r, i in enumerate(texts.arrays["item_ids"])}
    seen = np.zeros((len(user_row), len(item_row)), bool)
    seen[[user_row[u] for u in fit_rows.user_id], [item_row[i] for i in fit_rows.item_id]] = True
    dense = peers.ease_item_weights(seen, ce.RerankerConfig.ease_l2)
    keep = np.argsort(-np.abs(dense), axis=1, kind="stable")[:, :ce.RerankerConfig.ease_neighbours]
    pruned = np.zeros_like(dense)
    np.put_along_axis(pruned, keep, np.take_along_axis(dense, keep, 1), 1)
    users = np.array(["1", "13", "405", "new-user"])
    items = np.tile(texts.arrays["item_ids"][:40], (4, 1))
    expected = np.zeros((4, 40), np.float32)
    expected[:3] = (seen @ pruned)[[user_row[u] for u in users[:3]], :40]
    np.testing.assert_allclose(texts.ease_pairs(users, items), expected, rtol=1e-4, atol=1e-5)


def test_ease_lookup_in_graph_and_unknown_ids():
    """Histories: user 7 has items 1, 3; user 8 has item 2. Weights W[source, target] by hand:
    W[1->2] = 0.5, W[3->2] = -0.25, W[2->1] = 2, W[2->3] = 0.1 (rows 0, 1, 2 = items 1, 2, 3)."""
    texts = pairs.PairTexts(
        np.array(["7", "8"]), np.array(["a", "b"]), np.array(["1", "2", "3"]),
        np.array(["x", "y", "z"]), np.zeros(3),
        history_values=np.array([0, 2, 1]), history_splits=np.array([0, 2, 3]),
        neighbour_index=np.array([[1, 2], [0, 2], [1, 0]]),
        neighbour_weight=np.array([[0.5, 0.0], [2.0, 0.1], [-0.25, 0.0]]))
    users = ["7", "8", "8", "new-user", "7", "7"]
    items = ["2", "1", "3", "1", "999", "1"]
    expected = [0.5 - 0.25, 2.0, 0.1, 0.0, 0.0, 0.0]
    scores = texts.ease_score(tf.constant(users), tf.constant(items)).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_allclose(texts.ease_pairs(np.array(users), np.array(items)[:, None])[:, 0],
                               expected, rtol=1e-6)
    history, weights = texts.contributions(tf.constant(["7"]), tf.constant(["2"]))
    assert history.to_list() == [[0, 2]] and weights.to_list() == [[0.5, -0.25]]
    with pytest.raises(ValueError, match=r"history splits 2 must be users \+ 1 = 3"):
        pairs.PairTexts(np.array(["7", "8"]), np.array(["a", "b"]), np.array(["1", "2", "3"]),
                        np.array(["x", "y", "z"]), np.zeros(3), np.array([0]), np.array([0, 1]),
                        np.zeros((3, 1)), np.zeros((3, 1)))


def test_groups_hold_training_positives_and_never_test_items(tiny_split):
    train = tiny_split.train
    fit_rows, held_out = negatives.split_rows(train, 5_000)
    user_ids = np.unique(train.user_id.astype(str))
    item_ids = np.unique(np.concatenate([train.item_id, tiny_split.test.item_id]).astype(str))
    user_row = {u: r for r, u in enumerate(user_ids)}
    item_row = {i: r for r, i in enumerate(item_ids)}
    rows = lambda ratings: (np.array([user_row[u] for u in ratings.user_id]),
                            np.array([item_row[i] for i in ratings.item_id]))
    seen = np.zeros((len(user_ids), len(item_ids)), bool)
    seen[rows(fit_rows)] = True
    users, items = rows(held_out)
    scores = np.random.default_rng(0).normal(size=seen.shape)
    scores[users, items] += 2.0  # most held-out items reach the top-K
    groups = negatives.build_groups(scores, seen, users, items, k=50)
    assert 0 < len(groups) <= len(held_out)
    positives = set(zip(groups.user_row, groups.candidates[np.arange(len(groups)),
                                                           groups.positive]))
    assert positives <= set(zip(users, items))
    test_pairs = set(zip(*rows(tiny_split.test)))
    assert not positives & test_pairs
    negative_items = groups.candidates[groups.negative]
    negative_users = np.broadcast_to(groups.user_row[:, None], groups.candidates.shape)[groups.negative]
    assert not seen[negative_users, negative_items].any()
    assert not set(zip(negative_users, negative_items)) & set(zip(users, items))
    assert not groups.negative[np.arange(len(groups)), groups.positive].any()
    with pytest.raises(ValueError, match="held-out pair is in `seen`"):
        negatives.build_groups(scores, seen | True, users, items, k=50)
    # Scores read a block of users at a time and a sparse seen matrix give the same groups.
    lazy = negatives.build_groups(metrics.Scores(scores.shape, lambda r: scores[r]),
                                  scipy.sparse.csr_matrix(seen), users, items, k=50)
    for field in ("user_row", "candidates", "retrieval", "positive", "negative"):
        np.testing.assert_array_equal(getattr(lazy, field), getattr(groups, field), err_msg=field)


def test_split_rows_matches_retrieval_holdout(tiny_split):
    fit_rows, held_out = negatives.split_rows(tiny_split.train, 100)
    assert len(fit_rows) == len(tiny_split.train) - 100 and len(held_out) == 100
    np.testing.assert_array_equal(held_out.item_id, tiny_split.train.item_id[-100:])
    with pytest.raises(ValueError, match="holdout must be between"):
        negatives.split_rows(tiny_split.train, 0)


def test_train_reranker_rejects_holdout_of_the_whole_split(tiny_run, tmp_path):
    """The holdout is checked against the run's own training split (2,400 rows), before any
    training and before `reranker/` is written."""
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(ce.RERANKER_DIR))
    config = ce.RerankerConfig(**{**TINY_RERANKER, "holdout": TINY_TRAIN})
    with pytest.raises(ValueError, match=f"between 1 and {TINY_TRAIN - 1} \\(the split has "
                                         f"{TINY_TRAIN} training rows\\), got {TINY_TRAIN}"):
        ce.train_reranker(tmp_path / "run", config=config, verbose=0)
    assert not (tmp_path / "run" / ce.RERANKER_DIR).exists()


def test_listwise_loss_hand_computed():
    scores = tf.constant([[2.0, 1.0, 0.0], [0.0, 0.0, math.log(2.0)]])
    labels = tf.constant([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    first = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + 1.0))
    second = -(math.log(2.0) - math.log(1.0 + 1.0 + 2.0))
    np.testing.assert_allclose(ce.listwise_loss(labels, scores).numpy(), (first + second) / 2,
                               rtol=1e-6)


def _reranker(tiny_base, movielens, rows, config=TINY_CONFIG):
    tf.keras.utils.set_random_seed(1)
    encoder = ce.new_encoder(tiny_base, config)
    texts = pairs.PairTexts.build(movielens, rows, movielens.user_ids(), movielens.item_ids(),
                               config.history_titles)
    return ce.Reranker(encoder, texts, tokenizer.PairTokenizer.from_directory(tiny_base),
                       config.max_length)


def test_write_base_keeps_first_layers(tiny_bert, tiny_base):
    config = json.loads((tiny_base / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    encoder = ce.new_encoder(tiny_base, TINY_CONFIG)
    assert len(encoder.bert.bert.encoder.layer) == 1
    with pytest.raises(ValueError, match="layers must be between 1 and 2"):
        ce.write_base(tiny_bert, tiny_base.parent / "three", layers=3)


def test_final_score_uses_retrieval_score(tiny_base, movielens, tiny_split):
    reranker = _reranker(tiny_base, movielens, tiny_split.train)
    reranker.encoder.retrieval_weight.assign(0.7)
    reranker.encoder.popularity_weight.assign(0.2)
    reranker.encoder.ease_weight.assign(0.3)
    inputs = dict(user_id=tf.constant(["1", "2"]), item_ids=tf.constant([["1", "50"], ["7", "9"]]),
                  retrieval_score=tf.constant([[0.5, -1.0], [2.0, 0.0]]))
    before = reranker(inputs).numpy()
    after = reranker({**inputs, "retrieval_score": inputs["retrieval_score"] + 1.0}).numpy()
    np.testing.assert_allclose(after - before, 0.7, rtol=1e-5)
    # A fresh classifier is zero: the score is exactly the retrieval, popularity and EASE terms.
    popularity = reranker.texts.popularity.lookup(inputs["item_ids"]).numpy()
    ease = reranker.texts.ease_score(tf.constant(["1", "1", "2", "2"]),
                                     tf.reshape(inputs["item_ids"], [-1])).numpy().reshape(2, 2)
    assert np.abs(ease).max() > 0
    bias = float(reranker.encoder.classifier.bias[0])
    np.testing.assert_allclose(before, 0.7 * inputs["retrieval_score"].numpy() + 0.2 * popularity
                               + 0.3 * ease + bias, rtol=1e-5, atol=1e-6)
    ranked = reranker.rank("1", ["1", "50"], [0.5, -1.0])
    assert [item for item, _ in ranked] == ["1", "50"]


def test_training_step_lowers_loss(tiny_base, movielens, tiny_split, caplog):
    reranker = _reranker(tiny_base, movielens, tiny_split.train)
    inputs = dict(user_id=tf.constant(["1", "2", "3", "4"]),
                  item_ids=tf.constant([["1", "2", "3", "4"], ["50", "100", "181", "7"],
                                        ["9", "8", "7", "6"], ["300", "1", "258", "288"]]),
                  retrieval_score=tf.zeros([4, 4]))
    labels = tf.one_hot([0, 1, 2, 3], 4)
    reranker.compile(optimizer=ce.keras.optimizers.Adam(1e-2), loss=ce.listwise_loss)
    before = reranker.evaluate(inputs, labels, verbose=0)
    reranker.fit(inputs, labels, epochs=1, verbose=0)
    assert reranker.evaluate(inputs, labels, verbose=0) < before  # one step
    reranker.fit(inputs, labels, epochs=20, verbose=0)
    assert reranker.evaluate(inputs, labels, verbose=0) < before / 2
    # Every trainable weight gets a gradient: the unused [CLS] pooler is frozen, so Keras does not
    # warn "Gradients do not exist" at each training step.
    assert not [v.name for v in reranker.trainable_variables if "pooler" in v.name]
    assert "Gradients do not exist" not in caplog.text


def test_reordered_puts_reranked_top_k_first():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    order = metrics.rankings(ranking.reordered(scores, np.array([[0, 1, 2]]),
                                               np.array([[0.0, 5.0, 1.0]])), depth=5)
    np.testing.assert_array_equal(order, [[1, 2, 0, 3, 4]])
    np.testing.assert_array_equal(ranking.top_candidates(scores, np.array([[1, 0, 0, 0, 0]], bool), 2),
                                  [[1, 2]])
    # The lazy form: only the given rows are re-ordered, any other row keeps its scores.
    two = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    lazy = ranking.reranked(two, np.array([0]), np.array([[0, 1, 2]]), np.array([[0.0, 5.0, 1.0]]))
    np.testing.assert_array_equal(metrics.rankings(lazy, depth=5), [[1, 2, 0, 3, 4], [4, 3, 2, 1, 0]])


def test_a_run_trained_without_the_held_out_rows_is_its_own_shadow(tiny_run, tmp_path, monkeypatch):
    """No second retrieval model when the run's holdout is the re-ranker's; otherwise one is
    trained without those rows."""
    record = json.loads((tiny_run / "retrieval_config.json").read_text())
    trained = []
    monkeypatch.setattr(ce.towers_train, "train", lambda *a, **k: trained.append(k["holdout"]))
    monkeypatch.setattr(ce.runs, "load_run", lambda path: path)
    config = ce.RerankerConfig(**{**TINY_RERANKER, "holdout": 400})
    own = ce._shadow_retrieval(tiny_run, tmp_path / "shadow", {**record, "holdout": 400}, config, 0)
    assert own == tiny_run and trained == []
    other = ce._shadow_retrieval(tiny_run, tmp_path / "shadow", record, config, 0)
    assert other == tmp_path / "shadow" and trained == [400]


def test_train_reranker_end_to_end(tiny_run, tiny_bert, tmp_path, monkeypatch, caplog):
    shutil.copytree(tiny_run, tmp_path / "run")  # the session's tiny run stays retrieval-only
    tiny_run = tmp_path / "run"
    # As in a log file (stdout not a terminal): a progress line during fine-tuning, here at
    # every step instead of every minute.
    monkeypatch.setattr(ce.towers_train, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="towers.train"):
        result = ce.train_reranker(tiny_run, checkpoint=tiny_bert, config=TINY_CONFIG)
    steps = int(np.ceil(result["training"]["groups"] / TINY_CONFIG.batch_groups))
    assert f"epoch 1: step {steps}/{steps}, loss " in caplog.text
    out = tiny_run / ce.RERANKER_DIR
    assert result["training"]["groups"] > 0 and len(result["training"]["loss"]) == 1
    assert set(result["validation"]["reranked_per_epoch"][0]) >= {"hit_rate@10", "ndcg@10"}
    assert json.loads((tiny_run / "metrics.json").read_text())["reranker"] == result
    assert json.loads((out / ce.CONFIG_FILE).read_text())["layers"] == 1
    assert list((out / "logs").iterdir())
    # The popularity half-life was chosen on the held-out rows (all-time counts first, then the
    # span's fractions) and the config records the one used.
    chosen = result["training"]["popularity_half_life"]
    assert [r["half_life"] is None for r in chosen["tried"]] == [True] + [False] * 5
    recorded = json.loads((out / ce.CONFIG_FILE).read_text())["popularity_half_life"]
    assert recorded == ("none" if chosen["chosen"] is None else repr(chosen["chosen"]))
    # The shadow retrieval model never saw the held-out rows, and read the run's data and split.
    shadow_record = json.loads((out / "shadow" / "retrieval_config.json").read_text())
    run_record = json.loads((tiny_run / "retrieval_config.json").read_text())
    assert shadow_record["holdout"] == 400 and shadow_record["data"] == run_record["data"]
    reloaded = ce.load_reranker(tiny_run)
    assert reloaded.max_length == TINY_CONFIG.max_length
    # Trained weights, not a fresh model: the zero-initialised classifier has moved, and the
    # retrieval weight is the head fit's up to fine-tuning.
    assert np.abs(reloaded.encoder.classifier.kernel.numpy()).max() > 0
    np.testing.assert_allclose(float(reloaded.encoder.retrieval_weight),
                               result["training"]["head"]["retrieval_weight"], atol=0.05)
    inputs = dict(user_id=tf.constant(["1"]), item_ids=tf.constant([["1", "2", "3"]]),
                  retrieval_score=tf.constant([[1.0, 0.0, -1.0]]))
    first = reloaded(inputs).numpy()
    np.testing.assert_allclose(ce.load_reranker(tiny_run)(inputs).numpy(), first, rtol=1e-6)
    assert np.ptp(first) > 0
    # The run alone (the re-ranker read back, its validation rebuilt from the run's files) gives
    # the validation hit rate and NDCG at every BERT depth that training measured in memory.
    again = rerank_eval.validation_check(tiny_run).depths(ce.depth_grid(TINY_CONFIG.candidates))
    assert [row["depth"] for row in again] == [row["depth"] for row in result["validation"]["depths"]]
    for row, recorded in zip(again, result["validation"]["depths"]):
        assert row == pytest.approx(recorded, abs=2e-4), row["depth"]
    # Every user and item of the run has a text, those without a training interaction too: a new
    # user's context is their demographics alone, a rated user's has stars (ML-100K is explicit).
    _, tables = runs.load_run(tiny_run)
    arrays = reloaded.texts.arrays
    np.testing.assert_array_equal(arrays["user_ids"], tables.user_ids)
    np.testing.assert_array_equal(arrays["item_ids"], tables.item_ids)
    dataset, split = runs.run_data(tiny_run)
    np.testing.assert_array_equal(arrays["item_texts"], dataset.item_texts(tables.item_ids))
    # The test-time popularity term counts every training row, with that half-life.
    counts = peers.decayed_counts(features.rows_of(tables.item_ids, split.train.item_id, "item"),
                                  split.train.timestamp, len(tables.item_ids), chosen["chosen"])
    np.testing.assert_allclose(arrays["popularity"], np.log1p(counts), rtol=1e-5, atol=1e-7)
    trained = np.isin(tables.user_ids, split.train.user_id)
    assert 0 < trained.sum() < len(trained)  # the tiny run has users with and without rows
    new_users = tables.user_ids[~trained]
    np.testing.assert_array_equal(arrays["contexts"][~trained],
                                  [text + "." for text in dataset.user_texts(new_users)])
    assert all(" stars: " in context for context in arrays["contexts"][trained])
    new_user, new_item = new_users[0], tables.item_ids[tables.item_count == 0][0]
    scores = reloaded(dict(user_id=tf.constant([new_user]), item_ids=tf.constant([[new_item, "1"]]),
                           retrieval_score=tf.constant([[0.0, 0.0]]))).numpy()
    assert np.isfinite(scores).all()


def test_reasons_are_the_liked_history_items_that_raise_the_score_most():
    """User 7 has items 1, 2, 3 (item 2 not liked), user 8 item 2. Weights towards item 4 (row
    3): from 1: 0.2, from 2: 0.9 (not liked), from 3: 0.5; towards item 1: from 2: 2.0, from 3:
    -0.4. Expected by hand: (7, 4) -> 3 then 1 (2 is larger but not liked); (7, 1) -> none (3's
    weight is negative, 2 not liked); (8, 1) -> 2; unknown user or item -> none."""
    texts = pairs.PairTexts(
        np.array(["7", "8"]), np.array(["a", "b"]), np.array(["1", "2", "3", "4"]),
        np.array(["w", "x", "y", "z"]), np.zeros(4),
        history_values=np.array([0, 1, 2, 1]), history_splits=np.array([0, 3, 4]),
        neighbour_index=np.array([[3, 1], [3, 0], [3, 0], [0, 1]]),
        neighbour_weight=np.array([[0.2, 0.0], [0.9, 2.0], [0.5, -0.4], [0.0, 0.0]]),
        history_liked=np.array([True, False, True, True]))
    reasons = texts.reasons(tf.constant(["7", "7", "8", "new-user", "7"]),
                            tf.constant(["4", "1", "1", "4", "999"])).numpy().astype(str)
    np.testing.assert_array_equal(reasons, [["3", "1"], ["", ""], ["2", ""], ["", ""], ["", ""]])
    one = texts.reasons(tf.constant(["7"]), tf.constant(["4"]), count=1).numpy().astype(str)
    np.testing.assert_array_equal(one, [["3"]])


def test_liked_history_items_are_those_rated_at_least_the_threshold(movielens, tiny_split):
    """`history_liked` marks each (user, item) of the history whose best training rating is at
    least the threshold, checked against the rows directly."""
    rows = tiny_split.train
    texts = pairs.PairTexts.build(movielens, rows, np.unique(rows.user_id), np.unique(rows.item_id),
                                  2, liked_rating=4.0)
    best = {}
    for user, item, rating in zip(rows.user_id, rows.item_id, rows.rating):
        best[(user, item)] = max(best.get((user, item), 0.0), rating)
    arrays = texts.arrays
    splits = arrays["history_splits"]
    for row, user in enumerate(arrays["user_ids"][:50]):
        for position in range(splits[row], splits[row + 1]):
            item = arrays["item_ids"][arrays["history_values"][position]]
            assert arrays["history_liked"][position] == (best[(user, item)] >= 4.0), (user, item)
    assert 0 < arrays["history_liked"].mean() < 1
