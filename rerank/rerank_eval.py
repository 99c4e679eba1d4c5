"""Evaluation of a run's re-ranker on the run's test split (`cascade evaluate reranker`).

The protocol is `cascade evaluate retrieval`'s (`towers.train.evaluate_run`): the run's own data
and split (`towers.runs.run_data`), the same test rows, each user's training items excluded, the
same metrics code. For every test user the run's own retrieval model ranks the catalog (training
items left out), its top K are re-scored by the re-ranker from the retrieval logits (dot products
over the temperature, as in training), user contexts and popularity from all training rows; the
top K in the re-ranker's order, then every other item in retrieval order, is the ranking
measured. The re-ranker scores each (user, candidate) pair on its own, so the top 50 are scored
once, as part of the top 100.

The table has retrieval alone, ALS and EASE (`towers.peers`), the learned scalar head without
BERT (an ablation: what the retrieval, popularity and EASE terms alone give), and the re-ranked
top K.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np

from rerank import cross_encoder as ce
from rerank import ranking
from towers import metrics, peers
from towers import retrieval_eval, runs
from towers import model as towers_model

log = logging.getLogger(__name__)

KS = (10,)
DEPTHS = (50, 100)


def test_inputs(run_dir: str | os.PathLike):
    """(retrieval logits [U, I], test user rows, test item rows, seen [U, I], tables) of a run."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    test = runs.run_data(run)[1].test
    queries, candidates = towers_model.embeddings(retrieval, tables)
    users, items, seen = retrieval_eval.test_rows(tables, test)
    return queries @ candidates.T / retrieval.config.temperature, users, items, seen, tables


def rerank_scores(reranker: ce.Reranker, logits: np.ndarray, seen: np.ndarray,
                  user_rows: np.ndarray, user_ids: np.ndarray, item_ids: np.ndarray, depth: int,
                  users_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(top `depth` item rows [U, depth] of `user_rows` by retrieval, seen items left out, and
    the re-ranker's final scores of them [U, depth])."""
    top = ranking.top_candidates(logits[user_rows], seen[user_rows], depth)
    final = ce.score_candidates(reranker, user_ids[user_rows], item_ids[top],
                                np.take_along_axis(logits[user_rows], top, axis=1),
                                users_per_batch)
    return top, final


def evaluate_reranker(run_dir: str | os.PathLike, depths: tuple[int, ...] = DEPTHS,
                      with_als: bool = True, record: bool = True) -> dict[str, dict[str, float]]:
    """The test table: retrieval, ALS, the head ablation and the re-ranked top K for each depth;
    written to `metrics.json` under `reranker.test` (with the seconds re-ranking took)."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)  # fails first, with the command to run, if not trained
    logits, users, items, seen, tables = test_inputs(run)
    evaluate = lambda scores: _rounded(metrics.evaluate(scores, users, items, seen, KS))
    table = {"retrieval": evaluate(logits)}
    if with_als:
        table["als"] = evaluate(peers.als_scores(seen))
        table["ease"] = evaluate(peers.ease_scores(seen, reranker_l2(run)))
    deepest = max(depths)
    user_rows = np.unique(users)
    started = time.perf_counter()
    top, final = rerank_scores(reranker, logits, seen, user_rows, tables.user_ids, tables.item_ids,
                               deepest)
    seconds = time.perf_counter() - started
    head = _head_scores(reranker, logits, user_rows, top, tables)
    for depth in sorted(depths):
        part = slice(0, depth)  # retrieval's top `depth` are the first columns of the deepest top
        table[f"head@{depth}"] = evaluate(ranking.rows_replaced(
            logits, user_rows, ranking.reordered(logits[user_rows], top[:, part], head[:, part])))
        table[f"reranked@{depth}"] = evaluate(ranking.rows_replaced(
            logits, user_rows, ranking.reordered(logits[user_rows], top[:, part], final[:, part])))
    if record:
        runs.update_metrics(
            run, {"test": {**table, "pairs": int(top.size), "seconds": round(seconds, 1)}}, "reranker")
    return table


def evaluate_new_items(run_dir: str | os.PathLike, depth: int = 100, k: int = 10,
                       record: bool = True) -> dict | None:
    """The new-arrivals shelf re-ranked: for the test interactions with items that have no
    training row (None when there are none), hit rate@k when each user is shown only the new
    items, ranked by retrieval, by the re-ranker's top `depth` of them, and by the same without
    the BERT term (the ablation that says what the cross-encoder adds). Written to
    `metrics.json` under `reranker.test.new_items`."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)
    logits, users, items, seen, tables = test_inputs(run)
    new = retrieval_eval.new_item_mask(tables, runs.run_data(run)[1])
    wanted = new[items]
    if not wanted.any():
        return None
    shelf = np.where(new[None, :], logits, -np.inf)  # old items can never reach the shelf
    depth = min(depth, int(new.sum()))  # users have no training row with a new item
    user_rows = np.unique(users[wanted])
    top, final = rerank_scores(reranker, shelf, seen, user_rows, tables.user_ids, tables.item_ids,
                               depth)
    head = _head_scores(reranker, logits, user_rows, top, tables)
    hit_rate = lambda scores: round(metrics.evaluate(scores, users[wanted], items[wanted], seen,
                                                     (k,))[f"hit_rate@{k}"], 5)
    result = {"new_items": int(new.sum()), "test_rows": int(wanted.sum()), "depth": depth,
              f"shelf_hit_rate@{k}": {
                  "retrieval": hit_rate(shelf),
                  "reranked": hit_rate(ranking.rows_replaced(
                      shelf, user_rows, ranking.reordered(shelf[user_rows], top, final))),
                  "head_only": hit_rate(ranking.rows_replaced(
                      shelf, user_rows, ranking.reordered(shelf[user_rows], top, head)))}}
    if record:  # beside the test table `evaluate_reranker` wrote, if any
        runs.update_metrics(run, {"new_items": result}, ("reranker", "test"))
    return result


def format_new_items(result: dict, k: int = 10) -> str:
    shelf = result[f"shelf_hit_rate@{k}"]
    base = shelf["retrieval"]
    lines = [f"New-arrivals shelf ({result['new_items']:,} items without a training row; "
             f"{result['test_rows']:,} test interactions with them; the re-ranker reorders each "
             f"user's top {result['depth']} of them):", "",
             f"| shelf ranking | hit rate@{k} | vs retrieval |", "|---|---|---|"]
    labels = {"retrieval": "retrieval alone", "head_only": "re-ranked without BERT (scalar terms)",
              "reranked": "re-ranked (cross-encoder)"}
    for name in ("retrieval", "head_only", "reranked"):
        ratio = f"{shelf[name] / base:.2f}x" if base else "-"
        lines.append(f"| {labels[name]} | {shelf[name]:.4f} | {ratio} |")
    return "\n".join(lines)


def _head_scores(reranker: ce.Reranker, logits: np.ndarray, user_rows: np.ndarray,
                 top: np.ndarray, tables) -> np.ndarray:
    """[U, K] final scores of each user's candidates `top` without the BERT term (the ablation)."""
    popularity = reranker.texts.popularity.lookup(
        ce.tf.constant(tables.item_ids[top].astype(str))).numpy()
    ease = reranker.texts.ease_pairs(tables.user_ids[user_rows], tables.item_ids[top])
    return ce.head_scores(reranker.encoder, np.take_along_axis(logits[user_rows], top, 1),
                          popularity, ease)


def reranker_l2(run: pathlib.Path) -> float:
    """The EASE l2 the run's re-ranker was trained with (the config default for older runs)."""
    record = json.loads((run / ce.RERANKER_DIR / ce.CONFIG_FILE).read_text())
    return float(record.get("ease_l2", ce.RerankerConfig.ease_l2))


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model, HR@10, NDCG@10, Recall@10, and the change over retrieval."""
    base = table["retrieval"]
    columns = ("hit_rate@10", "ndcg@10", "recall@10")
    lines = ["| model | " + " | ".join(columns) + " | HR@10 vs retrieval | NDCG@10 vs retrieval |",
             "|---" * (len(columns) + 3) + "|"]
    for name, row in table.items():
        change = [f"{(row[c] / base[c] - 1) * 100:+.1f}%" for c in ("hit_rate@10", "ndcg@10")]
        lines.append(f"| {_label(name)} | " + " | ".join(f"{row[c]:.4f}" for c in columns)
                     + " | " + " | ".join(change) + " |")
    return "\n".join(lines)


def _label(name: str) -> str:
    if name.startswith("reranked@"):
        return f"retrieval top-{name.split('@')[1]} re-ranked (cross-encoder)"
    if name.startswith("head@"):
        return (f"retrieval top-{name.split('@')[1]}, learned retrieval + popularity + EASE terms "
                "only (no BERT)")
    return {"retrieval": "retrieval alone", "als": "ALS", "ease": "EASE"}.get(name, name)


def _rounded(result: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 5) for key, value in result.items()}
