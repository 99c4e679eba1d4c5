"""Indexes: brute force against numpy, ScaNN against brute force, exclusions, SavedModel round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from towers import index

RNG = np.random.default_rng(7)
CANDIDATES = RNG.normal(size=(2000, 16)).astype(np.float32)
IDS = np.array([f"item{i}" for i in range(2000)])
QUERIES = RNG.normal(size=(8, 16)).astype(np.float32)


def test_bruteforce_equals_argsort():
    top = index.build_index("bruteforce", IDS, CANDIDATES, k=10)
    scores, ids = top(tf.constant(QUERIES))
    expected = np.argsort(-(QUERIES @ CANDIDATES.T), axis=1)[:, :10]
    assert [[i.decode() for i in row] for row in ids.numpy()] == IDS[expected].tolist()
    np.testing.assert_allclose(scores.numpy(), np.sort(QUERIES @ CANDIDATES.T, axis=1)[:, ::-1][:, :10],
                               rtol=1e-5)


def test_exhaustive_scann_matches_bruteforce():
    config = index.ScannConfig(num_leaves=20, num_leaves_to_search=20, num_reordering_candidates=2000)
    scann = index.build_index("scann", IDS, CANDIDATES, k=10, scann=config)
    brute = index.build_index("bruteforce", IDS, CANDIDATES, k=10)
    np.testing.assert_array_equal(scann(tf.constant(QUERIES))[1].numpy(), brute(tf.constant(QUERIES))[1].numpy())


@pytest.mark.parametrize("kind", index.KINDS)
def test_exclusions_are_never_returned(kind):
    top = index.build_index(kind, np.arange(2000, dtype=np.int32), CANDIDATES, k=60,
                            scann=index.ScannConfig(num_leaves=20, num_leaves_to_search=20))
    _, best = top(tf.constant(QUERIES[:2]))
    exclusions = best.numpy()[:, :50]  # each query's 50 best items
    exclusions[1, 40:] = -1  # padding never matches
    _, ids = top.query_with_exclusions(tf.constant(QUERIES[:2]), tf.constant(exclusions), k=10)
    for row in range(2):
        assert ids.shape[1] == 10 and not set(ids.numpy()[row]) & set(exclusions[row])
    assert list(ids.numpy()[0]) == list(best.numpy()[0, 50:60])


@pytest.mark.parametrize("kind", index.KINDS)
def test_saved_model_round_trip_in_a_fresh_process(kind, tmp_path):
    top = index.build_index(kind, IDS, CANDIDATES, k=5,
                            scann=index.ScannConfig(num_leaves=20, num_leaves_to_search=20))

    class Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.index = top

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32)])
        def serve(self, query):
            scores, ids = self.index(query)
            return {"scores": scores, "ids": ids}

    module = Module()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.serve},
                        options=index.save_options(kind))
    expected = module.serve(tf.constant(QUERIES))["ids"].numpy()
    probe = ("import json, sys, numpy as np, tensorflow as tf\n"
             + ("import scann\n" if kind == "scann" else "")
             + "fn = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
             "q = np.array(json.loads(sys.argv[2]), np.float32)\n"
             "print(json.dumps([[i.decode() for i in r] for r in fn(query=tf.constant(q))['ids'].numpy()]))\n")
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "m"), json.dumps(QUERIES.tolist())],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[i.decode() for i in r] for r in expected]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="index kind must be one of bruteforce, scann, got 'annoy'"):
        index.build_index("annoy", IDS, CANDIDATES, k=5)
    with pytest.raises(ValueError, match=r"must be \[N, D\] with N = len\(candidate_ids\) = 3"):
        index.build_index("bruteforce", IDS[:3], CANDIDATES, k=5)
    with pytest.raises(ValueError, match="k must be between 1 and the number of candidates"):
        index.build_index("bruteforce", IDS, CANDIDATES, k=5000)


def test_small_catalogs_cap_the_leaves():
    config = index.ScannConfig().for_catalog(1682)
    assert config.num_leaves == 168 and config.num_leaves_to_search <= 168


def test_scann_searches_enough_leaves_for_deep_queries():
    # 2,000 items in 20 leaves: 1 leaf searched holds ~100 items, too few for k = 300.
    ids = np.arange(2000, dtype=np.int32)
    top = index.build_index("scann", ids, CANDIDATES, k=300,
                            scann=index.ScannConfig(num_leaves=20, num_leaves_to_search=1))
    scores, found = top(tf.constant(QUERIES[:3]))
    assert found.shape == (3, 300) and not np.isnan(scores.numpy()).any()
    assert all(len(set(row)) == 300 for row in found.numpy())
