"""Evaluation of the retrieval stage: hit rate, recall and NDCG on a run's test split, training
items excluded, beside the popularity, ALS and EASE peers (`cascade evaluate retrieval`)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from towers import data, features, metrics, model, peers, runs

def evaluate_model(retrieval: model.RetrievalModel, tables: features.FeatureTables,
                   test: data.Interactions, ks: tuple[int, ...] = (10, 50, 100)) -> dict[str, float]:
    """Hit rate / Recall / NDCG of the model on `test`, training items excluded."""
    queries, candidates = model.embeddings(retrieval, tables)
    users, items, seen = test_rows(tables, test)
    return metrics.evaluate(queries @ candidates.T, users, items, seen, ks)


def evaluate_run(run_dir: str | os.PathLike, ks: tuple[int, ...] = (10, 50, 100),
                 with_peers: bool = True) -> dict:
    """Evaluates a run on its test split beside popularity, ALS and EASE; writes metrics.json."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    test = runs.run_data(run)[1].test
    queries, candidates = model.embeddings(retrieval, tables)
    users, items, seen = test_rows(tables, test)
    scores = queries @ candidates.T
    table = {
        "cascade_retrieval": metrics.evaluate(scores, users, items, seen, ks),
        "cascade_retrieval_no_exclusion": metrics.evaluate(scores, users, items, None, ks),
    }
    if with_peers:
        table["popularity"] = metrics.evaluate(peers.popularity_scores(seen), users, items, seen, ks)
        table["als"] = metrics.evaluate(peers.als_scores(seen), users, items, seen, ks)
        table["ease"] = metrics.evaluate(peers.ease_scores(seen), users, items, seen, ks)
    runs.update_metrics(run, {"test": table})
    return table


def protocol_line(run_dir: str | os.PathLike) -> str:
    """One line naming the run's dataset, protocol and split sizes, printed above every table."""
    source = runs.data_config(run_dir)
    dataset, split = source.load()
    how = ("the folder's own files" if split.protocol == "pre-split" else
           f"test share {source.test_share}, seed {source.seed}")
    return (f"dataset: {dataset.name} ({source.data_dir}); protocol: {split.protocol} ({how}); "
            f"{len(split.train):,} training / {len(split.test):,} test rows, "
            f"{len(set(split.test.user_id) - set(split.train.user_id)):,} test users and "
            f"{len(set(split.test.item_id) - set(split.train.item_id)):,} test items without "
            "a training row")


def format_table(table: dict[str, dict[str, float]], ks: tuple[int, ...] = (10, 50, 100)) -> str:
    """A Markdown table with one row per model."""
    columns = [f"{m}@{k}" for m in ("hit_rate", "recall", "ndcg") for k in ks]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def test_rows(tables: features.FeatureTables, test: data.Interactions):
    user_row = {u: r for r, u in enumerate(tables.user_ids)}
    item_row = {i: r for r, i in enumerate(tables.item_ids)}
    users = np.array([user_row[u] for u in test.user_id])
    items = np.array([item_row[i] for i in test.item_id])
    seen = np.zeros((len(tables.user_ids), len(tables.item_ids)), bool)  # [U, I]: issue #16
    for row, ids in enumerate(tables.seen):
        seen[row, [item_row[i] for i in ids if i != features.PAD]] = True
    return users, items, seen
