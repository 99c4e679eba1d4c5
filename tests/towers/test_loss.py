"""The retrieval loss options of `towers.model.RetrievalModel` (logQ correction, accidental-hit
removal, mixed negatives) against a loss worked out by hand in numpy on a 3-user batch with fixed
embeddings: a broken option changes the number."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from towers import data, features, model

TEMPERATURE = 0.5
# Training interactions: i1 three times, i2 twice, i3 once, i4 never (probability 1/2, 1/3, 1/6, 0).
ROWS = [("u1", "i1"), ("u2", "i1"), ("u3", "i1"), ("u1", "i2"), ("u2", "i2"), ("u3", "i3")]
PROBABILITY = {"i1": 3 / 6, "i2": 2 / 6, "i3": 1 / 6, "i4": 0.0}
QUERY = {"u1": [1.0, 0.0], "u2": [0.6, 0.8], "u3": [0.0, 1.0]}
CANDIDATE = {"i1": [0.8, 0.6], "i2": [0.0, 1.0], "i3": [1.0, 0.0], "i4": [-0.6, 0.8]}
# The batch: u1 and u2 both have i1 as positive (an accidental hit for each other).
BATCH_USERS, BATCH_ITEMS = ["u1", "u2", "u3"], ["i1", "i1", "i2"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loss")
    (folder / "tiny.inter").write_text("user_id:token\titem_id:token\n"
                                       + "".join(f"{u}\t{i}\n" for u, i in ROWS))
    (folder / "tiny.item").write_text("item_id:token\n" + "".join(f"{i}\n" for i in CANDIDATE))
    dataset = data.load(folder)
    return features.build_tables(dataset, dataset.interactions, 4)


def fixed_model(tables, **options) -> model.RetrievalModel:
    """A RetrievalModel whose towers are replaced by the fixed embeddings above."""
    config = dataclasses.replace(model.RetrievalConfig(), temperature=TEMPERATURE, **options)
    retrieval = model.RetrievalModel(tables, config)
    item_ids = list(tables.item_ids)

    def query_tower(user_id, **_):
        return tf.constant([QUERY[u.decode()] for u in user_id.numpy()], tf.float32)

    def candidate_tower(item_id, **_):
        return tf.constant([CANDIDATE[i.decode()] for i in item_id.numpy()], tf.float32)

    def embed_rows(row, **_):  # row + 1, as the candidate tower's lookup returns
        return tf.constant([CANDIDATE[item_ids[r - 1]] for r in row.numpy()], tf.float32)

    retrieval.query_tower = query_tower
    retrieval.candidate_tower = candidate_tower
    retrieval.candidate_tower.embed_rows = embed_rows
    return retrieval


def expected_loss(columns: list[str], logq: bool, remove_hits: bool,
                  probability: dict[str, float]) -> float:
    """Summed softmax cross-entropy of each row's positive (column b for row b) over `columns`:
    cosine / temperature, minus log(probability) with logQ, other columns with the row's own
    positive item left out with accidental-hit removal."""
    q = np.array([QUERY[u] for u in BATCH_USERS])
    c = np.array([CANDIDATE[i] for i in columns])
    total = 0.0
    for b, positive in enumerate(BATCH_ITEMS):
        logits = q[b] @ c.T / TEMPERATURE
        if logq:
            logits = logits - np.log([probability[i] for i in columns])
        keep = [j == b or not (remove_hits and columns[j] == positive) for j in range(len(columns))]
        total -= logits[b] - np.log(np.sum(np.exp(logits[keep])))
    return total


def loss_of(retrieval) -> float:
    inputs = {"user_id": tf.constant(BATCH_USERS), "item_id": tf.constant(BATCH_ITEMS)}
    return float(retrieval.compute_loss(inputs, training=False))


def test_item_probability_is_the_share_of_training_rows(tables):
    """A count taken from the wrong table (users, or unique pairs) changes the shares."""
    np.testing.assert_allclose(tables.item_probability(),
                               [PROBABILITY[i] for i in tables.item_ids], rtol=1e-6)


@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("remove_hits", [False, True])
def test_in_batch_loss_matches_the_hand_computed_one(tables, logq, remove_hits):
    """Catches: logQ subtracting the log of the wrong item's probability (a row's instead of a
    column's), adding instead of subtracting it, or being ignored when on / applied when off;
    accidental hits not removed (or the positive itself removed); the temperature dropped. The
    four combinations give four different numbers (checked below), so each flag is seen."""
    retrieval = fixed_model(tables, logq_correction=logq, remove_accidental_hits=remove_hits,
                            mixed_negatives=0)
    expected = expected_loss(BATCH_ITEMS, logq, remove_hits, PROBABILITY)
    assert loss_of(retrieval) == pytest.approx(expected, rel=1e-5)


def test_the_options_change_the_loss():
    """Guards the test above: on this batch every option moves the hand-computed loss."""
    values = {(logq, hits): expected_loss(BATCH_ITEMS, logq, hits, PROBABILITY)
              for logq in (False, True) for hits in (False, True)}
    assert len({round(v, 4) for v in values.values()}) == 4


def test_mixed_negatives_add_uniform_catalog_columns(tables, monkeypatch):
    """Two extra negatives (i4, then i1) appended after the batch's columns, with per-draw
    probability count / catalog size / batch size (2 / 4 / 3) under logQ, and the extra i1
    removed as an accidental hit for u1 and u2. Catches: extra columns not appended, their
    probability on another scale (e.g. count / catalog, without the batch size), their IDs not
    passed to accidental-hit removal, or the draw's row offset (row + 1) lost."""
    drawn = tf.constant([4, 1], tf.int64)  # rows + 1 in tables.item_ids: i4, i1
    assert [tables.item_ids[r - 1] for r in drawn.numpy()] == ["i4", "i1"]
    uniform = tf.random.uniform

    def fixed_draw(shape, minval=0, maxval=None, dtype=tf.float32, **kwargs):
        if list(shape) == [2] and dtype.is_integer:
            assert (minval, maxval) == (1, 5)  # item rows + 1 of the whole catalog
            return tf.cast(drawn, dtype)
        return uniform(shape, minval, maxval, dtype=dtype, **kwargs)

    monkeypatch.setattr(tf.random, "uniform", fixed_draw)
    retrieval = fixed_model(tables, logq_correction=True, remove_accidental_hits=True,
                            mixed_negatives=2)
    columns = BATCH_ITEMS + ["i4", "i1"]
    # A column's probability: the batch columns their item's share, the extras 2 / 4 / 3 each
    # (i1 appears as both kinds; each column keeps its own).
    q = np.array([QUERY[u] for u in BATCH_USERS])
    c = np.array([CANDIDATE[i] for i in columns])
    log_p = np.log([PROBABILITY[i] for i in BATCH_ITEMS] + [2 / 4 / 3] * 2)
    expected = 0.0
    for b, positive in enumerate(BATCH_ITEMS):
        logits = q[b] @ c.T / TEMPERATURE - log_p
        keep = [j == b or columns[j] != positive for j in range(len(columns))]
        expected -= logits[b] - np.log(np.sum(np.exp(logits[keep])))
    assert loss_of(retrieval) == pytest.approx(expected, rel=1e-5)
    # Without the extra columns the number differs: the option is seen.
    assert expected != pytest.approx(expected_loss(BATCH_ITEMS, True, True, PROBABILITY), rel=1e-3)
