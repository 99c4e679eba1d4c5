"""SavedModel exports: layout, signatures, and answers from a fresh process that imports only TF."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import export
from serving.model_server import config as server_config
from towers import cold_start, index, runs
from towers import model as towers_model

# Runs in a fresh interpreter: loads every exported model with nothing but TensorFlow and
# reports its signature and its answers for the given users.
PROBE = r"""
import json, sys
import tensorflow as tf
base, users, items = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for name, arg, values in (("query_tower", "user_id", users), ("candidate_tower", "item_id", items),
                          ("retrieval", "user_id", users)):
    fn = tf.saved_model.load(f"{base}/{name}/1").signatures["serving_default"]
    inputs = fn.structured_input_signature[1]
    result = fn(**{arg: tf.constant(values)})
    out[name] = {
        "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()},
        "outputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_outputs.items()},
        "values": {k: v.numpy().tolist() if v.dtype != tf.string else [[s.decode() for s in row] for row in v.numpy()]
                   for k, v in result.items()},
    }
# `import tensorflow` loads Keras itself; what matters is that nothing of ours or of TFRS was needed.
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("towers", "serving", "rerank", "tensorflow_recommenders", "scann"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tiny_export, tiny_run):
    _, tables = runs.load_run(tiny_run)
    busiest = np.argsort(-np.diff(tables.seen_splits), kind="stable")[:2]
    users = [str(tables.user_ids[busiest[0]]), str(tables.user_ids[busiest[1]]), "not-a-user"]
    items = [str(tables.item_ids[0]), str(tables.item_ids[5])]
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", PROBE, str(tiny_export), json.dumps(users),
                             json.dumps(items)], capture_output=True, text=True, timeout=300,
                            cwd=tiny_export, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), users, tables


def test_signatures_follow_the_contract(probe):
    out, _, _ = probe
    assert out["modules"] == []  # nothing of the project, TFRS or ScaNN was needed
    assert out["query_tower"]["inputs"] == {"user_id": ["string", [None]]}
    assert out["query_tower"]["outputs"] == {"embedding": ["float32", [None, 16]]}
    assert out["candidate_tower"]["inputs"] == {"item_id": ["string", [None]]}
    assert out["candidate_tower"]["outputs"] == {"embedding": ["float32", [None, 16]]}
    assert out["retrieval"]["inputs"] == {"user_id": ["string", [None]]}
    assert out["retrieval"]["outputs"] == {"item_ids": ["string", [None, 20]],
                                           "scores": ["float32", [None, 20]],
                                           "sources": ["string", [None, 20]]}
    assert out["retrieval"]["values"]["sources"] == [["two_tower"] * 20] * 3


def test_retrieval_matches_the_towers_and_never_returns_seen_items(probe):
    out, users, tables = probe
    queries = np.array(out["query_tower"]["values"]["embedding"])
    item_ids = out["retrieval"]["values"]["item_ids"]
    scores = np.array(out["retrieval"]["values"]["scores"])
    assert len(item_ids) == 3 and all(len(row) == 20 for row in item_ids)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    for row, user in enumerate(users[:2]):
        seen = set(tables.seen_of(list(tables.user_ids).index(user)))
        assert seen and not seen & set(item_ids[row])
        assert len(set(item_ids[row])) == 20



def test_retrieval_equals_exact_search_over_unseen_items(probe, tiny_run):
    out, users, tables = probe
    _, candidates = towers_model.embeddings(*runs.load_run(tiny_run))
    queries = np.array(out["query_tower"]["values"]["embedding"])
    for row, user in enumerate(users[:2]):
        seen = set(tables.seen_of(list(tables.user_ids).index(user)))
        scores = candidates @ queries[row]
        order = [tables.item_ids[i] for i in np.argsort(-scores) if tables.item_ids[i] not in seen]
        assert out["retrieval"]["values"]["item_ids"][row] == order[:20]
        np.testing.assert_allclose(out["retrieval"]["values"]["scores"][row],
                                   np.sort(scores[[i not in seen for i in tables.item_ids]])[::-1][:20],
                                   atol=1e-5)


def test_unknown_user_gets_the_cold_start_answer(probe, tiny_run):
    out, _, tables = probe
    _, candidates = towers_model.embeddings(*runs.load_run(tiny_run))
    expected = cold_start.popularity_query(candidates, tables.item_count)
    np.testing.assert_allclose(out["query_tower"]["values"]["embedding"][2], expected, atol=1e-5)
    top = [tables.item_ids[i] for i in np.argsort(-(candidates @ expected))[:20]]
    assert out["retrieval"]["values"]["item_ids"][2] == top  # nothing to exclude


def test_layout_warmup_and_models_config(tiny_export):
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tiny_export / "models.config").read_text(), config)
    assert [c.name for c in config.model_config_list.config] == ["query_tower", "candidate_tower", "retrieval"]
    assert all(c.base_path == str(tiny_export / c.name) for c in config.model_config_list.config)
    for name in ("query_tower", "candidate_tower", "retrieval"):
        version = tiny_export / name / "1"
        assert (version / "saved_model.pb").exists() and (version / "variables").is_dir()
        records = list(tf.data.TFRecordDataset(str(version / "assets.extra" / export.WARMUP_FILE)))
        log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
        assert log.predict_log.request.model_spec.name == name
        record = json.loads((version / "assets.extra" / export.RECORD_FILE).read_text())
        assert record["index"] == "bruteforce" and record["k"] == 20 and record["version"] == 1
    batching = server_config.read_batching_parameters(tiny_export / export.BATCHING_FILE)
    # TF Serving's CPU advice, sized for this machine: a thread and an enqueued batch per core
    threads = os.cpu_count() or 1
    assert (batching.max_batch_size, batching.batch_timeout_micros, batching.num_batch_threads,
            batching.max_enqueued_batches) == (128, 0, threads, threads)
    assert not any(p.name != ".staging" and not p.name.isdigit() and p.is_dir()
                   for name in ("query_tower", "retrieval") for p in (tiny_export / name).iterdir())


def test_reexport_adds_a_version_and_refuses_to_overwrite(tiny_run, tmp_path, caplog):
    base = tmp_path / "models"
    export.export(tiny_run, base, k=5)
    # The towers are built from the run, not from a Keras config: saving them does not warn
    # that their arguments could not be serialized (Keras did, twice per model).
    assert "non-serializable" not in caplog.text
    export.export(tiny_run, base, k=5)
    assert sorted(p.name for p in (base / "retrieval").iterdir()) == ["1", "2"]
    with pytest.raises(export.ExportError, match="already exists"):
        export.export(tiny_run, base, version=2, k=5)
    with pytest.raises(export.ExportError, match="choose a smaller --k"):
        export.export(tiny_run, base, k=5000)


def test_scann_export_serves_the_same_items_with_scann_imported(tiny_run, tmp_path):
    base = tmp_path / "models"
    export.export(tiny_run, base, index_kind="scann", k=10,
                  scann=index.ScannConfig(num_leaves=10, num_leaves_to_search=10,
                                          num_reordering_candidates=1682))
    export.export(tiny_run, base, index_kind="bruteforce", k=10)
    record = json.loads((base / "retrieval" / "1" / "assets.extra" / export.RECORD_FILE).read_text())
    assert record["index"] == "scann" and record["scann"]["num_leaves_to_search"] == 10
    probe = ("import sys, json, scann, tensorflow as tf\n"
             "ids = {}\n"
             "for v in ('1', '2'):\n"
             "    fn = tf.saved_model.load(sys.argv[1] + '/retrieval/' + v).signatures['serving_default']\n"
             "    ids[v] = fn(user_id=tf.constant(['1', '2', 'nobody']))['item_ids'].numpy().tolist()\n"
             "print(json.dumps({v: [[i.decode() for i in r] for r in rows] for v, rows in ids.items()}))\n")
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", probe, str(base)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["1"] == answers["2"]  # every leaf searched, every item re-scored: exact


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_scann_export_served_by_cascade_serve(tiny_run, tmp_path, capsys):
    """A real ScaNN export (not the faked import and load of tests/serving/test_server.py) served
    by `cascade serve` in a fresh process, over gRPC and REST, answers what the SavedModel
    answers in this process. Catches: the server loading a ScaNN export without importing scann
    (NotFoundError on `ScannSearchBatched`: the model never becomes available), the export record
    not marking the index, or the served signature differing from the exported one (other items
    or scores)."""
    import scann  # noqa: F401 (registers the ScaNN ops for the in-process load)

    from serving import cli

    base = tmp_path / "models"
    export.export(tiny_run, base, index_kind="scann", k=10, models=("retrieval",),
                  scann=index.ScannConfig(num_leaves=10, num_leaves_to_search=3,
                                          num_reordering_candidates=30))
    version = base / "retrieval" / "1"
    assert json.loads((version / "assets.extra" / export.RECORD_FILE).read_text())["index"] == "scann"
    users = ["1", "2", "nobody"]
    expected = tf.saved_model.load(str(version)).signatures[export.SIGNATURE](user_id=tf.constant(users))
    expected_ids = expected["item_ids"].numpy().astype(str)
    grpc_port, rest_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "serving.cli", "serve", "--model-base-path", str(base),
               "--port", str(grpc_port), "--rest_api_port", str(rest_port),
               "--file_system_poll_wait_seconds", "0"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            answers = []
            for flags in (["--server", f"127.0.0.1:{grpc_port}", "--wait", "120"],
                          ["--rest", f"http://127.0.0.1:{rest_port}"]):
                args = ["recommend", "--model", "retrieval", "--json", *flags]
                for user in users:
                    args += ["--user", user]
                assert cli.main(args) == 0, log.read_text()[-3000:]
                answers.append(json.loads(capsys.readouterr().out))
        finally:
            process.terminate()
            process.wait(timeout=60)
    for answer in answers:
        for row, user in enumerate(users):
            assert [r["item_id"] for r in answer[user]] == expected_ids[row].tolist()
            np.testing.assert_allclose([r["score"] for r in answer[user]],
                                       expected["scores"].numpy()[row], rtol=1e-5, atol=1e-6)


def test_merged_candidate_sources_in_the_graph_equal_the_numpy_merge(tiny_run, tmp_path):
    """The exported `retrieval` merges the two-tower, item-to-item and new-item sources exactly as
    `towers.sources.merged` does (the code evaluation and re-ranker training use): same items,
    same order, same sources, seen items never returned, and the unknown user (no history) gets
    no item-to-item candidates."""
    from towers import peers, sources

    base = tmp_path / "models"
    export.export(tiny_run, base, k=10, models=("retrieval",), item_item=8, new_items=4,
                  new_item_max_count=1)
    record = json.loads((base / "retrieval" / "1" / "assets.extra" / export.RECORD_FILE).read_text())
    assert record["k"] == 22 and record["sources"]["item_item"] == 8
    served = tf.saved_model.load(str(base / "retrieval" / "1")).signatures[export.SIGNATURE]
    retrieval, tables = runs.load_run(tiny_run)
    users = [str(u) for u in tables.user_ids[:40]] + ["nobody"]
    out = served(user_id=tf.constant(users))
    assert out["item_ids"].shape == (41, 22) and out["sources"].shape == (41, 22)

    queries, candidates = towers_model.embeddings(retrieval, tables)
    seen = tables.seen_matrix()
    neighbours = peers.ease_neighbours(seen, 500.0, 200)
    config = sources.SourceConfig(10, 8, 4, 1)
    rows, codes = sources.batched(queries[:40] @ candidates.T, seen[:40].toarray(), neighbours,
                                  tables.item_count, config)
    got = out["item_ids"].numpy().astype(str)
    got_sources = out["sources"].numpy().astype(str)
    np.testing.assert_array_equal(got[:40], tables.item_ids[rows])
    np.testing.assert_array_equal(got_sources[:40], np.array(sources.SOURCES)[codes])
    assert {"two_tower", "item_item", "new_item"} <= set(got_sources[:40].ravel())
    for row in range(40):
        assert not set(tables.seen_of(row)) & set(got[row])
    new = set(tables.item_ids[tables.item_count <= 1])
    assert all(item in new for item in got[:40][got_sources[:40] == "new_item"])
    # The unknown user: no history, so the item-to-item slots go to the next two-tower items;
    # the new-item source still has its 4.
    cold = (candidates @ cold_start.popularity_query(candidates, tables.item_count))[None, :]
    rows, codes = sources.merged(cold, np.zeros(cold.shape, bool), np.zeros(cold.shape),
                                 tables.item_count <= 1, config)
    np.testing.assert_allclose(out["scores"].numpy()[40], cold[0, rows[0]], atol=1e-5)
    assert sorted(got_sources[40]) == sorted(np.array(sources.SOURCES)[codes[0]])
    assert list(got_sources[40]).count("new_item") == 4 and "item_item" not in got_sources[40]
