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
    popularity = reranker.texts.popularity.lookup(
        ce.tf.constant(tables.item_ids[top].astype(str))).numpy()
    ease = reranker.texts.ease_pairs(tables.user_ids[user_rows], tables.item_ids[top])
    head = ce.head_scores(reranker.encoder, np.take_along_axis(logits[user_rows], top, 1),
                          popularity, ease)
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
