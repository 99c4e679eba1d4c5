"""The `cascade` command line end to end on tiny data: train, evaluate, export, recommend."""

from __future__ import annotations

import json

from serving import cli
from tests.conftest import TINY_TRAIN


def test_train_evaluate_export_recommend(tiny_data_dir, tmp_path, capsys):
    run, models = tmp_path / "run", tmp_path / "models"
    assert cli.main(["train", "retrieval", "--data", str(tiny_data_dir), "--run", str(run),
                     "--train-size", str(TINY_TRAIN), "--epochs", "2", "--embedding-dim", "8",
                     "--hidden", "16", "--history-length", "16", "--holdout", "200"]) == 0
    assert "| validation |" in capsys.readouterr().out
    assert json.loads((run / "retrieval_config.json").read_text())["embedding_dim"] == 8

    assert cli.main(["evaluate", "retrieval", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    for row in ("cascade_retrieval", "cascade_retrieval_no_exclusion", "popularity", "als",
                "ease"):
        assert f"| {row} |" in table
    assert set(json.loads((run / "metrics.json").read_text())["test"]) >= {"popularity", "als"}

    assert cli.main(["export", "--run", str(run), "--model-base-path", str(models), "--k", "10"]) == 0
    assert cli.main(["recommend", "--model-base-path", str(models), "--user", "1",
                     "--user", "nobody", "--json"]) == 0
    out = capsys.readouterr().out
    answers = json.loads(out[out.index("{\n"):])  # after export's three path lines
    assert set(answers) == {"1", "nobody"}
    assert all(len(rows) == 10 and rows[0]["title"] for rows in answers.values())


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert cli.main(["evaluate", "retrieval", "--run", str(tmp_path / "missing")]) == 1
    assert cli.main(["data", "fetch", "movielens-100k", "--out", str(tmp_path / "o"),
                     "--from", str(tmp_path / "nothing.zip")]) == 1
