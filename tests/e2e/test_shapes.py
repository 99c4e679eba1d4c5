"""Three dataset shapes other than MovieLens-100K run the whole cascade end to end at tiny size:
train retrieval, re-ranker and copywriter, evaluate, export, serve over gRPC, batch.

- implicit: no rating column, no user file, no card, and no flag beyond `--data`/`--run`
  (the README's bring-your-own-data promise: every user and item in the files is answered);
- renamed: fields renamed and reordered through a card, an extra free-text item field;
- presplit: `<name>.train.inter` / `<name>.test.inter` whose test holds users and items absent
  from train.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from serving import cli, export
from serving.model_server import server
from serving.model_server import config as server_config
from tests import conftest, shapes
from towers import data, features, runs

SHAPES = ("implicit", "renamed", "presplit")
TINY_FLAGS = ["--embedding-dim", "16", "--id-dim", "16", "--side-dim", "4", "--hidden", "32",
              "--history-length", "32", "--epochs", "4", "--batch-size", "128",
              "--learning-rate", "0.01"]


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, movielens_dir, tiny_bert_dir, tmp_path_factory):
    """(name, data folder, run, model base path) with every stage trained and exported."""
    from rerank import cross_encoder
    from rerank.copy import copywriter

    name = request.param
    root = tmp_path_factory.mktemp(f"shape-{name}")
    folder = getattr(shapes, name)(movielens_dir, root / "data", conftest.TINY_ROWS)
    run, models = root / "run", root / "models"
    assert cli.main(["train", "retrieval", "--data", str(folder), "--run", str(run), *TINY_FLAGS]) == 0
    cross_encoder.train_reranker(run, checkpoint=tiny_bert_dir, verbose=0,
                                 config=cross_encoder.RerankerConfig(**conftest.TINY_RERANKER))
    copywriter.train_copywriter(run, dataclasses.replace(conftest.tiny_copywriter_config(), epochs=1),
                                verbose=0)
    assert cli.main(["export", "--run", str(run), "--model-base-path", str(models), "--k", "20",
                     "--n", "5", "--models", "query_tower", "candidate_tower", "retrieval",
                     "cascade"]) == 0
    return name, folder, run, models


def _serve(version_dir, **inputs):
    fn = tf.saved_model.load(str(version_dir)).signatures[export.SIGNATURE]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in inputs.items()}).items()}


def test_every_user_and_item_in_the_files_is_answered(shape):
    """Known and new users get their own answers, new items their own embeddings: a dataset whose
    new users and items all fell back to one shared answer would fail here."""
    name, folder, run, models = shape
    dataset, split = runs.run_data(run)
    train_users, train_items = set(split.train.user_id), set(split.train.item_id)
    users, items = dataset.user_ids(), dataset.item_ids()
    towers = _serve(models / "query_tower" / "1", user_id=list(users))["embedding"]
    assert towers.shape == (len(users), 16)
    np.testing.assert_allclose(np.linalg.norm(towers, axis=1), 1.0, atol=1e-5)
    candidates = _serve(models / "candidate_tower" / "1", item_id=list(items))["embedding"]
    new_items = [r for r, i in enumerate(items) if i not in train_items]
    assert new_items, "the shape must have items without a training interaction"
    # New items share the cold ID row: their embeddings are a function of their features (the
    # same features, the same embedding; a bug giving them their own untrained ID rows fails
    # that), and features tell them apart (a tower ignoring features would give one for all;
    # pooling can merge a few rows, e.g. the same genres in another order).
    tables = features.FeatureTables.load(run / runs.TABLES_FILE)
    assert list(tables.item_ids) == list(items)
    _same_features_same_embedding(tables, "item", new_items, candidates)
    # Retrieval answers everyone with K distinct items, none from the user's training rows:
    # K = 20 two-tower + 6 item-to-item + 2 new-item slots (TINY_RERANKER's sources).
    answer = _serve(models / "retrieval" / "1", user_id=list(users))
    seen: dict[str, set] = {}
    for user, item in zip(split.train.user_id, split.train.item_id):
        seen.setdefault(user, set()).add(item)
    for b, user in enumerate(users):
        got = answer["item_ids"][b].astype(str)
        assert len(set(got)) == 28 and not set(got) & seen.get(user, set()), user
    if name == "presplit":
        new_users = sorted(set(split.test.user_id) - train_users)
        assert len(new_users) >= 8  # 8 planted (all their rows in test), more by chance
        rows = [list(users).index(u) for u in new_users]
        # With a user file, new users' queries come from their features.
        _same_features_same_embedding(tables, "user", rows, towers)


def _same_features_same_embedding(tables, side, rows, embeddings) -> None:
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        key = tuple(np.concatenate([np.ravel(tables.values[s.key][r]) for s in tables.side(side)]).tolist())
        groups.setdefault(key, []).append(r)
    for members in groups.values():
        np.testing.assert_allclose(embeddings[members], embeddings[members[:1]].repeat(len(members), 0),
                                   atol=1e-5)
    distinct = len({tuple(np.round(embeddings[r], 4)) for r in rows})
    assert distinct > len(groups) // 2 and distinct > 1, (distinct, len(groups))


def test_cascade_serves_over_grpc_with_titles_and_copy(shape, capsys):
    name, folder, run, models = shape
    dataset, split = runs.run_data(run)
    labels = dict(zip(dataset.item_ids(), dataset.labels(dataset.item_ids())))
    user = str(split.test.user_id[0])
    options = server.ServerOptions(server_config.config_for_base_path(models), port=0,
                                   rest_api_port=0)
    with server.Server(options).start() as running:
        assert cli.main(["recommend", "--server", f"127.0.0.1:{running.grpc_port}", "--wait", "60",
                         "--model", "cascade", "--user", user, "--user", "not-in-any-file",
                         "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    direct = _serve(models / "cascade" / "1", user_id=[user, "not-in-any-file"])
    for b, who in enumerate((user, "not-in-any-file")):
        assert len(answer[who]) == 5
        # over gRPC, the items, scores and copy the SavedModel answers loaded here
        assert [row["item_id"] for row in answer[who]] == direct["item_ids"][b].astype(str).tolist()
        np.testing.assert_allclose([row["score"] for row in answer[who]], direct["scores"][b],
                                   rtol=1e-5)
        assert [row["copy"] for row in answer[who]] == direct["copy"][b].astype(str).tolist()
        for row in answer[who]:
            assert row["title"] == labels[row["item_id"]]
            assert row["copy"]


def test_evaluate_names_the_protocol_and_batch_covers_every_user(shape, tmp_path, capsys):
    name, folder, run, models = shape
    assert cli.main(["evaluate", "retrieval", "--run", str(run), "--no-peers"]) == 0
    table = capsys.readouterr().out
    protocol = {"implicit": "random", "renamed": "random", "presplit": "pre-split"}[name]
    assert f"protocol: {protocol}" in table
    if name == "presplit":  # the re-ranker's evaluation on the hardest shape (its cost: the suite's)
        assert cli.main(["evaluate", "reranker", "--run", str(run), "--no-peers"]) == 0
        assert f"protocol: {protocol}" in capsys.readouterr().out
    out = tmp_path / "batch"
    assert cli.main(["batch", "--model-base-path", str(models), "--users", "all",
                     "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    users = data.load(folder).user_ids()
    assert summary["users_written"] == len(users) and summary["users_failed"] == 0
