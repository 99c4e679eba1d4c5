"""The cross-encoder re-ranker on a tiny random BERT (vocab 99, hidden 32, 2 layers): pair text
from training rows only, groups without test items, the listwise loss against a hand-computed
value, the retrieval term of the final score, a training step that lowers the loss, and a tiny
end-to-end `train_reranker` whose saved re-ranker reloads to the same scores."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import tensorflow as tf
import transformers

from rerank import cross_encoder as ce
from rerank import tokenizer
from towers import data, metrics, peers

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
# Characters and continuation characters: every catalog word tokenizes, letter by letter.
TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
              + ["##" + c for c in string.ascii_lowercase] + list(string.digits)
              + ["##" + c for c in string.digits] + list(".,:;()'!?-&"))
TINY_CONFIG = ce.RerankerConfig(max_length=32, history_titles=2, layers=1, candidates=12,
                                group_size=4, holdout=400, validation_users=8, epochs=1,
                                batch_groups=4, learning_rate=1e-3)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    assert len(TINY_VOCAB) <= TINY["vocab_size"]
    tf.keras.utils.set_random_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bert")
    model = transformers.TFBertModel(transformers.BertConfig(**TINY))
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    return directory


@pytest.fixture(scope="module")
def tiny_base(tiny_bert, tmp_path_factory):
    return ce.write_base(tiny_bert, tmp_path_factory.mktemp("base"), layers=1)


@pytest.fixture(scope="module")
def tiny_split(movielens):
    return data.benchmark_split(movielens.ratings)


def _catalog() -> data.MovieLens:
    items = {"1": data.Item("1", "Toy Story", "1995", ("Animation", "Comedy")),
             "2": data.Item("2", "Heat", "1995", ("Action",)),
             "3": data.Item("3", "Fargo", "1996", ("Crime", "Drama"))}
    users = {"7": data.User("7", 24, "M", "technician", "85711")}
    rows = data.Ratings(np.array(["7", "7", "7"], object), np.array(["1", "2", "3"], object),
                        np.array([5.0, 3.0, 4.0], np.float32), np.array([10, 30, 20]))
    return data.MovieLens(rows, items, users)


def test_user_context_golden_newest_first():
    catalog = _catalog()
    contexts = ce.user_contexts(catalog, catalog.ratings, history_titles=2)
    assert contexts == {"7": "24-year-old man, technician. 3 stars: Heat (1995); Action. "
                             "4 stars: Fargo (1996); Crime, Drama."}
    assert ce.candidate_texts(catalog, np.array(["1"]))[0] == "Toy Story (1995); Animation, Comedy"


def test_pair_text_uses_training_rows_only(movielens, tiny_split):
    fit_rows, held_out = ce.split_rows(tiny_split.train, 2_000)
    texts = ce.PairTexts.build(movielens, fit_rows, np.array(sorted(movielens.items)), 50)
    context = dict(zip(texts.arrays["user_ids"], texts.arrays["contexts"]))
    fit_texts: dict[str, set[str]] = {}
    for user, item in zip(fit_rows.user_id, fit_rows.item_id):
        fit_texts.setdefault(user, set()).add(movielens.items[item].text())
    outside = [(u, i) for u, i in zip(np.concatenate([held_out.user_id, tiny_split.test.user_id]),
                                      np.concatenate([held_out.item_id, tiny_split.test.item_id]))]
    for user, item in outside[::10]:
        text = f"stars: {movielens.items[item].text()}."
        # A title the user also rated in the fit rows (a re-release, a same-named film) may appear.
        if movielens.items[item].text() not in fit_texts.get(user, ()):
            assert text not in context[user], (user, item)
    count = dict(zip(*np.unique(fit_rows.item_id.astype(str), return_counts=True)))
    np.testing.assert_allclose(texts.arrays["popularity"],
                               np.log1p([count.get(i, 0) for i in texts.arrays["item_ids"]]))
    # The EASE table is the peer's scores on the fit rows alone, rows and columns as the IDs.
    user_row = {u: r for r, u in enumerate(texts.arrays["user_ids"])}
    item_row = {i: r for r, i in enumerate(texts.arrays["item_ids"])}
    seen = np.zeros(texts.arrays["ease"].shape, bool)
    seen[[user_row[u] for u in fit_rows.user_id], [item_row[i] for i in fit_rows.item_id]] = True
    np.testing.assert_allclose(texts.arrays["ease"], peers.ease_scores(seen, ce.RerankerConfig.ease_l2),
                               rtol=1e-5, atol=1e-6)


def test_ease_lookup_in_graph_and_unknown_ids():
    texts = ce.PairTexts(np.array(["7", "8"]), np.array(["a", "b"]), np.array(["1", "2", "3"]),
                         np.array(["x", "y", "z"]), np.zeros(3),
                         np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    scores = texts.ease_score(tf.constant(["8", "7", "new-user", "7"]),
                              tf.constant(["3", "1", "1", "999"])).numpy()
    np.testing.assert_allclose(scores, [0.6, 0.1, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(texts.ease_rows(np.array(["8", "new-user"])),
                               [[0.4, 0.5, 0.6], [0.0, 0.0, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"ease \(2, 2\) must be \[users, items\] = \[2, 3\]"):
        ce.PairTexts(np.array(["7", "8"]), np.array(["a", "b"]), np.array(["1", "2", "3"]),
                     np.array(["x", "y", "z"]), np.zeros(3), np.zeros((2, 2)))


def test_groups_hold_training_positives_and_never_test_items(tiny_split):
    train = tiny_split.train
    fit_rows, held_out = ce.split_rows(train, 5_000)
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
    groups = ce.build_groups(scores, seen, users, items, k=50)
    assert 0 < len(groups) <= len(held_out)
    positives = set(zip(groups.user_row, groups.candidates[np.arange(len(groups)),
                                                           groups.positive]))
    assert positives <= set(zip(users, items))
    test_pairs = set(zip(*rows(tiny_split.test)))
    assert not positives & test_pairs
    negatives = groups.candidates[groups.negative]
    negative_users = np.broadcast_to(groups.user_row[:, None], groups.candidates.shape)[groups.negative]
    assert not seen[negative_users, negatives].any()
    assert not set(zip(negative_users, negatives)) & set(zip(users, items))
    assert not groups.negative[np.arange(len(groups)), groups.positive].any()
    with pytest.raises(ValueError, match="held-out pair is in `seen`"):
        ce.build_groups(scores, seen | True, users, items, k=50)


def test_split_rows_matches_retrieval_holdout(tiny_split):
    fit_rows, held_out = ce.split_rows(tiny_split.train, 100)
    assert len(fit_rows) == len(tiny_split.train) - 100 and len(held_out) == 100
    np.testing.assert_array_equal(held_out.item_id, tiny_split.train.item_id[-100:])
    with pytest.raises(ValueError, match="holdout must be between"):
        ce.split_rows(tiny_split.train, 0)


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
    texts = ce.PairTexts.build(movielens, rows, np.array(sorted(movielens.items)),
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


def test_training_step_lowers_loss(tiny_base, movielens, tiny_split):
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


def test_reordered_puts_reranked_top_k_first():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    ranking = metrics.rankings(ce.reordered(scores, np.array([[0, 1, 2]]),
                                            np.array([[0.0, 5.0, 1.0]])), depth=5)
    np.testing.assert_array_equal(ranking, [[1, 2, 0, 3, 4]])
    np.testing.assert_array_equal(ce.top_candidates(scores, np.array([[1, 0, 0, 0, 0]], bool), 2),
                                  [[1, 2]])


def test_train_reranker_end_to_end(tiny_run, tiny_bert, tmp_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")  # the session's tiny run stays retrieval-only
    tiny_run = tmp_path / "run"
    result = ce.train_reranker(tiny_run, checkpoint=tiny_bert, config=TINY_CONFIG, verbose=0)
    out = tiny_run / ce.RERANKER_DIR
    assert result["training"]["groups"] > 0 and len(result["training"]["loss"]) == 1
    assert set(result["validation"]["reranked_per_epoch"][0]) >= {"hit_rate@10", "ndcg@10"}
    assert json.loads((tiny_run / "metrics.json").read_text())["reranker"] == result
    assert json.loads((out / ce.CONFIG_FILE).read_text())["layers"] == 1
    assert list((out / "logs").iterdir())
    # The shadow retrieval model never saw the held-out rows.
    assert json.loads((out / "shadow" / "retrieval_config.json").read_text())["holdout"] == 400
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
