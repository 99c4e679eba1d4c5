"""Feature tables of the tiny MovieLens data, the towers and a tiny training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import TINY_TRAIN
from towers import cold_start, data, features, model, runs


@pytest.fixture(scope="module")
def tiny(tiny_data_dir):
    dataset = data.load(tiny_data_dir)
    split = dataset.split()  # the card's protocol: random
    return dataset, split, features.build_tables(dataset, split.train, history_length=8)


def test_tables_hold_training_data_only(tiny):
    dataset, split, tables = tiny
    assert split.protocol == "random" and len(split.train) == TINY_TRAIN
    assert len(tables.user_ids) == 943 and len(tables.item_ids) == 1682
    item_row = {i: r for r, i in enumerate(tables.item_ids)}
    user = split.train.user_id[0]
    row = list(tables.user_ids).index(user)
    mine = split.train.user_id == user
    expected = [i for _, i in sorted(zip(split.train.timestamp[mine], split.train.item_id[mine]),
                                     key=lambda pair: (-pair[0], int(pair[1])))]
    kept = tables.history_of(row)
    assert list(kept) == [item_row[i] + 1 for i in expected[:8]]  # newest first, capped
    assert set(tables.seen_of(row)) == set(expected)
    test_pairs = set(zip(split.test.user_id, split.test.item_id))
    for r, user_id in enumerate(tables.user_ids):
        assert not {(user_id, i) for i in tables.seen_of(r)} & test_pairs
    assert tables.item_count.sum() == TINY_TRAIN
    # ID rows 1.. in ID order for the users and items of the training rows, 0 for the rest.
    trained_users = sorted(set(split.train.user_id), key=int)
    assert [tables.user_ids[r] for r in np.flatnonzero(tables.user_id_row)] == trained_users
    assert tables.user_id_row[tables.user_id_row > 0].tolist() == list(range(1, len(trained_users) + 1))
    assert tables.num_item_ids == len(set(split.train.item_id)) + 1


def test_movielens_card_features(tiny):
    """The card's six features, and values worked out from its boundaries and the files."""
    _, _, tables = tiny
    assert [(s.key, s.kind) for s in tables.specs] == [
        ("user:age", "number"), ("user:gender", "category"), ("user:occupation", "category"),
        ("item:movie_title", "text"), ("item:release_year", "number"), ("item:class", "categories")]
    item, user = list(tables.item_ids).index("1"), list(tables.user_ids).index("1")
    assert tables.values["item:release_year"][item] == 16  # 1995: from the last of 15 boundaries on
    assert tables.values["user:age"][user] == 2  # 24: in [18, 25)
    assert list(tables.vocabularies["user:gender"]) == ["M", "F"]  # 670 men, 273 women
    assert tables.values["user:gender"][user] == 1
    toy_story = tables.values["item:movie_title"][item]
    words = list(tables.vocabularies["item:movie_title"])
    assert "toy" not in words  # in one title only, under min_count 2: out of vocabulary (1)
    assert toy_story.tolist() == [1, words.index("story") + 2, 0, 0, 0, 0, 0, 0]
    genres = list(tables.vocabularies["item:class"])
    assert sorted(tables.values["item:class"][item][:3]) == sorted(
        genres.index(g) + 2 for g in ("Animation", "Children's", "Comedy"))


def test_target_is_hidden_from_its_own_history(tiny, tiny_config):
    tables = tiny[2]
    tower = model.QueryTower(tables, tiny_config)
    row = int(np.argmax(np.diff(tables.history_splits)))
    user = tf.constant([tables.user_ids[row]])
    in_history = tf.constant([int(tables.history_of(row)[0])], tf.int64)
    not_in_history = tf.constant([0], tf.int64)
    full = tower(user).numpy()
    assert np.allclose(tower(user, exclude_item=not_in_history).numpy(), full)
    assert not np.allclose(tower(user, exclude_item=in_history).numpy(), full)


def test_leave_one_out_is_the_query_without_each_item(tiny, tiny_config):
    """`leave_one_out` (each user's pooled sum less one item) equals `call` with that item
    excluded, for items in the history, an item outside it and a user with no history. Catches a
    sum taken over the wrong user, a count not lowered, or an item missing from the history
    treated as present."""
    tables = tiny[2]
    tower = model.QueryTower(tables, tiny_config)
    lengths = np.diff(tables.history_splits)
    rows = [int(np.argmax(lengths)), int(np.argmin(np.where(lengths > 0, lengths, lengths.max() + 1)))]
    users = [str(tables.user_ids[r]) for r in rows] + ["nobody"]
    outside = next(i for i in range(1, len(tables.item_ids) + 1)
                   if i not in set(tables.history_of(rows[0])))
    exclude = [[int(i) for i in tables.history_of(rows[0])[:3]] + [outside],
               [int(i) for i in tables.history_of(rows[1])[:1]], [outside]]
    got = tower.leave_one_out(tf.constant(users), tf.ragged.constant(exclude, tf.int32)).numpy()
    expected = tower(tf.constant([u for u, items in zip(users, exclude) for _ in items]),
                     exclude_item=tf.constant([i for items in exclude for i in items])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    full = tower(tf.constant(users[:1])).numpy()[0]
    assert not np.allclose(got[0], full) and np.allclose(got[3], full, atol=1e-6)


def test_a_step_touches_only_the_rows_of_its_batch(tiny, tiny_config):
    """The ID tables' gradients are sparse (the L2 penalty is on the batch's rows only), so a step
    costs the batch, not the table: at 1M users a whole-table penalty made every step dense."""
    _, split, tables = tiny
    retrieval = model.RetrievalModel(tables, tiny_config)
    batch = {"user_id": tf.constant(split.train.user_id[:16].astype(str)),
             "item_id": tf.constant(split.train.item_id[:16].astype(str))}
    retrieval.compute_loss(batch)  # builds the variables outside the tape
    with tf.GradientTape() as tape:
        total = retrieval.compute_loss(batch, training=True) + tf.add_n(retrieval.losses)
    tables_ = [retrieval.query_tower.user_embedding, retrieval.query_tower.history_embedding,
               retrieval.candidate_tower.item_embedding]
    grads = tape.gradient(total, [t.embeddings for t in tables_])
    assert all(isinstance(g, tf.IndexedSlices) for g in grads), [type(g) for g in grads]
    # The penalty is l2 x the squared norm of the distinct user rows of the batch (and of its item
    # and history rows); tiny_config has no cold dropout, so the rows are the users' own.
    users = np.unique(tables.user_id_row[features.rows_of(tables.user_ids, batch["user_id"].numpy(), "user")])
    user_table = retrieval.query_tower.user_embedding.embeddings.numpy()
    expected_users = tiny_config.l2 * np.square(user_table[users]).sum()
    assert len(retrieval.losses) == 3 and len(retrieval.query_tower.losses) == 2
    assert float(retrieval.query_tower.losses[0]) == pytest.approx(expected_users, rel=1e-5)


def test_lazy_adam_updates_only_the_rows_with_gradients():
    """Step 1 equals Adam's on the rows with a gradient (duplicates summed); on step 2 a row
    without a gradient stays where it is, where Adam's momentum would move it."""
    start = np.arange(10, dtype=np.float32).reshape(5, 2) / 10
    lazy, dense = tf.Variable(start), tf.Variable(start)
    lazy_opt, dense_opt = model.LazyAdam(0.1), model.LazyAdam(0.1)
    grad = tf.IndexedSlices(tf.constant([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]]),
                            tf.constant([1, 1, 3]), tf.constant([5, 2]))
    lazy_opt.apply_gradients([(grad, lazy)])
    dense_opt.apply_gradients([(tf.convert_to_tensor(grad), dense)])
    np.testing.assert_allclose(lazy.numpy(), dense.numpy(), atol=1e-6)
    assert lazy.numpy()[[0, 2, 4]].tolist() == start[[0, 2, 4]].tolist()
    assert not np.allclose(lazy.numpy()[[1, 3]], start[[1, 3]])
    after_one = lazy.numpy().copy()
    grad = tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([3]), tf.constant([5, 2]))
    lazy_opt.apply_gradients([(grad, lazy)])
    dense_opt.apply_gradients([(tf.convert_to_tensor(grad), dense)])
    np.testing.assert_array_equal(lazy.numpy()[1], after_one[1])
    assert not np.allclose(dense.numpy()[1], after_one[1])


def test_unknown_user_maps_to_the_out_of_vocabulary_row(tiny, tiny_config):
    tower = model.QueryTower(tiny[2], tiny_config)
    rows = tower.lookup(tf.constant(["no-such-user", tiny[2].user_ids[0]])).numpy()
    assert list(rows) == [0, 1]
    assert tower(tf.constant(["no-such-user"])).shape == (1, tiny_config.embedding_dim)


def test_tiny_training_run_lowers_the_loss_and_writes_the_run(tiny_run, tiny_config, tiny_data_dir):
    result = json.loads((tiny_run / runs.METRICS_FILE).read_text())
    losses = result["training"]["loss"]
    assert len(losses) == tiny_config.epochs
    assert losses[-1] < 0.9 * losses[0]
    record = json.loads((tiny_run / runs.CONFIG_FILE).read_text())
    assert record["embedding_dim"] == tiny_config.embedding_dim and "train_size" not in record
    assert record["data"] == {"data_dir": str(tiny_data_dir.resolve()), "card": None, "split": None,
                              "test_share": 0.2, "seed": 42, "protocol": "random"}
    assert (tiny_run / "checkpoints" / "epoch-01.index").exists()
    assert any((tiny_run / "logs").rglob("events.out.tfevents.*"))


def test_run_data_is_the_split_it_was_trained_on(tiny_run, tiny):
    _, split, _ = tiny
    dataset, again = runs.run_data(tiny_run)
    assert dataset.path == tiny[0].path.resolve()
    for part in ("train", "test"):
        for field in ("user_id", "item_id", "timestamp"):
            np.testing.assert_array_equal(getattr(getattr(again, part), field),
                                          getattr(getattr(split, part), field))


def test_run_reloads_with_the_same_embeddings(tiny_trained):
    """The run directory (config, feature tables, final weights) rebuilds the model training
    left in memory: every user's and item's embedding, not just their shapes."""
    run, (queries, candidates) = tiny_trained
    reloaded = model.embeddings(*runs.load_run(run))
    assert reloaded[1].shape == (1682, 16)
    np.testing.assert_allclose(reloaded[0], queries, atol=1e-6)
    np.testing.assert_allclose(reloaded[1], candidates, atol=1e-6)


def test_embedding_reuses_one_trace_that_reads_the_current_weights(tiny_run):
    """Embedding again (each epoch's validation does) reuses the tower's traced call instead of
    tracing anew, and that call reads the weights as they are now, not as they were traced."""
    retrieval, tables = runs.load_run(tiny_run)
    first = model.candidate_embeddings(retrieval, tables, batch_size=512)
    call = model._EMBED_CALLS[retrieval.candidate_tower]
    traces = call.experimental_get_tracing_count()
    model.candidate_embeddings(retrieval, tables, batch_size=512)
    assert call.experimental_get_tracing_count() == traces
    assert model._EMBED_CALLS[retrieval.candidate_tower] is call
    for weight in retrieval.candidate_tower.trainable_weights:
        weight.assign(weight * 0.5 + 0.01)
    changed = model.candidate_embeddings(retrieval, tables, batch_size=512)
    assert call.experimental_get_tracing_count() == traces
    eager = retrieval.candidate_tower(tf.constant(tables.item_ids[:700])).numpy()
    np.testing.assert_allclose(changed[:700], eager, atol=1e-5)
    assert np.abs(changed - first).max() > 1e-3


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="retrieval_config.json: not found"):
        runs.load_run(tmp_path)


def test_cold_start_query_follows_popularity():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(500, 8)).astype(np.float32)
    direction = rng.normal(size=8)
    counts = np.round(np.exp(2 + candidates @ direction)).astype(np.int64)
    query = cold_start.popularity_query(candidates, counts)
    assert np.isclose(np.linalg.norm(query), 1.0)
    top_by_query = set(np.argsort(-(candidates @ query))[:50])
    top_by_count = set(np.argsort(-counts, kind="stable")[:50])
    assert len(top_by_query & top_by_count) >= 40
    with pytest.raises(ValueError, match="must be \\[I, D\\]"):
        cold_start.popularity_query(candidates, counts[:10])


def test_keras_bookkeeping_does_not_walk_the_catalog(tiny, tiny_config):
    """`Model.metrics`, asked by Keras's progress bar after every batch once any callback has a
    batch hook (ours does), walks every list and dict the layers track. Nothing the towers track
    may grow with the users or items: the ID vocabularies as Python lists made a training step
    at a million users 6x slower."""
    _, _, tables = tiny
    retrieval = model.RetrievalModel(tables, tiny_config)
    walked, stack, seen = 0, list(retrieval._self_tracked_trackables), set()
    while stack:  # what tf_keras's Layer._flatten_modules visits
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        walked += 1
        if isinstance(value, tf.Module):
            stack.extend(getattr(value, "_self_tracked_trackables", None) or ())
        elif isinstance(value, tf.__internal__.tracking.TrackableDataStructure):
            stack.extend(value._values)
    assert walked < 200, (walked, len(tables.user_ids), len(tables.item_ids))


def test_progress_log_reports_step_loss_and_time_left(caplog):
    """In logs (no terminal), training says where it is within an epoch, not only at its end."""
    import logging

    import tf_keras as keras

    from towers import train

    toy = keras.Sequential([keras.layers.Dense(1)])
    toy.compile(optimizer="sgd", loss="mse")
    inputs = tf.data.Dataset.from_tensor_slices((np.ones((12, 2)), np.zeros((12, 1)))).batch(4)
    with caplog.at_level(logging.INFO, logger="towers.train"):
        toy.fit(inputs, epochs=1, verbose=0, callbacks=[train.ProgressLog(every=0.0)])
    lines = [r.getMessage() for r in caplog.records if r.name == "towers.train"]
    assert [line.split(",")[0] for line in lines] == [
        "epoch 1: step 1/3", "epoch 1: step 2/3", "epoch 1: step 3/3"]
    assert lines[0].endswith("min left") and "loss " in lines[0]
