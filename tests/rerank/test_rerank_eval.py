"""`cascade evaluate reranker` and `cascade bench reranker` on the tiny run with a tiny re-ranker:
the table's retrieval row is `cascade evaluate retrieval`'s numbers, re-ranking only reorders the
top K (so HR@K is unchanged), the table's changes are relative to retrieval (on a hand-made
table), the result lands in metrics.json, and the bench writes its files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import ranking
from rerank import rerank_eval
from serving import cli
from tests.rerank.test_reranker_graph import reranker_run  # noqa: F401 (fixture)
from towers import metrics, runs
from towers import retrieval_eval


def test_evaluate_reranker_table(reranker_run):
    table = rerank_eval.evaluate_reranker(reranker_run)
    assert set(table) == {"retrieval", "als", "ease", "head@50", "head@100", "reranked@50",
                          "reranked@100", "head@merged", "reranked@merged",
                          "head-retrieval@merged", "head-popularity@merged", "head-ease@merged"}
    # The retrieval row is what `cascade evaluate retrieval` reports (same split, exclusion).
    reference = retrieval_eval.evaluate_run(reranker_run, ks=(10,), with_peers=True)
    for key, value in table["retrieval"].items():
        assert value == pytest.approx(reference["cascade_retrieval"][key], abs=1e-5)
        assert table["als"][key] == pytest.approx(reference["als"][key], abs=1e-5)
        assert table["ease"][key] == pytest.approx(reference["ease"][key], abs=1e-5)
    recorded = json.loads((reranker_run / "metrics.json").read_text())["reranker"]
    assert recorded["test"]["reranked@100"] == table["reranked@100"]
    assert "training" in recorded  # training's record is kept
    assert "retrieval top-100 re-ranked" in rerank_eval.format_table(table)

    # The candidates: 12 two-tower + 6 item-to-item + 2 new-item slots (TINY_RERANKER).
    candidates = recorded["test"]["candidates"]
    assert candidates["k"] == 20 and candidates["item_item"] == 6
    share = candidates["share"]
    assert share["two_tower"] >= 0.6 and 0 < share["item_item"] <= 0.3 and share["new_item"] <= 0.1
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-3)
    assert "| merged (20) |" in rerank_eval.format_candidates(candidates)

    # The buckets, checked against the training split counted here: every test row in one user
    # bucket and one item bucket, and each bucket's retrieval hit rate that of its own rows.
    logits, users, items, seen, tables = rerank_eval.test_inputs(reranker_run)
    train = runs.run_data(reranker_run)[1].train
    per_user = {u: c for u, c in zip(*np.unique(train.user_id, return_counts=True))}
    user_count = np.array([per_user.get(u, 0) for u in tables.user_ids[users]])
    buckets = recorded["test"]["buckets"]
    assert sum(b["test_rows"] for name, b in buckets.items() if name.startswith("users")) == len(users)
    assert sum(b["test_rows"] for name, b in buckets.items() if name.startswith("items")) == len(users)
    busy = user_count > 20
    assert buckets["users >20"]["test_rows"] == busy.sum()
    assert buckets["users >20"]["retrieval"] == round(metrics.evaluate(
        logits, users[busy], items[busy], seen, (10,))["hit_rate@10"], 4)
    assert "| users 1-5 |" in rerank_eval.format_buckets(buckets)
    assert buckets["users 1-5"]["test_rows"] == ((user_count >= 1) & (user_count <= 5)).sum()

    # Each term's ablation: the merged candidates ranked by the head with that term's input at 0
    # (the same as its weight at 0: the head is linear in each input), worked out here.
    reranker = ce.load_reranker(reranker_run)
    rows = np.unique(users)
    merged, _ = rerank_eval.sources.batched(logits, seen, reranker.texts.neighbours(),
                                            tables.item_count, rerank_eval.reranker_sources(
                                                reranker_run), users=rows)
    retrieval, popularity, ease, prior = rerank_eval._head_features(reranker, logits, rows,
                                                                    merged, tables)
    no_ease = ce.head_scores(reranker.encoder, retrieval, popularity, np.zeros_like(ease), prior)
    expected = metrics.evaluate(ranking.reranked(logits, rows, merged, no_ease), users, items,
                                seen, (10,))
    assert table["head-ease@merged"]["hit_rate@10"] == pytest.approx(expected["hit_rate@10"],
                                                                     abs=1e-5)
    no_retrieval = ce.head_scores(reranker.encoder, np.zeros_like(retrieval), popularity, ease,
                                  prior)
    expected = metrics.evaluate(ranking.reranked(logits, rows, merged, no_retrieval), users,
                                items, seen, (10,))
    assert table["head-retrieval@merged"]["ndcg@10"] == pytest.approx(expected["ndcg@10"],
                                                                      abs=1e-5)
    assert "no BERT, no EASE @merged" in rerank_eval.format_buckets(buckets)
    assert ("merged candidates, scalar terms without the popularity term (its weight 0, the "
            "others as fit; no BERT)") in rerank_eval.format_table(table)


def test_a_term_knocked_out_comes_back(reranker_run):
    encoder = ce.load_reranker(reranker_run).encoder
    before = ce.head_weights(encoder)
    with pytest.raises(RuntimeError):
        with rerank_eval.without(encoder, ("retrieval_weight", "new_retrieval_weight")):
            assert float(encoder.retrieval_weight) == 0.0 == float(encoder.new_retrieval_weight)
            assert float(encoder.ease_weight) == before["ease_weight"]
            raise RuntimeError("left early")
    assert ce.head_weights(encoder) == before


def test_table_changes_are_relative_to_retrieval():
    """The change columns on a hand-made table: EASE's HR@10 0.25 over retrieval's 0.20 is
    +25.0%, its NDCG@10 0.09 over 0.10 is -10.0%. Catches a ratio taken the wrong way round
    (0.20 / 0.25: -20.0%), a difference of points instead of a ratio (+5.0%), the change measured
    against another row than retrieval, or HR and NDCG swapped."""
    table = {"retrieval": {"hit_rate@10": 0.2, "ndcg@10": 0.1, "recall@10": 0.15},
             "ease": {"hit_rate@10": 0.25, "ndcg@10": 0.09, "recall@10": 0.2},
             "reranked@100": {"hit_rate@10": 0.3, "ndcg@10": 0.12, "recall@10": 0.25}}
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in rerank_eval.format_table(table).splitlines()[2:]}
    assert rows["EASE"] == ["0.2500", "0.0900", "0.2000", "+25.0%", "-10.0%"]
    assert rows["retrieval top-100 re-ranked (cross-encoder)"][3:] == ["+50.0%", "+20.0%"]


def test_reranking_only_reorders_the_top_k(reranker_run):
    logits, users, items, seen, tables = rerank_eval.test_inputs(reranker_run)
    rows = np.unique(users)
    top, final = rerank_eval.rerank_scores(ce.load_reranker(reranker_run), logits, seen, rows,
                                           tables.user_ids, tables.item_ids, 20)
    assert top.shape == final.shape == (len(rows), 20) and np.isfinite(final).all()
    reranked = ranking.reranked(logits, rows, top, final)
    before = metrics.evaluate(logits, users, items, seen, (20,))
    after = metrics.evaluate(reranked, users, items, seen, (20,))
    assert after["hit_rate@20"] == pytest.approx(before["hit_rate@20"])
    np.testing.assert_array_equal(np.sort(metrics.rankings(reranked, seen, 20, users=rows), axis=1),
                                  np.sort(top, axis=1))
    # Each user's list is the top 20 in the order of the re-ranker's scores.
    order = np.argsort(-final, axis=1, kind="stable")
    np.testing.assert_array_equal(metrics.rankings(reranked, seen, 20, users=rows),
                                  np.take_along_axis(top, order, axis=1))


def test_cli_parses_reranker_commands(tmp_path):
    parser = cli._parser()
    args = parser.parse_args(["train", "reranker", "--run", "r", "--layers", "3",
                              "--train-embeddings", "true"])
    config = cli._config_from(args, ce.RerankerConfig)
    assert config.layers == 3 and config.train_embeddings and args.checkpoint is None
    assert parser.parse_args(["evaluate", "reranker", "--run", "r"]).handler == cli._evaluate_reranker
    args = parser.parse_args(["bench", "reranker", "--run", "r", "--lengths", "16,32"])
    assert args.handler == cli._bench_reranker and args.lengths == "16,32"
    # A run without a re-ranker fails with the command to run, not a traceback.
    assert cli.main(["evaluate", "reranker", "--run", str(tmp_path)]) == 1


def test_new_arrivals_shelf_reranked(tiny_cascade_run):
    """The tiny run's random split leaves test items with no training row: its new-arrivals
    shelf. New items have no popularity and no item-item weight, so without BERT the re-ranker
    orders its top `depth` of them by its retrieval weight times the logit alone: the shelf hit
    rates of retrieval and of that ablation are worked out here by hand from the logits (a
    popularity or EASE table that leaked test rows, or a shelf that let trained items in, would
    differ; the tiny re-ranker's retrieval weight happens to be negative, which reverses it)."""
    result = rerank_eval.evaluate_new_items(tiny_cascade_run, record=False)
    logits, users, items, seen, tables = rerank_eval.test_inputs(tiny_cascade_run)
    logits, seen = np.asarray(logits), seen.toarray().astype(bool)  # tiny: the whole matrices
    split = runs.run_data(tiny_cascade_run)[1]
    new = ~np.isin(tables.item_ids.astype(str), list(set(split.train.item_id)))
    assert result["new_items"] == new.sum()
    assert result["test_rows"] == new[items].sum() > 0
    depth = result["depth"]
    assert depth == min(100, new.sum())
    # Each shelf row's place among the user's unseen new items, by the logit (0 = best).
    above = np.array([np.sum(new & ~seen[u] & (logits[u] > logits[u, i]))
                      for u, i in zip(users, items) if new[i]])
    weight = float(ce.load_reranker(tiny_cascade_run).encoder.retrieval_weight)
    head_rank = above if weight > 0 else np.where(above < depth, depth - 1 - above, depth)
    shelf = result["shelf_hit_rate@10"]
    assert shelf["retrieval"] == round(float(np.mean(above < 10)), 5)
    assert shelf["head_only"] == round(float(np.mean(head_rank < 10)), 5)
    # Re-ranked: each user's `depth` best unseen new items by the logit, scored by the re-ranker
    # in one call per user, the row's item among that user's first 10.
    reranker, hits, final = ce.load_reranker(tiny_cascade_run), [], {}
    for u, i in zip(users, items):
        if not new[i]:
            continue
        pool = np.flatnonzero(new & ~seen[u])
        pool = pool[np.argsort(-logits[u, pool], kind="stable")][:depth]
        if u not in final:
            final[u] = reranker(dict(
                user_id=tf.constant([str(tables.user_ids[u])]),
                item_ids=tf.constant([tables.item_ids[pool].astype(str)]),
                retrieval_score=tf.constant([logits[u, pool]], tf.float32))).numpy()[0]
        place = np.flatnonzero(pool == i)
        hits.append(len(place) == 1 and np.sum(final[u] > final[u][place[0]]) < 10)
    assert shelf["reranked"] == round(float(np.mean(hits)), 5)
    table = rerank_eval.format_new_items(result)
    assert "| re-ranked (cross-encoder) |" in table and "| retrieval alone |" in table


def test_choose_depth_takes_the_fewest_candidates_that_lose_nothing_on_validation():
    def rows(*pairs):
        return [{"depth": d, "hit_rate@10": h} for d, h in pairs]

    # BERT adds nothing: 30 already reaches the widest depth's hit rate (0 is never chosen).
    assert ce.choose_depth(rows((0, 0.30), (20, 0.16), (30, 0.17), (50, 0.17), (100, 0.17))) == 30
    # BERT pays with depth: only the widest keeps its gain.
    assert ce.choose_depth(rows((20, 0.10), (50, 0.12), (100, 0.13))) == 100
    # At least twice the served list, unless the re-ranker has fewer candidates than that.
    assert ce.choose_depth(rows((10, 0.2), (20, 0.1), (40, 0.1)), served=10) == 20
    assert ce.choose_depth(rows((0, 0.2), (12, 0.1)), served=10) == 12
    assert ce.depth_grid(100) == (0, 20, 30, 50, 100) and ce.depth_grid(12) == (0, 12)
    with pytest.raises(ValueError, match="no depth above 0"):
        ce.choose_depth(rows((0, 0.2)))


def test_depth_sweep_is_the_served_two_pass_ranking_on_the_training_validation(reranker_run,
                                                                                capsys):
    """The rebuilt validation has training's rows and users; each depth's ranking is the served
    two passes (the scalar terms keep D, BERT re-scores them) from one BERT pass, and depth 0
    the scalar terms alone; the CLI records the depth it prints as chosen."""
    recorded = json.loads((reranker_run / "metrics.json").read_text())["reranker"]["validation"]
    assert len(recorded["reranked_per_epoch"]) == 1  # the callback ran at the end of its epoch
    check = rerank_eval.validation_check(reranker_run)
    assert (len(check.users), len(check.user_rows)) == (recorded["rows"], recorded["users"])
    # The saved re-ranker scores the rebuilt validation as training's last pass did once the
    # BERT term's weights were fit on it (recorded beside it).
    weights = recorded["text_weights"]
    encoder = check.reranker.encoder
    assert (float(encoder.text_weight), float(encoder.new_text_weight)) == pytest.approx(
        (weights["text_weight"], weights["new_text_weight"]))
    assert check.evaluate() == weights["after"]
    ranked = check.depth_rankings((0, 4, 8, 12))
    user_ids = check.user_ids[check.user_rows]
    for depth in (4, 8, 12):
        items, scores = ce.rerank_candidates(check.reranker, user_ids, check.item_ids,
                                             check.candidates, check.retrieval, depth)
        assert items.shape == (len(user_ids), depth)
        np.testing.assert_array_equal(ranked[depth][0], items)
        np.testing.assert_allclose(ranked[depth][1], scores, rtol=1e-5, atol=1e-5)
    head = check.reranker.head_scores(user_ids, check.item_ids[ranked[0][0]],
                                      ranking.pair_scores(check.scores, check.user_rows,
                                                          ranked[0][0]))
    np.testing.assert_allclose(ranked[0][1], head, rtol=1e-5, atol=1e-5)
    # Training recorded its sweep (the tiny re-ranker has 12 candidates: depths 0 and 12).
    assert [r["depth"] for r in recorded["depths"]] == [0, 12] and recorded["serve_depth"] == 12
    assert cli.main(["evaluate", "reranker", "--run", str(reranker_run), "--sweep-depth"]) in (0, None)
    assert "| 12 **(chosen)** |" in capsys.readouterr().out
    config = json.loads((reranker_run / ce.RERANKER_DIR / ce.CONFIG_FILE).read_text())
    assert config["serve_depth"] == 12


def test_calibrate_refits_the_bert_weights_training_fit_and_saves_them(reranker_run, capsys):
    """`--calibrate` (for runs trained before the fit existed) rebuilds the validation, starts the
    BERT term from weight 1 and lands on the weights training fit at its end; they are saved into
    the run (a fresh load has them) and printed, and the depth is chosen again."""
    trained = json.loads((reranker_run / "metrics.json").read_text())["reranker"]["validation"]
    assert cli.main(["evaluate", "reranker", "--run", str(reranker_run), "--calibrate"]) in (0, None)
    out = capsys.readouterr().out
    weights = json.loads((reranker_run / "metrics.json").read_text())["reranker"]["validation"][
        "text_weights"]
    for name in ("text_weight", "new_text_weight"):
        assert weights[name] == pytest.approx(trained["text_weights"][name], abs=1e-4)
    assert f"items with training rows {weights['text_weight']:.3f} ({weights['rows']} rows)" in out
    assert weights["before"] == trained["reranked_per_epoch"][0]  # the pass at weight 1
    encoder = ce.load_reranker(reranker_run).encoder
    assert float(encoder.text_weight) == pytest.approx(weights["text_weight"])
    assert float(encoder.new_text_weight) == pytest.approx(weights["new_text_weight"])
    assert "| 12 **(chosen)** |" in out


def test_fitted_bert_weights_are_what_the_saved_reranker_serves(reranker_run, tmp_path,
                                                                 monkeypatch):
    """The validation's scores after the fit (head + weight x BERT term, weight by the item's
    kind) are what a fresh load of the saved re-ranker computes, here with planted weights (the
    tiny validation is too small to fit any: the fit itself is tested in test_head_fit.py).
    Catches weights left out of the checkpoint, or the fit's scores not the encoder's. (The tiny
    validation's candidates all have training rows; the new-item weight's place in the served
    score is tested in test_head_fit.py.)"""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reranker_run, run)

    def planted(encoder, *args, **kwargs):
        encoder.text_weight.assign(0.25)
        encoder.new_text_weight.assign(2.0)
        return {"text_weight": 0.25, "new_text_weight": 2.0, "rows": 0, "new_rows": 0}

    monkeypatch.setattr(ce, "fit_text_weights", planted)
    check = rerank_eval.validation_check(run)
    check.evaluate()
    _, top, at_one = check.last
    check.fit_text_weights()
    _, _, fitted = check.last
    ce.save_encoder(check.reranker.encoder, run)
    again = rerank_eval.validation_check(run)
    encoder = again.reranker.encoder
    assert (float(encoder.text_weight), float(encoder.new_text_weight)) == (0.25, 2.0)
    again.evaluate()
    np.testing.assert_array_equal(again.last[1], top)
    np.testing.assert_allclose(again.last[2], fitted, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fitted, at_one, atol=1e-3)  # the weights changed the scores



def test_format_head_names_the_weights_and_the_popularity_counts():
    head = {"retrieval_weight": 0.615, "popularity_weight": 0.957, "ease_weight": -1.294,
            "new_positives": 18}
    tried = [{"half_life": None, "hit_rate@100": 0.2781},
             {"half_life": 1243652.5, "hit_rate@100": 0.2844}]
    text = rerank_eval.format_head({"head": head, "popularity_half_life": {
        "chosen": 1243652.5, "tried": tried}})
    assert text == ("Scalar terms fit on held-out training rows: retrieval 0.615, popularity 0.957 "
                    "(recent rows counted more, half-life 1,243,652 in the timestamp's units "
                    "(14.4 days if seconds), chosen on held-out rows: popularity hit rate@100 "
                    "0.2781 all-time -> 0.2844), EASE -1.294; new-item terms off (held-out "
                    "positives on new items: 18; they are fit from 20).")
    kept = rerank_eval.format_head({"head": {**head, "new_positives": 25},
                                    "popularity_half_life": {"chosen": None, "tried": tried[:1]}})
    assert "(all-time counts (no half-life raised the held-out popularity hit rate beyond " in kept
    assert "new-item terms fit (held-out positives on new items: 25;" in kept
    # A run trained before the choice existed records neither.
    assert "popularity 0.957 (all-time counts), EASE -1.294." in rerank_eval.format_head(
        {"head": {k: v for k, v in head.items() if k != "new_positives"}})


def test_format_validation_tables_what_training_measured():
    m = lambda h, r, n: {"hit_rate@10": h, "recall@10": r, "ndcg@10": n}
    validation = {
        "retrieval": m(0.1247, 0.1767, 0.1198), "candidates_hit_rate": 0.6653,
        "head": m(0.1254, 0.177, 0.1279), "reranked_per_epoch": [m(0.1254, 0.1783, 0.1274)],
        "text_weights": {"text_weight": 1.0, "new_text_weight": 1.0, "rows": 843, "new_rows": 0,
                         "rejected": {"text_weight": 6.4021, "new_text_weight": 1.0,
                                      "metrics": m(0.1247, 0.1787, 0.1253)},
                         "accepted": False, "before": m(0.1254, 0.1783, 0.1274),
                         "after": m(0.1254, 0.1783, 0.1274)},
        "rows": 1491, "users": 300,
        "depths": [{"depth": 0, **m(0.1247, 0.1753, 0.1272)}, {"depth": 20, **m(0.1254, 0, 0)}],
        "serve_depth": 20}
    assert rerank_eval.format_validation(validation) == "\n".join([
        "Validation (1,491 held-out training rows of 300 users; the candidates hold 0.6653 of "
        "them):", "",
        "| ranking | hit_rate@10 | recall@10 | ndcg@10 |", "|---|---|---|---|",
        "| retrieval | 0.1247 | 0.1767 | 0.1198 |",
        "| scalar terms (no BERT) | 0.1254 | 0.1770 | 0.1279 |",
        "| re-ranked, epoch 1 | 0.1254 | 0.1783 | 0.1274 |", "",
        "BERT term weight: 1.000 for items with training rows, 1.000 for items without "
        "(validation positives: 843 / 0); the fit, 6.402 / 1.000, lowered validation (hit "
        "rate@10 0.1254 -> 0.1247) and was rejected.", "",
        "Candidates BERT re-scores (hit rate@10 by depth; 0: no BERT): 0: 0.1247, 20: 0.1254; "
        "served: 20."])
    # Kept weights add the served row; a fit without rejection says nothing of one.
    kept = {**validation, "text_weights": {
        **{k: v for k, v in validation["text_weights"].items() if k != "rejected"},
        "text_weight": 0.082, "accepted": True, "after": m(0.0426, 0.05, 0.03)}}
    text = rerank_eval.format_validation(kept)
    assert "| re-ranked, BERT at its fitted weights (served) | 0.0426 | 0.0500 | 0.0300 |" in text
    assert "BERT term weight: 0.082 for items with training rows" in text
    assert "rejected" not in text
