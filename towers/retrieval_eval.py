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
    users, items, seen = test_rows(tables, test)
    queries, candidates = model.embeddings(retrieval, tables, users=users)
    return metrics.evaluate(metrics.embedding_scores(queries, candidates), users, items, seen, ks)


def evaluate_run(run_dir: str | os.PathLike, ks: tuple[int, ...] = (10, 50, 100),
                 with_peers: bool = True, sample_users: int = 0, seed: int = 0,
                 loaded: tuple[data.Dataset, data.Split] | None = None) -> dict:
    """Evaluates a run on its test split beside popularity, ALS and EASE; writes metrics.json.
    `sample_users` > 0 keeps the test rows of that many test users drawn with `seed` (for very
    large data; the sample is recorded as `test_sample`). `loaded`: the run's `runs.run_data`,
    when the caller has it already."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    test = (loaded or runs.run_data(run))[1].test
    users, items, seen = test_rows(tables, test)
    users, items, sample = sample_test_rows(users, items, sample_users, seed)
    queries, candidates = model.embeddings(retrieval, tables, users=users)
    scores = metrics.embedding_scores(queries, candidates)
    table = {
        "cascade_retrieval": metrics.evaluate(scores, users, items, seen, ks),
        "cascade_retrieval_no_exclusion": metrics.evaluate(scores, users, items, None, ks),
    }
    if with_peers:
        table["popularity"] = metrics.evaluate(peers.popularity_scores(seen), users, items, seen, ks)
        table["als"] = metrics.evaluate(peers.als_scores(seen), users, items, seen, ks)
        table["ease"] = metrics.evaluate(peers.ease_scores(seen), users, items, seen, ks)
    runs.update_metrics(run, {"test": table, "test_sample": sample})
    return table


def sample_test_rows(users: np.ndarray, items: np.ndarray, sample_users: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """The test rows of `sample_users` test users drawn with `seed` (all when 0 or more than
    there are), and the record of the sample (None: every test user)."""
    test_users = np.unique(users)
    if not 0 < sample_users < len(test_users):
        return users, items, None
    chosen = np.random.default_rng(seed).choice(test_users, sample_users, replace=False)
    keep = np.isin(users, chosen)
    return users[keep], items[keep], {"users": sample_users, "of_users": len(test_users),
                                      "rows": int(keep.sum()), "seed": seed}


def evaluate_new_items(run_dir: str | os.PathLike, k: int = 10, seed: int = 0,
                       loaded: tuple[data.Dataset, data.Split] | None = None,
                       sample_users: int = 0) -> dict | None:
    """The new-arrivals view of a split whose test holds items without a training row (the
    `cold-items` protocol; a pre-split folder may too): None when it has none. For the test
    interactions with such an item, and each ranking (the run's retrieval; the category profile,
    the user's training categories against the item's; content popularity, the item's training
    count as predicted from its categories and year, the same for every user; random):

    - `shelf_hit_rate@k`: hit rate@k when each user is shown only the new items (the "new
      arrivals" shelf), training items excluded;
    - `hit_rate@k` of those interactions in the full ranking, and `new_share@k`, the share of
      every test user's top k that is new items.
    `sample_users` > 0: the test users `evaluate_run` samples with the same number and `seed`.
    Records the result as `test.new_items` in metrics.json."""
    run = pathlib.Path(run_dir)
    dataset, split = loaded or runs.run_data(run)
    retrieval, tables = runs.load_run(run)
    new = new_item_mask(tables, split)
    users, items, seen = test_rows(tables, split.test)
    users, items, _ = sample_test_rows(users, items, sample_users, seed)
    wanted = new[items]
    if not wanted.any():
        return None
    queries, candidates = model.embeddings(retrieval, tables, users=users)  # only those ranked
    # A content baseline needs content: without categories (or a year) on the new items it is
    # one constant, whose shelf order is the item table's, so it is left out and says why.
    facts = dataset.facts(tables.item_ids[new].astype(str))
    categories = any(f.categories for f in facts)
    content = categories or any(f.year != data.UNKNOWN_YEAR for f in facts)
    rankings = {"cascade_retrieval": metrics.embedding_scores(queries, candidates)}
    if categories:
        rankings["category_profile"] = category_profile_scores(dataset, tables, seen)
    if content:
        rankings["content_popularity"] = content_popularity_scores(dataset, tables, seen)
    rankings["random"] = random_scores(seen.shape, seed)
    test_users = np.unique(users)
    result = {"new_items": int(new.sum()), "test_rows": int(wanted.sum()),
              "test_users": int(len(np.unique(users[wanted]))),
              # the towers embed every new item alike: no feature tells them apart
              "alike": bool(np.ptp(candidates[new], axis=0).max() < 1e-6) if new.sum() > 1
              else False}
    for name, scores in rankings.items():
        shelf = metrics.Scores(scores.shape, lambda rows, scores=scores: np.where(
            new[None, :], scores[rows], -np.inf))
        top = metrics.rankings(scores, seen, depth=k, users=test_users)  # [test users, k]
        result[name] = {
            f"shelf_hit_rate@{k}": metrics.evaluate(shelf, users[wanted], items[wanted], seen,
                                                    (k,))[f"hit_rate@{k}"],
            f"hit_rate@{k}": metrics.evaluate(scores, users[wanted], items[wanted], seen,
                                              (k,))[f"hit_rate@{k}"],
            f"new_share@{k}": float(new[top].mean())}
    runs.update_metrics(run, {"new_items": result}, "test")  # beside the test table
    return result


def evaluate_new_users(run_dir: str | os.PathLike, k: int = 10, seed: int = 0,
                       loaded: tuple[data.Dataset, data.Split] | None = None) -> dict | None:
    """The new-users view of a split whose test holds users without a training row (the
    `temporal` protocol; a pre-split folder may too): None when it has none. For the test
    interactions of those users, hit rate@k of the run's retrieval (their query built from the
    user features the card declares, through the cold ID row), of popularity (what a system
    without user features can do) and of random. Recorded as `test.new_users` in metrics.json."""
    run = pathlib.Path(run_dir)
    _, split = loaded or runs.run_data(run)
    retrieval, tables = runs.load_run(run)
    users, items, seen = test_rows(tables, split.test)
    known = np.isin(tables.user_ids.astype(str), split.train.user_id.astype(str))
    wanted = ~known[users]
    if not wanted.any():
        return None
    users, items = users[wanted], items[wanted]
    queries, candidates = model.embeddings(retrieval, tables, users=users)
    trending, half_life = trending_popularity(tables, split.train)
    rankings = {"cascade_retrieval": metrics.embedding_scores(queries, candidates),
                "popularity": peers.popularity_scores(seen),
                "trending_popularity": np.broadcast_to(trending, seen.shape),
                "random": random_scores(seen.shape, seed)}
    result = {"new_users": int(len(np.unique(users))), "test_rows": int(len(users)),
              **{name: metrics.evaluate(scores, users, items, seen, (k,))[f"hit_rate@{k}"]
                 for name, scores in rankings.items()},
              "trending_half_life": half_life}
    runs.update_metrics(run, {"new_users": result}, "test")
    return result


# The newest share of the training rows under `temporal` (their last rows) on which the trending
# baseline's half-life is chosen; the re-ranker's popularity term chooses on its --holdout rows.
TRENDING_HOLDOUT_SHARE = 0.2


def trending_popularity(tables: features.FeatureTables, train: data.Interactions
                        ) -> tuple[np.ndarray, float | None]:
    """(float64 [I] log(1 + recency-weighted training counts), the half-life): the half-life
    chosen by `towers.peers.choose_half_life` on the last `TRENDING_HOLDOUT_SHARE` of the training
    rows (under `temporal` the newest, never the test split), counted from the others; the
    counts then from every training row. All-time counts (None) unless recency beats them there."""
    item_rows = features.rows_of(tables.item_ids, train.item_id, "item")
    user_rows = features.rows_of(tables.user_ids, train.user_id, "user")
    fit = slice(0, len(train) - max(1, int(len(train) * TRENDING_HOLDOUT_SHARE)))
    out = slice(fit.stop, None)
    seen = peers.seen_matrix(user_rows[fit], item_rows[fit], len(tables.user_ids),
                             len(tables.item_ids))
    half_life, _ = peers.choose_half_life(item_rows[fit], train.timestamp[fit], seen,
                                          user_rows[out], item_rows[out])
    counts = peers.decayed_counts(item_rows, train.timestamp, len(tables.item_ids), half_life)
    return np.log1p(counts), half_life


def format_new_users(result: dict, k: int = 10) -> str:
    lines = [f"New users (no training row): {result['new_users']:,}, with {result['test_rows']:,} "
             "test interactions.", "", f"| ranking | hit_rate@{k} |", "|---|---|"]
    half_life = result.get("trending_half_life")
    labels = {"trending_popularity": "trending_popularity (" + (
        "all-time counts: no half-life beat them on the newest training rows" if half_life is None
        else f"{peers.half_life_text(half_life)}, chosen on the newest training rows") + ")"}
    lines += [f"| {labels.get(name, name)} | {result[name]:.4f} |"
              for name in ("cascade_retrieval", "popularity", "trending_popularity", "random")
              if name in result]
    return "\n".join(lines)


def new_item_mask(tables: features.FeatureTables, split: data.Split) -> np.ndarray:
    """bool [I]: the items of the run's tables without a training row in `split`."""
    return ~np.isin(tables.item_ids.astype(str), split.train.item_id.astype(str))


def random_scores(shape: tuple[int, int], seed: int = 0) -> metrics.Scores:
    """[U, I] uniform scores, each user's row its own stream (seed, user row): the same whatever
    the block of users asked for."""
    return metrics.Scores(shape, lambda rows: np.stack(
        [np.random.default_rng((seed, int(row))).random(shape[1], np.float32) for row in rows]))


def category_profile_scores(dataset: data.Dataset, tables: features.FeatureTables,
                            seen) -> metrics.Scores:
    """[U, I] cosine between each user's training category counts and each item's categories
    (the card's `text.categories` field): the content baseline for new items. Zero for an item
    or a user without categories."""
    facts = dataset.facts(tables.item_ids.astype(str))
    names = sorted({c for fact in facts for c in fact.categories})
    column = {name: j for j, name in enumerate(names)}
    item_categories = np.zeros((len(facts), max(len(names), 1)), np.float32)
    for row, fact in enumerate(facts):
        item_categories[row, [column[c] for c in fact.categories]] = 1.0
    profile = np.asarray(seen @ item_categories, np.float32)  # [U, C]: training category counts

    def unit(matrix):
        norm = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norm > 0, norm, 1.0)
    return metrics.embedding_scores(unit(profile), unit(item_categories))


def content_popularity_scores(dataset: data.Dataset, tables: features.FeatureTables,
                              seen) -> np.ndarray:
    """[U, I] (a broadcast view): `peers.content_popularity` of each item, fit on the items' training
    counts (`seen`), the same for every user: the ranking by predicted popularity alone."""
    facts = dataset.facts(tables.item_ids.astype(str))
    prior = peers.content_popularity([f.categories for f in facts], [f.year for f in facts],
                                     np.asarray(seen.sum(axis=0)).ravel())
    return np.broadcast_to(prior, seen.shape)


def format_new_items(result: dict, k: int = 10) -> str:
    """The new-items view as a Markdown table, one row per ranking."""
    columns = (f"shelf_hit_rate@{k}", f"hit_rate@{k}", f"new_share@{k}")
    lines = [f"New items (no training row): {result['new_items']:,}; {result['test_rows']:,} test "
             f"interactions with them, of {result['test_users']:,} users.", "",
             "| ranking | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in ("cascade_retrieval", "category_profile", "content_popularity", "random"):
        if name in result:
            lines.append(f"| {name} | " + " | ".join(f"{result[name][c]:.4f}" for c in columns)
                         + " |")
    notes = {"category_profile": "no new item has categories", "content_popularity":
             "no new item has categories or a year"}
    missing = [f"{name} ({why})" for name, why in notes.items() if name not in result]
    if missing:
        lines += ["", "Not computed, the data has nothing to compute them from: "
                  + "; ".join(missing) + "."]
    if result.get("alike"):
        lines += ["", "Every new item has the same features here (none the towers read), so "
                  "cascade_retrieval ranks them all alike and its shelf order is the item "
                  "table's: read it as chance."]
    return "\n".join(lines)


def protocol_line(run_dir: str | os.PathLike,
                  loaded: tuple[data.Dataset, data.Split] | None = None) -> str:
    """One line naming the run's dataset, protocol and split sizes, printed above every table."""
    source = runs.data_config(run_dir)
    dataset, split = loaded or source.load()
    new = lambda side: len(np.setdiff1d(getattr(split.test, side), getattr(split.train, side)))
    how = ("the folder's own files" if split.protocol == "pre-split" else
           f"test share {source.test_share}, seed {source.seed}")
    return (f"dataset: {dataset.name} ({source.data_dir}); protocol: {split.protocol} ({how}); "
            f"{len(split.train):,} training / {len(split.test):,} test rows, "
            f"{new('user_id'):,} test users and {new('item_id'):,} test items without "
            "a training row")


# Entries of the recorded test table that are views of their own, not a model's row.
VIEWS = ("new_items", "new_users")


def format_table(table: dict[str, dict[str, float]], ks: tuple[int, ...] = (10, 50, 100)) -> str:
    """A Markdown table with one row per model (the `VIEWS` a recorded table holds are left out:
    `format_new_items` and `format_new_users` print them)."""
    columns = [f"{m}@{k}" for m in ("hit_rate", "recall", "ndcg") for k in ks]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        if name in VIEWS:
            continue
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def test_rows(tables: features.FeatureTables, test: data.Interactions):
    """(user rows [N], item rows [N], seen): the test pairs as rows of the tables, and the
    training pairs as a sparse [U, I] matrix (its size is the number of interactions)."""
    return (features.rows_of(tables.user_ids, test.user_id, "user"),
            features.rows_of(tables.item_ids, test.item_id, "item"), tables.seen_matrix())
