"""The re-ranker export on a tiny random BERT and the tiny retrieval run: the module's retrieval
logits are the run's (query tower, cold-start query for unknown users, over the temperature), its
scores are the in-process Reranker's, and the SavedModel gives the same scores in a fresh Python
that imports only tensorflow and tensorflow_text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import reranker_graph
from tests.conftest import TINY_RERANKER
from towers import cold_start
from towers import runs
from towers import model as towers_model

USERS = ["1", "2", "no-such-user"]
ITEMS = [["1", "50", "181", "7"], ["9", "8", "no-such-item", "6"], ["100", "1", "258", "288"]]


@pytest.fixture(scope="module")
def reranker_run(tiny_run, tiny_bert_dir, tmp_path_factory):
    """A copy of the tiny run with a tiny re-ranker (no copywriter: `tiny_cascade_run` has one)."""
    run = tmp_path_factory.mktemp("reranker-export") / "run"
    shutil.copytree(tiny_run, run)
    ce.train_reranker(run, checkpoint=tiny_bert_dir, config=ce.RerankerConfig(**TINY_RERANKER),
                      verbose=0)
    return run


@pytest.fixture(scope="module")
def module(reranker_run):
    return reranker_graph.RerankerModule.from_run(reranker_run)


def _expected_logits(run) -> np.ndarray:
    """The logits as training and `cascade evaluate reranker` compute them, in NumPy."""
    retrieval, tables = runs.load_run(run)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    user_row = {u: r for r, u in enumerate(tables.user_ids)}
    item_row = {i: r for r, i in enumerate(tables.item_ids)}
    cold = cold_start.popularity_query(candidates, tables.item_count)
    out = np.zeros((len(USERS), len(ITEMS[0])), np.float32)
    for b, (user, items) in enumerate(zip(USERS, ITEMS)):
        query = queries[user_row[user]] if user in user_row else cold
        for m, item in enumerate(items):
            if item in item_row:
                out[b, m] = query @ candidates[item_row[item]] / retrieval.config.temperature
    return out


def _inputs():
    return tf.constant(USERS), tf.constant(ITEMS)


def test_retrieval_logits_match_training(module, reranker_run):
    logits = module.retrieval_logits(*_inputs()).numpy()
    np.testing.assert_allclose(logits, _expected_logits(reranker_run), rtol=1e-5, atol=1e-4)
    assert logits[1, 2] == 0.0  # an unknown item has a zero embedding
    assert np.ptp(logits[2]) > 0  # the unknown user's cold-start query ranks by popularity


def test_serve_matches_in_process_reranker(module, reranker_run):
    users, items = _inputs()
    scores = module.serve(users, items)["scores"].numpy()
    assert scores.shape == (3, 4) and scores.dtype == np.float32
    reranker = ce.load_reranker(reranker_run)
    expected = reranker(dict(user_id=users, item_ids=items,
                             retrieval_score=tf.constant(_expected_logits(reranker_run)))).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.isfinite(scores).all()


def test_score_inside_another_function(module):
    """The cascade model calls `score` with its index's logits inside its own tf.function."""
    users, items = _inputs()
    logits = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) / 4)

    @tf.function(input_signature=[reranker_graph.USER_ID, reranker_graph.ITEM_IDS,
                                  tf.TensorSpec([None, None], tf.float32)])
    def outer(user_id, item_ids, retrieval_logits):
        return module.score(user_id, item_ids, retrieval_logits)

    np.testing.assert_allclose(outer(users, items, logits).numpy(),
                               module.score(users, items, logits).numpy(), rtol=1e-5, atol=1e-5)
    # The retrieval term moves the score by exactly its learned weight, plus the new-item
    # weight for items without a training interaction (an unknown one too: popularity 0).
    moved = module.score(users, items, logits + 1.0) - module.score(users, items, logits)
    encoder = module.reranker.encoder
    new = module.reranker.texts.popularity.lookup(tf.reshape(items, [-1])).numpy() == 0
    assert new.reshape(3, 4)[1, 2]  # "no-such-item"
    expected = (float(encoder.retrieval_weight) + float(encoder.new_item_gate)
                * float(encoder.new_retrieval_weight) * new.reshape(3, 4))
    np.testing.assert_allclose(moved.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_saved_model_in_a_fresh_process(module, tmp_path):
    path = reranker_graph.save(module, tmp_path / "reranker" / "1")
    users, items = _inputs()
    expected = module.serve(users, items)["scores"].numpy()
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # registers the tokenizer ops
        model = tf.saved_model.load({str(path)!r})
        serve = model.signatures["serving_default"]
        out = serve(user_id=tf.constant({USERS!r}), item_ids=tf.constant({ITEMS!r}))
        one = serve(user_id=tf.constant(["no-such-user"]), item_ids=tf.constant([["1", "2"]]))
        project = sorted(m for m in sys.modules
                         if m.split(".")[0] in ("rerank", "towers", "serving", "transformers"))
        print(json.dumps({{"scores": out["scores"].numpy().tolist(), "keys": sorted(out),
                          "one": one["scores"].numpy().shape, "project": project}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
                                                       "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["keys"] == ["scores"] and result["project"] == []
    assert result["one"] == [1, 2]
    np.testing.assert_allclose(np.array(result["scores"]), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="must be \\[I, D\\]"):
        reranker_graph.RerankerModule(None, None, np.zeros(4), np.array(["1", "2"]),
                                       np.zeros((3, 4)), 0.1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        reranker_graph.RerankerModule(None, None, np.zeros(4), np.array(["1"]),
                                       np.zeros((1, 4)), 0.0)


def test_from_run_without_reranker_names_the_command(tiny_run, tmp_path):
    # A copy without `reranker/` (another test module trains one into the session's tiny run).
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns(ce.RERANKER_DIR))
    with pytest.raises(FileNotFoundError, match="cascade train reranker"):
        reranker_graph.RerankerModule.from_run(run)
