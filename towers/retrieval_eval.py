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


def evaluate_new_items(run_dir: str | os.PathLike, k: int = 10, seed: int = 0) -> dict | None:
    """The new-arrivals view of a split whose test holds items without a training row (the
    `cold-items` protocol; a pre-split folder may too): None when it has none. For the test
    interactions with such an item, and each ranking (the run's retrieval; the category profile,
    the user's training categories against the item's; random):

    - `shelf_hit_rate@k`: hit rate@k when each user is shown only the new items (the "new
      arrivals" shelf), training items excluded;
    - `hit_rate@k` of those interactions in the full ranking, and `new_share@k`, the share of
      every test user's top k that is new items.
    Records the result as `test.new_items` in metrics.json."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    dataset, split = runs.run_data(run)
    new = new_item_mask(tables, split)
    users, items, seen = test_rows(tables, split.test)
    wanted = new[items]
    if not wanted.any():
        return None
    queries, candidates = model.embeddings(retrieval, tables)
    rankings = {"cascade_retrieval": queries @ candidates.T,
                "category_profile": category_profile_scores(dataset, tables, seen),
                "random": np.random.default_rng(seed).random(seen.shape, np.float32)}
    test_users = np.unique(users)
    result = {"new_items": int(new.sum()), "test_rows": int(wanted.sum()),
              "test_users": int(len(np.unique(users[wanted])))}
    for name, scores in rankings.items():
        shelf = np.where(new[None, :], scores, -np.inf)
        top = metrics.rankings(scores, seen, depth=k)[test_users]  # [test users, k]
        result[name] = {
            f"shelf_hit_rate@{k}": metrics.evaluate(shelf, users[wanted], items[wanted], seen,
                                                    (k,))[f"hit_rate@{k}"],
            f"hit_rate@{k}": metrics.evaluate(scores, users[wanted], items[wanted], seen,
                                              (k,))[f"hit_rate@{k}"],
            f"new_share@{k}": float(new[top].mean())}
    runs.update_metrics(run, {"new_items": result}, "test")  # beside the test table
    return result


def new_item_mask(tables: features.FeatureTables, split: data.Split) -> np.ndarray:
    """bool [I]: the items of the run's tables without a training row in `split`."""
    trained = set(split.train.item_id)
    return np.array([item not in trained for item in tables.item_ids.astype(str)])


def category_profile_scores(dataset: data.Dataset, tables: features.FeatureTables,
                            seen: np.ndarray) -> np.ndarray:
    """[U, I] cosine between each user's training category counts and each item's categories
    (the card's `text.categories` field): the content baseline for new items. Zero for an item
    or a user without categories."""
    facts = dataset.facts(tables.item_ids.astype(str))
    names = sorted({c for fact in facts for c in fact.categories})
    column = {name: j for j, name in enumerate(names)}
    item_categories = np.zeros((len(facts), max(len(names), 1)), np.float32)
    for row, fact in enumerate(facts):
        item_categories[row, [column[c] for c in fact.categories]] = 1.0
    profile = seen.astype(np.float32) @ item_categories  # [U, C]: training category counts

    def unit(matrix):
        norm = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norm > 0, norm, 1.0)
    return unit(profile) @ unit(item_categories).T


def format_new_items(result: dict, k: int = 10) -> str:
    """The new-items view as a Markdown table, one row per ranking."""
    columns = (f"shelf_hit_rate@{k}", f"hit_rate@{k}", f"new_share@{k}")
    lines = [f"New items (no training row): {result['new_items']:,}; {result['test_rows']:,} test "
             f"interactions with them, of {result['test_users']:,} users.", "",
             "| ranking | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in ("cascade_retrieval", "category_profile", "random"):
        lines.append(f"| {name} | " + " | ".join(f"{result[name][c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


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
