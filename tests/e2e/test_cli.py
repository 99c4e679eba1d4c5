"""The `cascade` command line end to end on tiny data: train, evaluate, export, recommend."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

from serving import cli
from towers import model as towers_model
from towers import runs

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_train_evaluate_export_recommend(tiny_data_dir, tmp_path, capsys):
    run, models = tmp_path / "run", tmp_path / "models"
    assert cli.main(["train", "retrieval", "--data", str(tiny_data_dir), "--run", str(run),
                     "--epochs", "2", "--embedding-dim", "8",
                     "--hidden", "16", "--history-length", "16", "--holdout", "200"]) == 0
    assert "| validation |" in capsys.readouterr().out
    assert json.loads((run / "retrieval_config.json").read_text())["embedding_dim"] == 8

    assert cli.main(["evaluate", "retrieval", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    # 3,000 rows, test share 0.2: the protocol and its sizes head the table.
    assert "protocol: random (test share 0.2, seed 42); 2,400 training / 600 test rows" in table
    for row in ("cascade_retrieval", "cascade_retrieval_no_exclusion", "popularity", "als",
                "ease"):
        assert f"| {row} |" in table
    recorded = json.loads((run / "metrics.json").read_text())
    assert set(recorded["test"]) >= {"popularity", "als"}

    # The headroom diagnostic: each signal alone, standardized per user, ranks as the peers do.
    assert cli.main(["evaluate", "retrieval", "--run", str(run), "--no-peers", "--headroom"]) == 0
    assert "| best mix, weights chosen on these test rows" in capsys.readouterr().out
    alone = json.loads((run / "metrics.json").read_text())["headroom"]["alone"]
    assert alone["ease"] == recorded["test"]["ease"]["hit_rate@10"]
    assert alone["two_tower"] == recorded["test"]["cascade_retrieval"]["hit_rate@10"]

    assert cli.main(["export", "--run", str(run), "--model-base-path", str(models), "--k", "10"]) == 0
    assert cli.main(["recommend", "--model-base-path", str(models), "--user", "1",
                     "--user", "nobody", "--json"]) == 0
    out = capsys.readouterr().out
    answers = json.loads(out[out.index("{\n"):])  # after export's three path lines
    assert set(answers) == {"1", "nobody"}
    assert all(len(rows) == 10 and rows[0]["title"] for rows in answers.values())
    # User 1's answer is the run's own ranking, worked out in numpy: the top 10 by the towers'
    # dot product, leaving out the items the model was trained on, with the dataset's titles.
    retrieval, tables = runs.load_run(run)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    row = list(tables.user_ids.astype(str)).index("1")
    scores = candidates @ queries[row]
    scores[tables.seen_matrix()[row].indices] = -np.inf
    top = tables.item_ids[np.argsort(-scores, kind="stable")[:10]].astype(str)
    assert [r["item_id"] for r in answers["1"]] == top.tolist()
    dataset, _ = runs.run_data(run)
    assert [r["title"] for r in answers["1"]] == list(dataset.labels(top))


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["evaluate", "retrieval", "--run", str(tmp_path / "missing")]) == 1
    assert cli.main(["data", "fetch", "movielens-100k", "--out", str(tmp_path / "o"),
                     "--from", str(tmp_path / "nothing.zip")]) == 1


def test_data_split_writes_presplit_files_that_train_reads_back(tiny_data_dir, tmp_path, capsys):
    """`cascade data split` writes the protocol's rows; a run on the written folder trains on
    exactly those rows (pre-split), and asking for another protocol there is an error."""
    from towers import data

    out = tmp_path / "split"
    assert cli.main(["data", "split", "--data", str(tiny_data_dir), "--split", "user-temporal",
                     "--out", str(out)]) == 0
    original = data.load(tiny_data_dir).split("user-temporal")
    written = data.load(out)
    assert written.presplit is not None and written.split().protocol == "pre-split"
    for part in ("train", "test"):
        a, b = getattr(original, part), getattr(written.split(), part)
        assert sorted(zip(a.user_id, a.item_id, a.timestamp)) == sorted(zip(b.user_id, b.item_id, b.timestamp))
    assert cli.main(["train", "retrieval", "--data", str(out), "--run", str(tmp_path / "r"),
                     "--split", "random", "--epochs", "1"]) == 1
    assert not (tmp_path / "r" / "features.npz").exists()  # refused before any training


def test_help_answers_without_importing_tensorflow():
    """`cascade --help`, `cascade train retrieval --help` and `cascade serve --help` print the user-facing description and
    the flags without importing TensorFlow (seconds instead of a multi-second TF start). Fails when
    cli.py, or a module its parser reads (towers.config, rerank.config), imports TensorFlow at the
    top, or when the parser goes back to a stage's model module for its config dataclass."""
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from serving import cli
        texts = []
        for argv in (["--help"], ["train", "retrieval", "--help"], ["serve", "--help"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    cli.main(argv)
                except SystemExit:
                    pass
            texts.append(out.getvalue())
        print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "help": texts}))
    """)
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    top, retrieval, serve = answer["help"]
    assert " ".join(top.split()).startswith(
        "usage: cascade [-h] COMMAND ... " + " ".join(cli.DESCRIPTION.split()))
    assert "recommend" in top and "--split" in retrieval and "--embedding-dim" in retrieval
    assert "--model_config_file" in serve and "--enable_batching" in serve
    assert answer["tensorflow"] is False
