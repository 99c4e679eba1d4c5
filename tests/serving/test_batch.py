"""`cascade batch`: the Beam pipeline over a real export, its dead letter and its outputs."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow.parquet as parquet
import pytest
import tensorflow as tf

from serving import batch, cli


def _in_process(model_dir: pathlib.Path, users: list[str]) -> dict[str, list[str]]:
    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    ids = fn(user_id=tf.constant(users))["item_ids"].numpy()
    return {u: [i.decode() for i in row] for u, row in zip(users, ids)}


def test_every_user_gets_the_served_answer(tiny_export, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["batch", "--model-base-path", str(tiny_export), "--users", "all",
                     "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["users_read"] == summary["users_written"] == 943 and summary["users_failed"] == 0
    table = parquet.read_table(sorted(out.glob("recommendations-*.parquet"))).to_pylist()
    assert len(table) == 943 and len({r["user_id"] for r in table}) == 943
    by_user = {r["user_id"]: r for r in table}
    sample = ["1", "2", "50", "943"]
    for user, items in _in_process(tiny_export / "retrieval" / "1", sample).items():
        assert by_user[user]["item_ids"] == items
        assert len(by_user[user]["scores"]) == 20
    lines = (out / "sample.jsonl").read_text().splitlines()
    assert len(lines) == batch.SAMPLE_SIZE and set(json.loads(lines[0])) == {
        "user_id", "item_ids", "scores", "sources"}
    assert (out / "failed.jsonl").read_text() == ""


def test_tfrecord_output_and_rerun_replaces_the_folder(tiny_export, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale-from-an-earlier-run.parquet").write_text("old")
    users = tmp_path / "users.txt"
    users.write_text("1\n2\n\nnobody\n")
    summary = batch.run_batch(tiny_export, "retrieval", batch.read_users(str(users), {}), out, "tfrecord")
    assert summary["users_written"] == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUMMARY.json", "failed.jsonl", "recommendations-00000-of-00001.tfrecord", "sample.jsonl"]
    records = [tf.train.Example.FromString(r.numpy()) for r in
               tf.data.TFRecordDataset(str(out / "recommendations-00000-of-00001.tfrecord"))]
    users_seen = {e.features.feature["user_id"].bytes_list.value[0].decode() for e in records}
    assert users_seen == {"1", "2", "nobody"}
    assert all(len(e.features.feature["scores"].float_list.value) == 20 for e in records)
    assert not list(tmp_path.glob(".out.*"))  # no staging or old folder left behind


def test_sigterm_stops_the_job_with_an_error_and_keeps_the_previous_output(tiny_export, tmp_path):
    """A scheduler's SIGTERM mid-pipeline: exit code 143 (not 0), the staging folder removed, and
    the previous output as it was."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.parquet").write_text("kept")
    job = subprocess.Popen([sys.executable, "-m", "serving.cli", "batch", "--model-base-path",
                            str(tiny_export), "--model", "retrieval", "--users", "synthetic:2000000",
                            "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.staging-*")) and job.poll() is None:  # the pipeline runs
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert b"stopped by signal 15" in stderr
    assert not list(tmp_path.glob(".out.*"))
    assert [p.name for p in out.iterdir()] == ["previous.parquet"]
    assert (out / "previous.parquet").read_text() == "kept"


def test_a_failing_user_goes_to_the_dead_letter(tmp_path):
    class Picky(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
        def serve(self, user_id):
            tf.debugging.assert_none_equal(user_id, tf.constant("poison"), message="poisoned user")
            return {"item_ids": tf.stack([user_id, user_id], axis=1),
                    "scores": tf.ones([tf.shape(user_id)[0], 2])}

    module = Picky()
    tf.saved_model.save(module, str(tmp_path / "models" / "retrieval" / "1"),
                        signatures={"serving_default": module.serve})
    users = [str(i) for i in range(50)] + ["poison"]
    summary = batch.run_batch(tmp_path / "models", "retrieval", users, tmp_path / "out")
    assert (summary["users_read"], summary["users_written"], summary["users_failed"]) == (51, 50, 1)
    (failed,) = [json.loads(line) for line in (tmp_path / "out" / "failed.jsonl").read_text().splitlines()]
    assert failed["user_id"] == "poison" and "poisoned user" in failed["error"]
    table = parquet.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert sorted(r["user_id"] for r in table) == sorted(users[:50])


def test_users_sources(tmp_path):
    known = [str(i) for i in range(1, 944)]
    population = batch.synthetic_users(2_000, known)
    assert population == batch.synthetic_users(2_000, known) and len(set(population)) == 2_000
    assert population[:3] == ["1", "2", "3"] and population[943].startswith("synthetic-")
    bad = tmp_path / "users.csv"
    bad.write_text("1\n2,3\n")
    with pytest.raises(ValueError, match=r"users.csv:2: expected one user ID per line"):
        batch.read_users(str(bad), {})
    with pytest.raises(FileNotFoundError, match="users file not found"):
        batch.read_users(str(tmp_path / "missing.txt"), {})
    assert batch.read_users("synthetic:3", {}) == batch.synthetic_users(3)  # no export: all synthetic
    assert all(u.startswith("synthetic-") for u in batch.read_users("synthetic:3", {}))


def test_cascade_batch_equals_what_the_server_answers(tiny_cascade_export, tmp_path):
    """`cascade batch` through the `cascade` signature (200 of the 943 users and one unknown, in
    Beam batches of 64) equals gRPC answers from `cascade serve`. Every user through `retrieval`:
    `test_every_user_gets_the_served_answer`."""
    from serving import client
    from serving.model_server import server
    from serving.model_server import config as server_config

    record = json.loads((tiny_cascade_export / "cascade" / "1" / "assets.extra" / "cascade_export.json").read_text())
    users = batch.read_users("all", record)
    assert len(users) == 943
    users = users[::4][:199] + ["nobody"]
    out = tmp_path / "out"
    summary = batch.run_batch(tiny_cascade_export, "cascade", users, out, max_batch_size=64)
    assert (summary["users_read"], summary["users_written"], summary["users_failed"]) == (200, 200, 0)
    table = parquet.read_table(sorted(out.glob("recommendations-*.parquet"))).to_pylist()
    assert len(table) == 200 and {r["user_id"] for r in table} == set(users)
    assert set(table[0]) == {"user_id", "item_ids", "titles", "scores", "retrieval_scores",
                             "sources", "copy", "reasons"}
    by_user = {r["user_id"]: r for r in table}
    options = server.ServerOptions(server_config.config_for_base_path(tiny_cascade_export), port=0,
                                   rest_api_port=0)
    with server.Server(options).start() as running:
        address = f"127.0.0.1:{running.grpc_port}"
        client.wait_until_available(address, "cascade", 60)
        for start in range(0, len(users), 100):
            chunk = users[start:start + 100]
            served = client.predict_grpc(address, "cascade", {"user_id": chunk}, timeout=120)
            for row, user in enumerate(chunk):
                assert by_user[user]["item_ids"] == list(served["item_ids"][row]), user
                assert by_user[user]["titles"] == list(served["titles"][row]), user
                np.testing.assert_allclose(by_user[user]["scores"], served["scores"][row], rtol=1e-4, atol=1e-4)
                assert by_user[user]["sources"] == list(served["sources"][row]), user
                assert all(by_user[user]["copy"]), user
                assert by_user[user]["copy"] == list(served["copy"][row]), user
                assert by_user[user]["reasons"] == [list(r) for r in served["reasons"][row]], user
