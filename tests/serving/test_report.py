"""`cascade report` on tiny runs: what it writes, that its numbers are the run's, what it says
when an input is missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from serving import cli, report

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory):
    """A copy of the tiny retrieval run with its test table (peers included) in metrics.json."""
    from towers import retrieval_eval

    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run, run)
    retrieval_eval.evaluate_run(run)
    return run


def test_retrieval_only_run_names_the_commands_it_lacks(evaluated_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", "--run", str(evaluated_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.md"), str(out / "report.html")]

    for plot in ("training_curves.png", "hit_rate_at_k.png"):
        assert _is_png(out / plot), plot
    assert not (out / "scann_tradeoff.png").exists()
    text = (out / "report.md").read_text()
    run = str(evaluated_run)
    for command in (f"cascade bench retrieval-index --run {run}",
                    f"cascade train reranker --run {run}",
                    f"cascade bench serve --model-base-path models --out {run}/bench",
                    f"cascade train copywriter --run {run}",
                    f"cascade evaluate reranker --run {run}"):
        assert command in text, command
    assert "| cascade_retrieval |" in text and "| ALS |" in text
    html = (out / "report.html").read_text()
    assert '<img alt="Hit rate@K" src="hit_rate_at_k.png"' in html and "<table>" in html


def test_new_items_and_new_users_views_get_their_own_tables(evaluated_run, tmp_path):
    """`cascade evaluate retrieval` records the new-items and new-users views inside the test
    table when the split has such items or users (the benchmark has 29 new items): the report
    prints each as its own table, not as a model's row (which once stopped `make demo`)."""
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"shelf_hit_rate@10": 0.4516, "hit_rate@10": 0.0, "new_share@10": 0.0023}
    metrics["test"]["new_items"] = {
        "new_items": 29, "test_rows": 31, "test_users": 22,
        **{name: row for name in ("cascade_retrieval", "category_profile", "content_popularity",
                                  "random")}}
    metrics["test"]["new_users"] = {"new_users": 3, "test_rows": 7, "cascade_retrieval": 0.1429,
                                    "popularity": 0.2857, "random": 0.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    report.build_report(run, tmp_path / "report", curves=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "New items (no training row): 29; 31 test interactions with them, of 22 users." in text
    assert "| content_popularity | 0.4516 | 0.0000 | 0.0023 |" in text
    assert "New users (no training row): 3, with 7 test interactions." in text
    assert "| popularity | 0.2857 |" in text and "| new_items |" not in text


def test_hit_rate_curves_agree_with_the_evaluation(evaluated_run):
    """Every curve at K = 10, 50, 100 is the evaluation's number, and the retrieval curve at every
    K = 1..100 is the share of test pairs whose item is ranked within K, the rank worked out here
    from the embeddings (1 + unseen items scored higher). Catches an off-by-one in K (curve[k]
    being hit rate@k+2, or @k), seen items left in the ranking, the curve averaged over users
    instead of test pairs, or a cumulative sum over the wrong axis."""
    from towers import retrieval_eval, runs
    from towers import model as towers_model

    table = json.loads((evaluated_run / "metrics.json").read_text())["test"]
    curves = report.hit_rate_curves(evaluated_run)
    assert set(curves) == {"retrieval", "popularity", "ALS", "EASE"}
    for name, row in (("retrieval", "cascade_retrieval"), ("popularity", "popularity"),
                      ("ALS", "als"), ("EASE", "ease")):
        curve = curves[name]
        assert len(curve) == 100
        for k in (10, 50, 100):
            assert curve[k - 1] == pytest.approx(table[row][f"hit_rate@{k}"], abs=1e-5), (name, k)

    retrieval, tables = runs.load_run(evaluated_run)
    users, items, seen = retrieval_eval.test_rows(tables, runs.run_data(evaluated_run)[1].test)
    seen = seen.toarray().astype(bool)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    scores = (queries @ candidates.T).astype(np.float64)
    ranks = np.array([np.inf if seen[u, i] else 1 + np.sum(~seen[u] & (scores[u] > scores[u, i]))
                      for u, i in zip(users, items)])
    expected = [np.mean(ranks <= k) for k in range(1, 101)]
    np.testing.assert_allclose(curves["retrieval"], expected, atol=1e-5)
    assert expected[0] < expected[-1]  # the data make the curve rise: the check has something to see


def test_training_curves_come_from_tensorboard(evaluated_run):
    stages = report.training_curves(evaluated_run)
    recorded = json.loads((evaluated_run / "metrics.json").read_text())["training"]["loss"]
    assert list(stages) == ["retrieval"]
    assert stages["retrieval"]["loss"] == pytest.approx(recorded, rel=1e-6)


def test_empty_run_gets_a_report_of_commands(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    written = report.build_report(run, curves=True)
    assert written["markdown"] == run / "report" / "report.md" and written["plots"] == []
    assert written["missing"]["Training curves"] == f"cascade train retrieval --run {run}"
    assert written["missing"]["Hit rate@K"] == f"cascade train retrieval --run {run}"
    assert len(written["missing"]) == 7


def test_bad_inputs_are_named(evaluated_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report.build_report(tmp_path / "nowhere")
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    (run / "bench").mkdir(exist_ok=True)
    (run / "bench" / "serve.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="serve.json: not valid JSON"):
        report.build_report(run, curves=False)
    assert cli.main(["report", "--run", str(run), "--no-curves"]) == 1


def test_full_cascade_run_has_every_plot(tiny_cascade_run, tiny_export, tmp_path, monkeypatch):
    """Every benchmark and evaluation really run on the tiny cascade, then the report."""
    from rerank import rerank_bench, rerank_eval
    from rerank.copy import evaluation
    from towers import index_bench, retrieval_eval, runs
    from towers import model as towers_model
    from serving import load_bench

    run = tmp_path / "run"
    shutil.copytree(tiny_cascade_run, run)
    retrieval_eval.evaluate_run(run, with_peers=False)
    rerank_eval.evaluate_reranker(run, with_als=False)
    evaluation.evaluate_copywriter(run, pairs=8, examples=2, timing_calls=2, necessity_pairs=0)
    retrieval, tables = runs.load_run(run)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    index_bench.run_index_benchmark(queries, tables.item_ids, candidates,
                                    tables.seen_padded(np.arange(len(tables.user_ids))),
                                    run / "bench", synthetic_items=2000)
    monkeypatch.setattr(rerank_bench, "SINGLE_CALLS", 3)  # timings are the benchmark's, not ours
    monkeypatch.setattr(rerank_bench, "BATCH_CALLS", 1)
    bench = rerank_bench.run_reranker_benchmark(run, run / "bench", lengths=(), quality_users=6)
    # Every variant measured, the trained length and bfloat16, on the sampled users.
    assert [row["name"] for row in bench["variants"]] == ["T=32 (trained)", "T=32 bfloat16"]
    assert bench["quality_sample"]["users"] == 6
    assert "| T=32 (trained) |" in (run / "bench" / "reranker.md").read_text()
    # `cascade bench serve`: what it measures and writes (not how fast). Catches: a level or mode
    # left out, requests lost or counted twice, the JSON, Markdown and plot not written from the
    # same rows, the paired run not pairing every request.
    bench_dir = run / "bench"
    served = load_bench.run_serve_benchmark(tiny_export, bench_dir, concurrency=(1, 4), requests=12)
    rows = {(r["mode"], r["concurrency"]): r for r in served["rows"]}
    assert set(rows) == {(m, c) for m in load_bench.MODES for c in (1, 4)}
    assert all(row["requests"] == 12 for row in rows.values())
    assert json.loads((bench_dir / "serve.json").read_text())["rows"] == json.loads(
        json.dumps(served["rows"]))
    table = (bench_dir / "serve.md").read_text()
    assert "| retrieval | grpc+batching | 4 |" in table
    # The paired overhead: one in-process and one gRPC call per request, same users.
    [paired] = served["paired"]
    assert paired["model"] == "retrieval" and paired["pairs"] == 12
    assert "| retrieval | 12 |" in table
    assert _is_png(bench_dir / "serve.png")

    written = report.build_report(run)
    assert written["missing"] == {}
    assert written["plots"] == ["training_curves.png", "hit_rate_at_k.png", "scann_tradeoff.png",
                                "rerank_latency_quality.png", "serving_latency.png"]
    for plot in written["plots"]:
        assert _is_png(run / "report" / plot), plot
    text = written["markdown"].read_text()
    assert "| re-ranked top 100 |" in text and "grounded_after_check" in text
    # The scalar terms as training fit them, with the popularity counts they read.
    training = json.loads((run / "metrics.json").read_text())["reranker"]["training"]
    assert rerank_eval.format_head(training) in text
    assert "Not measured" not in text and "Not trained" not in text
    # The re-ranked curve is cached against the checkpoints it came from, and reused.
    cache = json.loads((run / "report" / report.CURVES_CACHE).read_text())
    assert len(cache["curve"]) == 100 and any("reranker" in key for key in cache["stamp"])
    again = report.hit_rate_curves(run, run / "report" / report.CURVES_CACHE)
    assert again["re-ranked top 100"] == cache["curve"]
