"""The one-call `cascade` SavedModel: every stage exported, the cascade equal to its parts
(retrieval -> re-rank -> top N -> copy), loading in a fresh process with TensorFlow and
tensorflow-text alone (and scann for the ScaNN variant), served over gRPC by `cascade serve`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import grpc
import numpy as np
import pyarrow.parquet as parquet
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from rerank import reasons
from rerank.copy import grounding, templates
from serving import cli, export
from serving.model_server import server
from serving.model_server import config as server_config
from towers import model as towers_model
from towers import runs

MODELS = ("query_tower", "candidate_tower", "retrieval", "reranker", "copywriter", "cascade")
USERS = ["1", "2", "nobody"]

# A fresh interpreter: only TensorFlow, tensorflow-text and, for the ScaNN variant, scann.
PROBE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text
if sys.argv[3] == "scann":
    import scann
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = fn(user_id=tf.constant(json.loads(sys.argv[2])))
print(json.dumps({
    "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_input_signature[1].items()},
    "outputs": {k: [v.dtype.name, v.shape.as_list() if v.shape.rank is not None else None]
                for k, v in fn.structured_outputs.items()},
    "values": {k: (v.numpy().astype(str).tolist() if v.dtype == tf.string else v.numpy().tolist())
               for k, v in out.items()},
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                      ("rerank", "towers", "serving", "transformers", "tf_keras", "tensorflow_recommenders")),
}))
"""


def _probe(version_dir, index_kind: str, tmp_path) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", PROBE, str(version_dir), json.dumps(USERS), index_kind],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _signature(version_dir):
    return tf.saved_model.load(str(version_dir)).signatures[export.SIGNATURE]


@pytest.fixture(scope="module")
def truth(tiny_cascade_run):
    """What the answers must respect: the catalog (labels, titles) and training items per user."""
    dataset, split = runs.run_data(tiny_cascade_run)
    seen = {}
    for user, item in zip(split.train.user_id, split.train.item_id):
        seen.setdefault(str(user), set()).add(str(item))
    return templates.catalog(dataset), seen


def test_every_model_is_exported_with_k_and_n_recorded(tiny_cascade_export):
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tiny_cascade_export / "models.config").read_text(), config)
    assert sorted(c.name for c in config.model_config_list.config) == sorted(MODELS)
    for name in MODELS:
        version = tiny_cascade_export / name / "1"
        assert (version / "saved_model.pb").is_file(), name
        assert (version / "assets.extra" / export.WARMUP_FILE).is_file(), name
    record = json.loads((tiny_cascade_export / "cascade" / "1" / "assets.extra" / export.RECORD_FILE).read_text())
    # k = 20 two-tower + 6 item-to-item + 2 new-item slots (the tiny re-ranker's sources).
    assert (record["k"], record["n"], record["index"], record["model"]) == (28, 5, "bruteforce", "cascade")
    # BERT re-scores the run's serve_depth (12, chosen when its re-ranker was trained), not k = 20.
    assert record["bert_depth"] == 12
    assert record["sources"] == {"two_tower": 20, "item_item": 6, "new_items": 2,
                                 "new_item_max_count": 0}
    # Warmup requests are real requests: the cascade's replays through its signature.
    for raw in tf.data.TFRecordDataset(str(tiny_cascade_export / "cascade" / "1" / "assets.extra" / export.WARMUP_FILE)):
        from tensorflow_serving.apis import prediction_log_pb2

        request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        users = tf.make_ndarray(request.inputs["user_id"])
        assert _signature(tiny_cascade_export / "cascade" / "1")(user_id=tf.constant(users))["copy"].shape == (len(users), 5)


def test_the_cascade_holds_each_table_once_in_its_variables(tiny_cascade_export, tiny_cascade_run):
    """The per-user and per-pair arrays are variables (in variables/, not constants in
    saved_model.pb, which may not pass 2 GiB), and the stages share them: one query tower, one
    set of re-ranker tables, though retrieval, re-ranker and copywriter each use them."""
    from rerank import cross_encoder

    _, tables = runs.load_run(tiny_cascade_run)
    texts = cross_encoder.load_reranker(tiny_cascade_run).texts
    shapes = dict(tf.train.list_variables(
        str(tiny_cascade_export / "cascade" / "1" / "variables" / "variables")))
    named = lambda suffix: [tuple(shape) for name, shape in shapes.items()
                            if name.endswith(f"{suffix}/.ATTRIBUTES/VARIABLE_VALUE")]
    id_dim = json.loads((tiny_cascade_run / runs.CONFIG_FILE).read_text())["id_dim"]
    pairs = texts.arrays["neighbour_index"].size
    assert [tuple(s) for s in shapes.values()].count((tables.num_user_ids, id_dim)) == 1
    assert named("seen_values") == [(len(tables.seen_items),)]
    assert named("context/values") == [(len(texts.arrays["user_ids"]) + 1,)]  # + unknown user
    assert named("history_values") == [(len(texts.arrays["history_values"]),)]
    assert named("weight_keys") == named("weight_values") == [(pairs + 1,)]  # + the last key


def _parts(export_dir, run, users: list[str]) -> dict:
    """The cascade rebuilt from its parts for `users`: retrieval's 28 merged candidates; the
    re-ranker's scalar terms (no BERT) keep 12 (the run's `serve_depth`: its re-ranker was
    trained on 12 candidates), in retrieval order; the `reranker` signature's scores of those;
    the top 5; the liked history items without which each would rank lower among the 12
    (`rerank.reasons`, in Python), the reasons their copy is written with."""
    from rerank import cross_encoder

    found = _signature(export_dir / "retrieval" / "1")(user_id=tf.constant(users))
    candidates, retrieval_scores = found["item_ids"].numpy(), found["scores"].numpy()  # [B, 28]
    origin = found["sources"].numpy()
    retrieval_model, tables = runs.load_run(run)
    temperature = retrieval_model.config.temperature
    reranker = cross_encoder.load_reranker(run)
    head = reranker.head_scores(np.array(users), candidates.astype(str),
                                retrieval_scores / temperature)
    keep = np.sort(np.argsort(-head, axis=1, kind="stable")[:, :12], axis=1)
    candidates, retrieval_scores, origin = (np.take_along_axis(a, keep, axis=1)
                                            for a in (candidates, retrieval_scores, origin))
    reranked = _signature(export_dir / "reranker" / "1")(
        user_id=tf.constant(users), item_ids=tf.constant(candidates))["scores"].numpy()
    served = np.argsort(-reranked, axis=1, kind="stable")[:, :5]
    finder = reasons.Reasons(reranker, retrieval_model.query_tower,
                             towers_model.embeddings(retrieval_model, tables)[1], tables.item_ids,
                             temperature)
    offered = finder(tf.constant(users), tf.constant(candidates),
                     tf.constant(retrieval_scores / temperature, tf.float32),
                     tf.constant(reranked), tf.constant(served)).numpy()
    return dict(candidates=candidates, retrieval_scores=retrieval_scores, origin=origin,
                reranked=reranked, served=served, offered=offered, merged=found)


def test_cascade_equals_retrieval_then_reranker_then_copywriter(tiny_cascade_export, truth,
                                                                tiny_cascade_run):
    """The cascade's items, scores and sources are `_parts`'; its lines are the copywriter's
    `with_reasons` signature's given the reasons `_parts` found, and it cites only those."""
    catalog, seen = truth
    cascade = _signature(tiny_cascade_export / "cascade" / "1")(user_id=tf.constant(USERS))
    parts = _parts(tiny_cascade_export, tiny_cascade_run, USERS)
    assert parts["merged"]["item_ids"].shape == (3, 28)
    assert b"item_item" in parts["merged"]["sources"].numpy()[:2]
    candidates, reranked = parts["candidates"], parts["reranked"]
    for b in range(len(USERS)):
        order = parts["served"][b]
        np.testing.assert_array_equal(cascade["item_ids"].numpy()[b], candidates[b][order])
        np.testing.assert_allclose(cascade["scores"].numpy()[b], reranked[b][order], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(cascade["retrieval_scores"].numpy()[b],
                                   parts["retrieval_scores"][b][order], rtol=1e-6)
        np.testing.assert_array_equal(cascade["sources"].numpy()[b], parts["origin"][b][order])
    offered = parts["offered"]
    assert (offered[:2] != b"").any() and (offered[:2, :, 0] == b"").any()  # both kinds served
    copywriter = tf.saved_model.load(str(tiny_cascade_export / "copywriter" / "1")).signatures
    copy = copywriter["with_reasons"](user_id=tf.constant(USERS), item_ids=cascade["item_ids"],
                                      reasons=tf.constant(offered))
    np.testing.assert_array_equal(cascade["copy"].numpy(), copy["copy"].numpy())
    np.testing.assert_array_equal(cascade["reasons"].numpy(), copy["reasons"].numpy())
    cited = cascade["reasons"].numpy()
    assert all(r in offered[b, n] for b, n in np.ndindex(cited.shape[:2]) for r in cited[b, n] if r)
    labels = [[catalog[i.decode()].label() for i in row] for row in cascade["item_ids"].numpy()]
    assert cascade["titles"].numpy().astype(str).tolist() == labels


def test_bert_depth_0_serves_the_scalar_terms_order_without_bert(tiny_cascade_run, tmp_path):
    """`--bert-depth 0` (where validation shows BERT adds nothing): the cascade serves the top 5 of
    all 28 merged candidates by the re-ranker's scalar terms alone (its head, no BERT term),
    recorded as depth 0; the same run at its serve_depth serves BERT's scores, which differ."""
    from rerank import cross_encoder

    base = tmp_path / "models"
    export.export(tiny_cascade_run, base, k=20, n=5, bert_depth=0,
                  models=("retrieval", "reranker", "copywriter", "cascade"))
    record = json.loads((base / "cascade" / "1" / "assets.extra" / "cascade_export.json").read_text())
    assert record["bert_depth"] == 0
    cascade = _signature(base / "cascade" / "1")(user_id=tf.constant(USERS))
    found = _signature(base / "retrieval" / "1")(user_id=tf.constant(USERS))
    candidates = found["item_ids"].numpy()
    retrieval_model, _ = runs.load_run(tiny_cascade_run)
    reranker = cross_encoder.load_reranker(tiny_cascade_run)
    head = reranker.head_scores(np.array(USERS), candidates.astype(str),
                                found["scores"].numpy() / retrieval_model.config.temperature)
    order = np.argsort(-head, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(cascade["item_ids"].numpy(), np.take_along_axis(candidates, order, 1))
    np.testing.assert_allclose(cascade["scores"].numpy(), np.take_along_axis(head, order, 1),
                               rtol=1e-5, atol=1e-5)
    # With BERT's term (the `reranker` signature) the same items score otherwise: the test tells.
    final = _signature(base / "reranker" / "1")(user_id=tf.constant(USERS),
                                                 item_ids=cascade["item_ids"])["scores"].numpy()
    assert np.abs(final - cascade["scores"].numpy()).max() > 1e-6
    with pytest.raises(export.ExportError, match="must be 0"):
        export.export(tiny_cascade_run, tmp_path / "bad", k=20, n=5, bert_depth=-1)


def test_a_users_line_for_an_item_is_the_same_in_every_request(tiny_cascade_export, truth,
                                                                tiny_cascade_run, tmp_path):
    """Issue #15 ("the same line everywhere"): a user's line for each of their cascade items is
    byte-identical from `cascade` beside 39 other users and alone, from `copywriter`'s
    `with_reasons` (given the cascade's reasons) asked for that item alone and with other users in
    the request and the item at another position, and from `cascade batch` (Beam, the `cascade`
    signature in batches). Catches sampling randomness
    drawn from the whole request or the row's position (the seed this replaced), and a salt that
    differs between the two models of one export. The sampled lines themselves are compared too
    (`details`' `generated`), since a served line may be the deterministic fallback, which would
    match by construction; and the reasons."""
    from serving import batch

    catalog, _ = truth
    cascade_model = tf.saved_model.load(str(tiny_cascade_export / "cascade" / "1"))
    copywriter_model = tf.saved_model.load(str(tiny_cascade_export / "copywriter" / "1"))
    # One export, one salt: the version, in both models.
    assert cascade_model.copywriter.salt.numpy() == copywriter_model.salt.numpy() == 1
    cascade = cascade_model.signatures[export.SIGNATURE]
    copywriter = copywriter_model.signatures["with_reasons"]
    users = [str(user) for user in range(1, 41)]
    among = cascade(user_id=tf.constant(users))
    row = 3
    user, items, lines = users[row], among["item_ids"].numpy()[row], among["copy"].numpy()[row]
    # The sampled lines themselves (before the checks, which a tiny model's lines may fail, so
    # that the served line is the deterministic fallback): from the saved `details` function.
    generated = copywriter_model.details(user_id=tf.constant([user]),
                                         item_ids=tf.constant([items]))["generated"].numpy()[0]
    assert len(set(generated)) == len(items) and all(generated)

    alone = cascade(user_id=tf.constant([user]))
    np.testing.assert_array_equal(alone["item_ids"].numpy()[0], items)
    np.testing.assert_array_equal(alone["copy"].numpy()[0], lines)
    np.testing.assert_array_equal(alone["reasons"].numpy()[0], among["reasons"].numpy()[row])
    before, after = users[row - 1], users[(row + 1) % len(users)]
    other = next(i for i in catalog if i not in items.astype(str))
    shifted = np.roll(items, 2)  # every item at another position, beside other users' requests
    requests = dict(user_id=tf.constant([before, user, after]), item_ids=tf.constant(
        [[*items[::-1], ""], [other, *shifted], [*shifted, other]]))
    parts = _parts(tiny_cascade_export, tiny_cascade_run, [before, user, after])
    np.testing.assert_array_equal(parts["candidates"][1][parts["served"][1]], items)
    mine, none = parts["offered"][1], np.full((1, 2), b"", dtype=object)
    shifted_reasons = np.roll(mine, 2, axis=0)  # the reasons travel with their items
    several = copywriter(**requests, reasons=tf.constant(np.stack([
        np.concatenate([mine[::-1], none]), np.concatenate([none, shifted_reasons]),
        np.concatenate([shifted_reasons, none])])))["copy"].numpy()
    several_generated = copywriter_model.details(**requests)["generated"].numpy()
    out = tmp_path / "batch"
    batch.run_batch(tiny_cascade_export, "cascade", [before, user, "nobody", after], out)
    table = parquet.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    batched = {r["user_id"]: r for r in table}
    assert batched[user]["item_ids"] == items.astype(str).tolist()
    for n, item in enumerate(items):
        single = copywriter(user_id=tf.constant([user]), item_ids=tf.constant([[item]]),
                            reasons=tf.constant([[mine[n]]]))["copy"]
        single_generated = copywriter_model.details(
            user_id=tf.constant([user]), item_ids=tf.constant([[item]]))["generated"]
        assert single_generated.numpy()[0, 0] == generated[n], item
        assert several_generated[1, 1 + (n + 2) % len(items)] == generated[n], item
        assert single.numpy()[0, 0] == lines[n], item
        assert several[1, 1 + (n + 2) % len(items)] == lines[n], item
        assert batched[user]["copy"][n] == lines[n].decode(), item
        assert batched[user]["reasons"][n] == [r.decode() for r in among["reasons"].numpy()[row, n]]


@pytest.mark.parametrize("index_kind", ["bruteforce", "scann"])
def test_cascade_loads_and_answers_in_a_fresh_process(index_kind, tiny_cascade_run, tiny_cascade_export,
                                                      truth, tmp_path):
    catalog, seen = truth
    if index_kind == "bruteforce":
        version = tiny_cascade_export / "cascade" / "1"
    else:
        version = export.export(tiny_cascade_run, tmp_path / "models", index_kind="scann", k=20, n=5,
                                models=("cascade",))["cascade"]
        assert json.loads((version / "assets.extra" / export.RECORD_FILE).read_text())["index"] == "scann"
    out = _probe(version, index_kind, tmp_path)
    assert out["modules"] == []
    assert out["inputs"] == {"user_id": ["string", [None]]}
    assert {name: dtype for name, (dtype, _) in out["outputs"].items()} == {
        "item_ids": "string", "titles": "string", "scores": "float32", "retrieval_scores": "float32",
        "sources": "string", "copy": "string", "reasons": "string"}
    values = out["values"]
    matcher = grounding.TitleMatcher(catalog)
    for b, user in enumerate(USERS):
        items = values["item_ids"][b]
        assert len(items) == len(set(items)) == 5
        assert not set(items) & seen.get(user, set()), f"user {user} got a training item"
        assert values["scores"][b] == sorted(values["scores"][b], reverse=True)
        assert values["titles"][b] == [catalog[i].label() for i in items]
        for item, line, cited in zip(items, values["copy"][b], values["reasons"][b]):
            # served copy is always grounded, and names no title but the reasons it returns
            assert matcher.check(line, item, [r for r in cited if r]) == (True, []), line
    # ... and the fresh process answers what the same SavedModel answers in this one
    here = _signature(version)(user_id=tf.constant(USERS))
    for name, tensor in here.items():
        if tensor.dtype == tf.string:
            assert values[name] == tensor.numpy().astype(str).tolist(), name
        else:
            np.testing.assert_allclose(values[name], tensor.numpy(), rtol=1e-5, err_msg=name)


def test_cascade_over_grpc_and_rest_through_the_client(tiny_cascade_export, tmp_path, capsys):
    """`cascade recommend` over gRPC and REST from `cascade serve` answers what it answers loading
    the export itself in a new process, as `make demo` runs it: there the CLI must register the
    tokenizer ops itself (a test process that imported tensorflow_text elsewhere would hide a
    CLI that does not)."""
    script = ("import sys; from serving import cli; sys.exit(cli.main(['recommend', "
              f"'--model-base-path', {str(tiny_cascade_export)!r}, '--model', 'cascade', "
              "'--user', '1', '--user', 'nobody', '--json']))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[2])})
    assert result.returncode == 0, result.stderr[-2000:]
    local_answer = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(local_answer) == {"1", "nobody"}
    assert all(len(rows) == 5 and all(r["copy"] for r in rows) for rows in local_answer.values())
    options = server.ServerOptions(server_config.config_for_base_path(tiny_cascade_export), port=0,
                                   rest_api_port=0)
    with server.Server(options).start() as running:
        answers = []
        for flags in (["--server", f"127.0.0.1:{running.grpc_port}", "--wait", "60"],
                      ["--rest", f"http://127.0.0.1:{running.rest_port}"]):
            assert cli.main(["recommend", "--model", "cascade", "--user", "1", "--user", "nobody",
                             "--json", *flags]) == 0
            answers.append(json.loads(capsys.readouterr().out))
        # The copywriter's second signature over gRPC: lines for a caller's own ranking and reasons.
        items = [[row["item_id"] for row in local_answer["1"]]]
        reasons = [[(row.get("reasons", []) + ["", ""])[:2] for row in local_answer["1"]]]
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "copywriter", "with_reasons"
        for key, value in (("user_id", ["1"]), ("item_ids", items), ("reasons", reasons)):
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=120)
    assert response.model_spec.signature_name == "with_reasons"
    local = tf.saved_model.load(str(tiny_cascade_export / "copywriter" / "1")).signatures[
        "with_reasons"](user_id=tf.constant(["1"]), item_ids=tf.constant(items),
                        reasons=tf.constant(reasons))
    for key in ("copy", "reasons"):
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs[key]), local[key].numpy())
    for answer in answers:
        for user in ("1", "nobody"):
            assert [r["item_id"] for r in answer[user]] == [r["item_id"] for r in local_answer[user]]
            assert [r["copy"] for r in answer[user]] == [r["copy"] for r in local_answer[user]]
            assert all(r["copy"] and r["title"] for r in answer[user])


def test_cascade_needs_both_stages_and_a_sane_n(tiny_run, tiny_cascade_run, tmp_path):
    with pytest.raises(export.ExportError, match="cascade train reranker --run"):
        export.export(tiny_run, tmp_path / "a", models=("cascade",))
    with pytest.raises(export.ExportError, match="n=30"):
        export.export(tiny_cascade_run, tmp_path / "b", k=20, n=30)
    with pytest.raises(export.ExportError, match=r"n=5: .* 1 to 4 items.*--bert-depth 4"):
        export.export(tiny_cascade_run, tmp_path / "b", k=20, n=5, bert_depth=4)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*/1"))
