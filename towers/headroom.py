"""How far a re-weighting of the cascade's scalar signals can go (`cascade evaluate retrieval
--headroom`): a diagnostic, not a model.

The re-ranker's final score adds learned weights on the two-tower logit, the EASE score and item
popularity (`rerank.cross_encoder.CrossEncoder`), fit on held-out training rows. This asks the
question a target on the test split raises: what is the best hit rate@K *any* weighting of those
three signals reaches there? Each signal is standardized per user over the items the user has not
seen (so one weight fits users of every activity), and the mix `ease + a * two_tower +
b * popularity` is scored on a grid of (a, b), beside each signal alone. Two numbers come out:

- **oracle**: the grid point best on the test rows themselves: an upper bound, since the weights
  are chosen on the very rows they are measured on;
- **cross-fit**: the test users split in two halves at random (`seed`); the weights best on one
  half are measured on the other, and the other way round: what choosing weights can honestly
  reach with test-sized data to choose on.

If even the oracle stays below a target, no re-weighting (and no re-ranker that only re-weights
these signals) reaches it: it takes a stronger signal. Memory: blocks of `batch` users x items.
"""

from __future__ import annotations

import itertools
import os
import pathlib

import numpy as np

from towers import data, metrics, model, peers, retrieval_eval, runs

# Weights of the two-tower and popularity signals beside EASE's (1), all standardized per user.
TWO_TOWER_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
POPULARITY_WEIGHTS = (0.0, 0.1, 0.25, 0.5)


def standardized(block: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Each row of `block` [B, I] standardized over its unseen items (`seen` bool [B, I]);
    seen items get 0 (the caller masks them). A row whose unseen scores are all equal gets 0."""
    block = np.asarray(block, np.float64)
    unseen = ~seen
    count = np.maximum(unseen.sum(1, keepdims=True), 1)
    mean = np.where(unseen, block, 0.0).sum(1, keepdims=True) / count
    var = np.where(unseen, (block - mean) ** 2, 0.0).sum(1, keepdims=True) / count
    std = np.sqrt(var)
    z = np.divide(block - mean, std, out=np.zeros_like(block), where=std > 0)
    return np.where(seen, 0.0, z)


def mix_hits(signals: dict[str, metrics.Scores], seen, user_rows: np.ndarray,
             item_rows: np.ndarray, k: int = 10, batch: int = 512,
             grid: list[tuple[float, float]] | None = None) -> dict[str, np.ndarray]:
    """bool hits [N] of each test pair (user_rows[j], item_rows[j]) in the user's top `k`, for
    each signal alone (`signals`: `ease`, `two_tower`, `popularity`, [U, I] each) and for each mix
    `mix a=.. b=..` of the grid (default TWO_TOWER_WEIGHTS x POPULARITY_WEIGHTS)."""
    missing = {"ease", "two_tower", "popularity"} - set(signals)
    if missing:
        raise ValueError(f"headroom needs the signals {sorted(missing)}")
    grid = grid or list(itertools.product(TWO_TOWER_WEIGHTS, POPULARITY_WEIGHTS))
    user_rows, item_rows = np.asarray(user_rows), np.asarray(item_rows)
    names = [*signals] + [mix_name(a, b) for a, b in grid]
    hits = {name: np.zeros(len(user_rows), bool) for name in names}
    users = np.unique(user_rows)
    for start in range(0, len(users), batch):
        part = users[start:start + batch]
        block_seen = metrics.seen_block(seen, part)
        z = {name: standardized(scores[part], block_seen) for name, scores in signals.items()}
        rows = np.flatnonzero(np.isin(user_rows, part))
        where = np.searchsorted(part, user_rows[rows])
        for name, score in itertools.chain(
                z.items(), ((mix_name(a, b), z["ease"] + a * z["two_tower"] + b * z["popularity"])
                            for a, b in grid)):
            top = metrics.top_items(np.where(block_seen, -np.inf, score), k)
            hits[name][rows] = (top[where] == item_rows[rows, None]).any(1)
    return hits


def mix_name(two_tower: float, popularity: float) -> str:
    return f"mix a={two_tower:g} b={popularity:g}"


def summarize(hits: dict[str, np.ndarray], user_rows: np.ndarray, seed: int = 0) -> dict:
    """{alone, oracle, cross_fit, rows} from `mix_hits`' hits (see the module's docstring)."""
    user_rows = np.asarray(user_rows)
    mixes = [name for name in hits if name.startswith("mix ")]
    users = np.unique(user_rows)
    half = np.isin(user_rows, np.random.default_rng(seed).permutation(users)[:len(users) // 2])
    chosen, total = [], 0
    for fit, measure in ((half, ~half), (~half, half)):
        best = max(mixes, key=lambda name: (hits[name][fit].mean(), -mixes.index(name)))
        chosen.append(best)
        total += int(hits[best][measure].sum())
    oracle = max(mixes, key=lambda name: (hits[name].mean(), -mixes.index(name)))
    return {"rows": len(user_rows),
            "alone": {name: float(hits[name].mean()) for name in hits if name not in mixes},
            "oracle": {"hit_rate": float(hits[oracle].mean()), "weights": oracle},
            "cross_fit": {"hit_rate": total / len(user_rows), "weights": chosen, "seed": seed},
            "grid": {name: float(hits[name].mean()) for name in mixes}}


def evaluate_run(run_dir: str | os.PathLike, k: int = 10, seed: int = 0,
                 loaded: tuple[data.Dataset, data.Split] | None = None) -> dict:
    """The headroom of the run's test split; recorded as `headroom` in its metrics.json."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    test = (loaded or runs.run_data(run))[1].test
    users, items, seen = retrieval_eval.test_rows(tables, test)
    queries, candidates = model.embeddings(retrieval, tables)
    popularity = np.log1p(peers.popularity_scores(seen)[0]).astype(np.float64)
    signals = {"ease": peers.ease_scores(seen),
               "two_tower": metrics.embedding_scores(queries, candidates),
               "popularity": metrics.Scores(
                   seen.shape, lambda rows: np.broadcast_to(popularity, (len(rows), len(popularity))))}
    result = {"k": k, **summarize(mix_hits(signals, seen, users, items, k), users, seed)}
    runs.update_metrics(run, {"headroom": result})
    return result


def format_result(result: dict) -> str:
    k = result["k"]
    alone = result["alone"]
    return "\n".join([
        f"Headroom of re-weighting the scalar signals (test split, {result['rows']:,} rows, "
        f"hit rate@{k}; each signal standardized per user; mix = ease + a * two_tower + "
        f"b * popularity):",
        f"| signal or mix | hit rate@{k} |", "|---|---|",
        *(f"| {name} alone | {value:.4f} |" for name, value in alone.items()),
        f"| best mix, weights chosen on these test rows (an upper bound; "
        f"{result['oracle']['weights']}) | {result['oracle']['hit_rate']:.4f} |",
        f"| mix, weights chosen on the other half of the test users "
        f"({' / '.join(result['cross_fit']['weights'])}) | {result['cross_fit']['hit_rate']:.4f} |"])
