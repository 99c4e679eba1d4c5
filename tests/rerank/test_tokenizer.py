"""The in-graph pair tokenizer: exact parity with the Hugging Face tokenizer on the MovieLens
catalog and user contexts (real MiniLM vocabulary), longest-first truncation, awkward text, and a
SavedModel that reloads with nothing but TensorFlow and tensorflow-text."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from rerank import checkpoint, tokenizer

KEYS = ("input_ids", "attention_mask", "token_type_ids")
# Text the catalog does not have but users and other catalogs may: accents and case (HF lowercases
# and strips accents character by character, it does not case-fold: ß stays, ﬁ is unknown),
# final sigma, dotted İ, control and format characters, CJK, emoji, literal special tokens, a word
# at HF's 100-character limit and one past it.
AWKWARD = [
    "Amélie (2001); Comedy, Romance", "Straße ÉCOLE naïve İstanbul ΌΣΟΣ ς", "ﬁ ﬃ Ⅻ ① ＡＢＣ x² 1½",
    "€100 — “quotes” ‘s’ …", "tab\there\nnew\x00ctrl\x07 \u200b zero\ufeffwidth a\x85b",
    "\ufffd replaced", "東京物語 (1953)", "emoji 🎬🍿 ok", "[SEP] [CLS] typed by a user",
    "x" * 100, "y" * 101, "", "   ", "x\u00a0y\u2003z\u3000w", "Ǆ ǅ Ǉ ǈ K\u212a",
]


@pytest.fixture(scope="module")
def minilm():
    return checkpoint.fetch_minilm()


@pytest.fixture(scope="module")
def pair_tokenizer(minilm):
    return tokenizer.PairTokenizer.from_directory(minilm)


@pytest.fixture(scope="module")
def reference(minilm):
    return tokenizer.reference_tokenizer(minilm)


@pytest.fixture(scope="module")
def catalog_pairs(movielens):
    """(user context, item text) for every item of the catalog, contexts cycling over 200 users."""
    rng = random.Random(0)
    item_ids = movielens.item_ids()
    titles = [fact.title for fact in movielens.facts(item_ids)]
    users = movielens.user_texts(rng.sample(list(movielens.user_ids()), 200))
    contexts = [f"{user}; recently liked: {'; '.join(rng.sample(titles, 3))}" for user in users]
    items = movielens.item_texts(item_ids)
    return [contexts[i % len(contexts)] for i in range(len(items))], items


def _assert_same(got: dict[str, tf.Tensor], expected, first, second):
    for key in KEYS:
        assert got[key].dtype == tf.int32 and got[key].shape == expected[key].shape, key
        bad = np.flatnonzero((got[key].numpy() != expected[key]).any(axis=1))
        assert not len(bad), (f"{key} differs for {len(bad)} pairs, first "
                              f"{first[bad[0]]!r} / {second[bad[0]]!r}")


@pytest.mark.parametrize("max_length", [32, 128])
def test_catalog_pairs_match_hugging_face(pair_tokenizer, reference, catalog_pairs,
                                          max_length):
    first, second = catalog_pairs
    got = pair_tokenizer.encode_pairs(tf.constant(first), tf.constant(second), max_length)
    expected = reference(first, second, truncation="longest_first", max_length=max_length,
                         padding="max_length", return_tensors="np")
    _assert_same(got, expected, first, second)
    kept = got["attention_mask"].numpy().sum(axis=1)
    if max_length == 32:
        assert (kept == 32).mean() > 0.5  # most pairs were truncated here
    else:
        assert (kept < 128).all()  # and none here


@pytest.mark.parametrize("lower_case", [True, False], ids=["uncased", "cased"])
def test_single_texts_match_hugging_face(minilm, movielens, lower_case):
    texts = movielens.item_texts(movielens.item_ids())
    texts += movielens.user_texts(movielens.user_ids()) + AWKWARD
    graph = tokenizer.PairTokenizer(minilm / "vocab.txt", lower_case=lower_case)
    reference = tokenizer.reference_tokenizer(minilm, lower_case=lower_case)
    got = graph.tokenize(tf.constant(texts)).to_list()
    expected = reference(texts, add_special_tokens=False)["input_ids"]
    assert [text for text, a, b in zip(texts, got, expected, strict=True) if a != b] == []
    # Bytes that are not UTF-8 (a client can send them) count as U+FFFD, which HF drops.
    invalid = b"caf\xe9 \xff\xfe au lait"
    assert graph.tokenize(tf.constant([invalid])).to_list() == reference(
        [invalid.decode("utf-8", "replace")], add_special_tokens=False)["input_ids"]


def test_longest_first_truncation_matches_hugging_face(pair_tokenizer, reference):
    # All pairs of up to 12 + 12 one-token words, budgets 5 and 6: nothing cut, only the longer
    # one cut, both cut to halves (odd budget: the extra token to the longer, the second on a tie).
    lengths = [(a, b) for a in range(13) for b in range(13)]
    first = [" ".join(["a"] * a) for a, _ in lengths]
    second = [" ".join(["b"] * b) for _, b in lengths]
    for max_length in (8, 9):
        got = pair_tokenizer.encode_pairs(tf.constant(first), tf.constant(second), max_length)
        expected = reference(first, second, truncation="longest_first", max_length=max_length,
                             padding="max_length", return_tensors="np")
        _assert_same(got, expected, first, second)
    keep = tokenizer.truncation_lengths(tf.constant([10, 2, 7, 4]), tf.constant([3, 9, 7, 4]),
                                        budget=9)
    assert [k.numpy().tolist() for k in keep] == [[6, 2, 4, 4], [3, 7, 5, 4]]


def test_saved_model_reloads_without_python_code(pair_tokenizer, reference, catalog_pairs,
                                                 tmp_path):
    first, second = (texts[:40] + AWKWARD for texts in catalog_pairs)

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.tokenizer = pair_tokenizer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)] * 2)
        def serve(self, first, second):
            return self.tokenizer.encode_pairs(first, second, max_length=24)

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "m"),
                        signatures={"serving_default": module.serve})
    expected = reference(first, second, truncation="longest_first", max_length=24,
                         padding="max_length", return_tensors="np")
    _assert_same(module.serve(tf.constant(first), tf.constant(second)), expected, first, second)
    probe = ("import json, sys\n"
             "import tensorflow as tf, tensorflow_text\n"
             "fn = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
             "first, second = json.loads(sys.argv[2])\n"
             "out = fn(first=tf.constant(first), second=tf.constant(second))\n"
             "assert not {'transformers', 'rerank', 'towers'} & set(sys.modules)\n"
             "print(json.dumps({k: [v.dtype.name, v.numpy().tolist()] for k, v in out.items()}))\n")
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "m"), json.dumps([first, second])],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(reloaded) == sorted(KEYS)
    for key in KEYS:
        assert reloaded[key][0] == "int32"
        np.testing.assert_array_equal(np.array(reloaded[key][1]), expected[key], err_msg=key)


def test_bad_vocabularies_and_lengths(pair_tokenizer, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"nowhere/vocab.txt: file not found"):
        tokenizer.PairTokenizer(tmp_path / "nowhere" / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"vocab.txt: no special token\(s\) \[CLS\], \[SEP\]"):
        tokenizer.PairTokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match=r"max_length must be at least 3"):
        pair_tokenizer.encode_pairs(tf.constant(["a"]), tf.constant(["b"]), max_length=2)
