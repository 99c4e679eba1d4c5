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

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import scipy.sparse

from rerank import cross_encoder as ce
from rerank import ranking
from towers import metrics, peers
from towers import retrieval_eval, runs, sources
from towers import model as towers_model

log = logging.getLogger(__name__)

KS = (10,)
DEPTHS = (50, 100)


def test_inputs(run_dir: str | os.PathLike):
    """(retrieval logits [U, I] (`metrics.Scores`, a block of users at a time), test user rows,
    test item rows, seen (sparse [U, I]), tables) of a run."""
    run = pathlib.Path(run_dir)
    retrieval, tables = runs.load_run(run)
    test = runs.run_data(run)[1].test
    queries, candidates = towers_model.embeddings(retrieval, tables)
    users, items, seen = retrieval_eval.test_rows(tables, test)
    logits = metrics.embedding_scores(queries, candidates, 1.0 / retrieval.config.temperature)
    return logits, users, items, seen, tables


def rerank_scores(reranker: ce.Reranker, logits, seen, user_rows: np.ndarray,
                  user_ids: np.ndarray, item_ids: np.ndarray, depth: int,
                  users_per_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(top `depth` item rows [U, depth] of `user_rows` by retrieval, seen items left out, and
    the re-ranker's final scores of them [U, depth])."""
    top = ranking.top_candidates(logits, seen, depth, users=user_rows)
    final = ce.score_candidates(reranker, user_ids[user_rows], item_ids[top],
                                ranking.pair_scores(logits, user_rows, top), users_per_batch)
    return top, final


def evaluate_reranker(run_dir: str | os.PathLike, depths: tuple[int, ...] = DEPTHS,
                      with_als: bool = True, record: bool = True) -> dict[str, dict[str, float]]:
    """The test table: retrieval, ALS, EASE, the head ablation and the re-ranked top K for each
    depth, and, when the re-ranker was trained on merged candidate sources, the same two over
    them; written to `metrics.json` under `reranker.test` (with the seconds re-ranking took, the
    candidates' hit rates and the table per user-activity and item-count bucket)."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)  # fails first, with the command to run, if not trained
    logits, users, items, seen, tables = test_inputs(run)
    rankings = {"retrieval": logits}  # name: [U, I] scores whose order is that model's ranking
    if with_als:
        rankings["als"] = peers.als_scores(seen)
        rankings["ease"] = peers.ease_scores(seen, reranker_l2(run))
    deepest = max(depths)
    user_rows = np.unique(users)
    started = time.perf_counter()
    top, final = rerank_scores(reranker, logits, seen, user_rows, tables.user_ids, tables.item_ids,
                               deepest)
    seconds = time.perf_counter() - started
    pool, features = top, _head_features(reranker, logits, user_rows, top, tables)
    head = ce.head_scores(reranker.encoder, *features)
    replaced = lambda candidates, scores: ranking.reranked(logits, user_rows, candidates, scores)
    for depth in sorted(depths):
        part = slice(0, depth)  # retrieval's top `depth` are the first columns of the deepest top
        rankings[f"head@{depth}"] = replaced(top[:, part], head[:, part])
        rankings[f"reranked@{depth}"] = replaced(top[:, part], final[:, part])
    source = reranker_sources(run)
    candidates = None
    if source.item_item or source.new_items:  # the served candidates: merged, then two passes
        merged, codes = sources.batched(logits, seen, reranker.texts.neighbours(),
                                        tables.item_count, source, users=user_rows)
        pool, features = merged, _head_features(reranker, logits, user_rows, merged, tables)
        rankings["head@merged"] = replaced(merged, ce.head_scores(reranker.encoder, *features))
        rankings["reranked@merged"] = replaced(*ce.rerank_candidates(
            reranker, tables.user_ids[user_rows], tables.item_ids, merged,
            ranking.pair_scores(logits, user_rows, merged), source.two_tower))
        candidates = _candidate_rates(reranker, logits, seen, users, items, user_rows, merged,
                                      codes, source)
    pool_name = "merged" if candidates is not None else str(deepest)
    for term, weights in TERM_WEIGHTS.items():  # each scalar term's ablation, on the same pool
        with without(reranker.encoder, weights):
            rankings[f"head-{term}@{pool_name}"] = replaced(pool, ce.head_scores(reranker.encoder,
                                                                                 *features))
    served = ce.served_depth(run)
    if served < source.two_tower:  # the cascade's BERT re-scores fewer (`sweep_depth`)
        rankings[f"served@{served}"] = replaced(*ce.rerank_candidates(
            reranker, tables.user_ids[user_rows], tables.item_ids, pool,
            ranking.pair_scores(logits, user_rows, pool), served))
    table = {name: _rounded(metrics.evaluate(scores, users, items, seen, KS))
             for name, scores in rankings.items()}
    buckets = bucket_table(rankings, users, items, seen, tables.item_count)
    if record:
        runs.update_metrics(
            run, {"test": {**table, "pairs": int(top.size), "seconds": round(seconds, 1),
                           "buckets": buckets,
                           **({"candidates": candidates} if candidates else {})}}, "reranker")
    return table


# Each scalar term of the head, by the weights that carry it (the retrieval logit also has a
# weight of its own for items without training rows).
TERM_WEIGHTS = {"retrieval": ("retrieval_weight", "new_retrieval_weight"),
                "popularity": ("popularity_weight",), "ease": ("ease_weight",)}


@contextlib.contextmanager
def without(encoder: ce.CrossEncoder, weights: tuple[str, ...]):
    """The encoder with these weights at 0 (a term knocked out, the others as fit, not refit),
    restored on leaving."""
    saved = {name: float(getattr(encoder, name)) for name in weights}
    try:
        for name in weights:
            getattr(encoder, name).assign(0.0)
        yield encoder
    finally:
        for name, value in saved.items():
            getattr(encoder, name).assign(value)


USER_BUCKETS = ((0, 0), (1, 5), (6, 20), (21, None))  # training interactions of the user
ITEM_BUCKETS = ((0, 0), (1, 5), (6, None))  # training interactions of the item


def bucket_table(rankings: dict, users: np.ndarray, items: np.ndarray, seen,
                 item_count: np.ndarray, k: int = 10) -> dict:
    """Hit rate@k of each ranking on the test rows of each user-activity bucket (the user's
    training interactions) and each item-count bucket (the item's): where each term and stage
    earns its place. Buckets without test rows are left out."""
    user_count = np.asarray(seen.sum(axis=1)).ravel()
    # Each test row's hit, once per ranking (the top k of `metrics.rankings`, as `evaluate`).
    test_users, index = np.unique(users, return_inverse=True)
    hits = {name: (metrics.rankings(scores, seen, depth=k, users=test_users)[index]
                   == items[:, None]).any(axis=1) for name, scores in rankings.items()}
    out = {}
    for side, count, rows, bounds in (("users", user_count, users, USER_BUCKETS),
                                      ("items", item_count, items, ITEM_BUCKETS)):
        for low, high in bounds:
            mask = (count[rows] >= low) & (count[rows] <= (np.inf if high is None else high))
            if not mask.any():
                continue
            label = f"{side} {low}-{high}" if high is not None else f"{side} >{low - 1}"
            if high == low:
                label = f"{side} {low}"
            out[label] = {"test_rows": int(mask.sum()),
                          **{name: round(float(hit[mask].mean()), 4) for name, hit in hits.items()}}
    return out


def format_buckets(buckets: dict, k: int = 10) -> str:
    """The bucket table: one row per bucket, one column per ranking (hit rate@k)."""
    names = [n for n in next(iter(buckets.values())) if n != "test_rows"]
    lines = [f"Hit rate@{k} by the user's and the item's training interactions:", "",
             "| bucket | test rows | " + " | ".join(_short(n) for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for label, row in buckets.items():
        lines.append(f"| {label} | {row['test_rows']:,} | "
                     + " | ".join(f"{row[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def _short(name: str) -> str:
    if name.startswith("head-"):
        term, pool = name[len("head-"):].split("@")
        return f"no BERT, no {_TERM_LABELS[term]} @{pool}"
    return {"retrieval": "retrieval", "als": "ALS", "ease": "EASE"}.get(
        name, name.replace("head@", "no BERT @").replace("reranked@", "re-ranked @"))


def _candidate_rates(reranker, logits, seen, users, items, user_rows, merged, codes,
                     source: sources.SourceConfig) -> dict:
    """Hit rates of the merged candidate set against each source alone at the same size, the
    share of slots per source and the test items each source found."""
    ease = reranker.texts.neighbours().scores(scipy.sparse.csr_matrix(seen[user_rows]))
    hit = lambda rows: round(sources.hit_rate(rows, users, items, user_rows), 5)
    found = merged[_where(user_rows, users)] == items[:, None]  # [N, K]
    origin = codes[_where(user_rows, users)]
    return {"k": source.k, **dataclasses.asdict(source),
            f"two_tower@{source.k}": hit(ranking.top_candidates(logits, seen, source.k,
                                                                 users=user_rows)),
            f"ease@{source.k}": hit(ranking.top_candidates(ease, seen[user_rows], source.k)),
            f"merged@{source.k}": hit(merged),
            "share": {name: round(float((codes == code).mean()), 4)
                      for code, name in enumerate(sources.SOURCES)},
            "hits_by_source": {name: round(float((found & (origin == code)).any(axis=1).mean()), 5)
                               for code, name in enumerate(sources.SOURCES)}}


def reranker_sources(run: pathlib.Path) -> sources.SourceConfig:
    """The candidate sources the run's re-ranker was trained with (a re-ranker trained before
    there were sources had the two-tower's list alone, as its export has)."""
    record = json.loads((run / ce.RERANKER_DIR / ce.CONFIG_FILE).read_text())
    return sources.SourceConfig(record.get("candidates", ce.RerankerConfig.candidates),
                                record.get("item_item_candidates", 0),
                                record.get("new_item_candidates", 0),
                                record.get("new_item_max_count", 0))


SWEEP = ((100, 0), (75, 25), (50, 50), (150, 0), (125, 25), (100, 50), (75, 75), (200, 0),
         (150, 50), (100, 100))  # (two-tower, item-to-item) slots


def sweep_candidates(run_dir: str | os.PathLike, slots=SWEEP) -> list[dict]:
    """How the candidate slots were chosen, on training rows only: the hit rate of the merged
    candidates on the re-ranker's validation rows (the held-out training rows it never trained
    on), from its shadow retrieval model, for each (two-tower, item-to-item) split of the slots.
    Needs a trained re-ranker (its shadow)."""
    from rerank import negatives

    run = pathlib.Path(run_dir)
    config = json.loads((run / ce.RERANKER_DIR / ce.CONFIG_FILE).read_text())
    shadow, tables = runs.load_run(run / ce.RERANKER_DIR / "shadow")
    train = runs.run_data(run)[1].train
    _, held_out = negatives.split_rows(train, config["holdout"])
    rows = np.arange(len(held_out) - int(len(held_out) * config["validation_share"]), len(held_out))
    users, items, seen = retrieval_eval.test_rows(tables, held_out.take(rows))
    queries, candidates = towers_model.embeddings(shadow, tables)
    user_rows = np.unique(users)
    logits = metrics.embedding_scores(queries, candidates)
    # The shadow's tables hold its own training rows: the weights the re-ranker trained with.
    neighbours = peers.ease_neighbours(seen, config["ease_l2"], config["ease_neighbours"],
                                       config.get("ease_max_items", peers.EASE_MAX_ITEMS))
    out = []
    for two_tower, item_item in slots:
        merged, _ = sources.batched(logits, seen, neighbours, tables.item_count,
                                    sources.SourceConfig(two_tower, item_item), users=user_rows)
        out.append({"two_tower": two_tower, "item_item": item_item, "k": two_tower + item_item,
                    "hit_rate": round(sources.hit_rate(merged, users, items, user_rows), 4)})
    return out


def validation_check(run_dir: str | os.PathLike) -> ce.RerankValidation:
    """The re-ranker's validation as its training ran it: its held-out rows (the validation
    share, the same sampled users), the shadow retrieval model and the merged candidates, user
    contexts and EASE weights from the shadow's training rows. Needs a trained re-ranker."""
    from rerank import negatives, pairs

    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)
    config = ce.run_config(run)
    shadow, tables = runs.load_run(run / ce.RERANKER_DIR / "shadow")
    dataset, split = runs.run_data(run)
    fit_rows, held_out = negatives.split_rows(split.train, config.holdout)
    users, items, seen = retrieval_eval.test_rows(tables, held_out)
    tail = slice(len(held_out) - int(len(held_out) * config.validation_share), None)
    keep = np.isin(users[tail], ce.validation_users(users[tail], config))
    users, items = users[tail][keep], items[tail][keep]
    queries, candidates = towers_model.embeddings(shadow, tables)
    logits = metrics.embedding_scores(queries, candidates, 1.0 / shadow.config.temperature)
    ease_l2 = config.ease_l2 if config.ease_feature or config.item_item_candidates else None
    texts = pairs.PairTexts.build(dataset, fit_rows, tables.user_ids, tables.item_ids,
                                  config.history_titles, ease_l2, config.ease_neighbours,
                                  ce.liked_rating(dataset), config.ease_max_items,
                                  ce.recorded_half_life(config))
    user_rows = np.unique(users)
    merged, _ = sources.batched(logits, seen, texts.neighbours(), tables.item_count,
                                ce.source_config(config), users=user_rows)
    return ce.RerankValidation(
        ce.Reranker(reranker.encoder, texts, reranker.tokenizer, config.max_length), logits,
        seen, users, items, tables.user_ids, tables.item_ids, merged, user_rows,
        config.candidates)


def sweep_depth(run_dir: str | os.PathLike, check: ce.RerankValidation | None = None
                ) -> list[dict]:
    """How many candidates the cascade's BERT re-scores, chosen on training rows only: the
    re-ranker's validation (`check`, else `validation_check`) re-ranked at each depth of
    `cross_encoder.depth_grid`; records the choice in the run (`cross_encoder.record_depth`)
    and returns the rows. What training does at its end, for a run trained before it did."""
    check = validation_check(run_dir) if check is None else check
    rows = check.depths(ce.depth_grid(check.depth))
    ce.record_depth(run_dir, rows)
    return rows


def calibrate(run_dir: str | os.PathLike) -> dict:
    """What training does at its end, for a run trained before it did: on the re-ranker's
    validation (`validation_check`) fits the BERT term's weights for items with and without
    training rows (`RerankValidation.fit_text_weights`), saves them into the run's re-ranker,
    then chooses the depth (`sweep_depth`'s rows, recorded). Returns {"text_weights", "depths"}."""
    check = validation_check(run_dir)
    weights = check.fit_text_weights()
    ce.save_encoder(check.reranker.encoder, run_dir)
    runs.update_metrics(pathlib.Path(run_dir), {"text_weights": weights},
                        ("reranker", "validation"))
    return {"text_weights": weights, "depths": sweep_depth(run_dir, check)}


def format_validation(validation: dict) -> str:
    """What `cascade train reranker` measured on its validation rows (held-out training rows,
    never the test split; `validation`: its `metrics.json` record), as a table and two lines:
    each ranking's metrics, the BERT term's weights and whether they were kept, the depth."""
    keys = ("hit_rate@10", "recall@10", "ndcg@10")
    rows = [("retrieval", validation.get("retrieval")),
            ("scalar terms (no BERT)", validation.get("head"))]
    rows += [(f"re-ranked, epoch {n}", m)
             for n, m in enumerate(validation.get("reranked_per_epoch", []), 1)]
    weights = validation.get("text_weights") or {}
    if weights.get("accepted"):
        rows.append(("re-ranked, BERT at its fitted weights (served)", weights["after"]))
    size = (f"{validation['rows']:,} held-out training rows of {validation['users']:,} users"
            if "rows" in validation else "held-out training rows")
    lines = [f"Validation ({size}; the candidates hold "
             f"{validation.get('candidates_hit_rate', float('nan')):.4f} of them):", "",
             "| ranking | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |"
              for name, m in rows if m]
    if weights:
        lines += ["", f"BERT term weight: {weights['text_weight']:.3f} for items with training "
                      f"rows, {weights['new_text_weight']:.3f} for items without (validation "
                      f"positives: {weights['rows']:,} / {weights['new_rows']:,})"]
        rejected = weights.get("rejected")
        if rejected:
            lines[-1] += (f"; the fit, {rejected['text_weight']:.3f} / "
                          f"{rejected['new_text_weight']:.3f}, lowered validation (hit rate@10 "
                          f"{weights['before']['hit_rate@10']:.4f} -> "
                          f"{rejected['metrics']['hit_rate@10']:.4f}) and was rejected")
        lines[-1] += "."
    if validation.get("depths"):
        sweep = ", ".join(f"{row['depth']}: {row['hit_rate@10']:.4f}"
                          for row in validation["depths"])
        lines += ["", f"Candidates BERT re-scores (hit rate@10 by depth; 0: no BERT): {sweep}; "
                      f"served: {validation.get('serve_depth')}."]
    return "\n".join(lines)


def format_head(training: dict) -> str:
    """The scalar terms as the re-ranker's training fit them on held-out rows (`training`: its
    `metrics.json` record), with the popularity counts they read."""
    head, chosen = training["head"], training.get("popularity_half_life", {})
    half_life = chosen.get("chosen")
    if half_life is None:
        counts = "all-time counts" + (
            " (no half-life raised the held-out popularity hit rate beyond noise)"
            if chosen.get("tried") else "")
    else:
        counts = f"recent rows counted more, {peers.half_life_text(half_life)}"
        tried = chosen.get("tried") or []
        if tried:
            best = next(r for r in tried if r["half_life"] == half_life)
            counts += (f", chosen on held-out rows: popularity hit rate@100 "
                       f"{tried[0]['hit_rate@100']:.4f} all-time -> {best['hit_rate@100']:.4f}")
    new = head.get("new_positives")
    gate = ("" if new is None else
            f"; new-item terms {'fit' if new >= ce.MIN_FIT_ROWS else 'off'} (held-out "
            f"positives on new items: {new}; they are fit from {ce.MIN_FIT_ROWS})")
    return (f"Scalar terms fit on held-out training rows: retrieval {head['retrieval_weight']:.3f}, "
            f"popularity {head['popularity_weight']:.3f} ({counts}), EASE "
            f"{head['ease_weight']:.3f}{gate}.")


def format_text_weights(weights: dict) -> str:
    return (f"BERT term weight on validation rows: items with training rows "
            f"{weights['text_weight']:.3f} ({weights['rows']} rows), without "
            f"{weights['new_text_weight']:.3f} ({weights['new_rows']} rows; fit from "
            f"{ce.MIN_FIT_ROWS}, else kept as fine-tuned); validation hit rate@10 at the widest "
            f"depth {weights['before']['hit_rate@10']:.4f} at weight 1 -> "
            f"{weights['after']['hit_rate@10']:.4f}" + (
                "" if weights.get("accepted", True) else
                f" (the fit, {weights['rejected']['text_weight']:.3f} / "
                f"{weights['rejected']['new_text_weight']:.3f}, lowered validation hit rate@10 "
                f"or NDCG@10 to {weights['rejected']['metrics']['hit_rate@10']:.4f} / "
                f"{weights['rejected']['metrics']['ndcg@10']:.4f}: both kept at 1)"))


def format_depths(rows: list[dict], chosen: int) -> str:
    lines = ["Candidates BERT re-scores (the scalar terms keep the best D of the merged list), on "
             "the re-ranker's validation rows:", "",
             "| D | hit rate@10 | NDCG@10 |", "|---|---|---|"]
    for r in rows:
        label = "0 (scalar terms alone)" if r["depth"] == 0 else str(r["depth"])
        mark = " **(chosen)**" if r["depth"] == chosen else ""
        lines.append(f"| {label}{mark} | {r['hit_rate@10']:.4f} | {r['ndcg@10']:.4f} |")
    return "\n".join(lines)


def format_sweep(results: list[dict]) -> str:
    lines = ["Merged candidates on the re-ranker's validation rows (held-out training rows, "
             "shadow retrieval model):", "", "| K | two-tower | item-to-item | hit rate |",
             "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["k"], -r["two_tower"])):
        lines.append(f"| {r['k']} | {r['two_tower']} | {r['item_item']} | {r['hit_rate']:.4f} |")
    return "\n".join(lines)


def format_candidates(candidates: dict) -> str:
    """The candidate hit rates: the merged list against each source alone at the same size."""
    k = candidates["k"]
    lines = [f"Candidates handed to the re-ranker ({candidates['two_tower']} two-tower + "
             f"{candidates['item_item']} item-to-item + {candidates['new_items']} new-item slots; "
             "hit rate of the set):", "", "| candidate set | hit rate |", "|---|---|"]
    for name, label in ((f"two_tower@{k}", f"two-tower top {k}"), (f"ease@{k}", f"EASE top {k} (bounded, the re-ranker's term)"),
                        (f"merged@{k}", f"merged ({k})")):
        lines.append(f"| {label} | {candidates[name]:.4f} |")
    return "\n".join(lines)


def _where(user_rows: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Position of each of `users` in the sorted `user_rows`."""
    return np.searchsorted(user_rows, users)


def evaluate_new_items(run_dir: str | os.PathLike, depth: int = 100, k: int = 10,
                       record: bool = True) -> dict | None:
    """The new-arrivals shelf re-ranked: for the test interactions with items that have no
    training row (None when there are none), hit rate@k when each user is shown only the new
    items, ranked by retrieval, by the re-ranker's top `depth` of them, by the same without
    the BERT term (the ablation that says what the cross-encoder adds), and without the BERT and
    the content-popularity terms (what that term adds). Written to `metrics.json` under
    `reranker.test.new_items`."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)
    logits, users, items, seen, tables = test_inputs(run)
    new = retrieval_eval.new_item_mask(tables, runs.run_data(run)[1])
    wanted = new[items]
    if not wanted.any():
        return None
    shelf = metrics.Scores(logits.shape, lambda rows: np.where(  # old items never reach the shelf
        new[None, :], logits[rows], -np.inf))
    depth = min(depth, int(new.sum()))  # users have no training row with a new item
    user_rows = np.unique(users[wanted])
    top, final = rerank_scores(reranker, shelf, seen, user_rows, tables.user_ids, tables.item_ids,
                               depth)
    retrieval, popularity, ease, prior = _head_features(reranker, logits, user_rows, top, tables)
    head = ce.head_scores(reranker.encoder, retrieval, popularity, ease, prior)
    no_prior = ce.head_scores(reranker.encoder, retrieval, popularity, ease)  # the term's ablation
    hit_rate = lambda scores: round(metrics.evaluate(scores, users[wanted], items[wanted], seen,
                                                     (k,))[f"hit_rate@{k}"], 5)
    result = {"new_items": int(new.sum()), "test_rows": int(wanted.sum()), "depth": depth,
              f"shelf_hit_rate@{k}": {
                  "retrieval": hit_rate(shelf),
                  "reranked": hit_rate(ranking.reranked(shelf, user_rows, top, final)),
                  "head_only": hit_rate(ranking.reranked(shelf, user_rows, top, head)),
                  "head_no_prior": hit_rate(ranking.reranked(shelf, user_rows, top, no_prior))},
              "new_prior_weight": round(float(reranker.encoder.new_prior_weight), 4)}
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
    labels = {"retrieval": "retrieval alone",
              "head_no_prior": "re-ranked without BERT and without content popularity",
              "head_only": "re-ranked without BERT (scalar terms)",
              "reranked": "re-ranked (cross-encoder)"}
    for name in ("retrieval", "head_no_prior", "head_only", "reranked"):
        if name not in shelf:  # recorded before the content-popularity term
            continue
        ratio = f"{shelf[name] / base:.2f}x" if base else "-"
        lines.append(f"| {labels[name]} | {shelf[name]:.4f} | {ratio} |")
    return "\n".join(lines)


def _head_features(reranker: ce.Reranker, logits, user_rows: np.ndarray, top: np.ndarray,
                   tables) -> tuple[np.ndarray, ...]:
    """(retrieval, popularity, EASE, content popularity) [U, K] of each user's candidates `top`:
    the scalar terms' inputs (`ce.head_scores`)."""
    items = ce.tf.constant(tables.item_ids[top].astype(str))
    return (ranking.pair_scores(logits, user_rows, top),
            reranker.texts.popularity.lookup(items).numpy(),
            reranker.texts.ease_pairs(tables.user_ids[user_rows], tables.item_ids[top]),
            reranker.texts.prior.lookup(items).numpy())


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


_TERM_LABELS = {"retrieval": "retrieval", "popularity": "popularity", "ease": "EASE"}


def _label(name: str) -> str:
    if name.startswith("head-"):
        term, pool = name[len("head-"):].split("@")
        where = "merged candidates" if pool == "merged" else f"retrieval top-{pool}"
        return (f"{where}, scalar terms without the {_TERM_LABELS[term]} term (its weight 0, "
                "the others as fit; no BERT)")
    if name == "head@merged":
        return "merged candidates, learned scalar terms only (no BERT)"
    if name == "reranked@merged":
        return "merged candidates, scalar terms keep the top k, re-ranked (cross-encoder)"
    if name.startswith("served@"):
        return (f"retrieval's candidates, scalar terms keep the best {name.split('@')[1]} for "
                "BERT, re-ranked (as the cascade serves)")
    if name.startswith("reranked@"):
        return f"retrieval top-{name.split('@')[1]} re-ranked (cross-encoder)"
    if name.startswith("head@"):
        return (f"retrieval top-{name.split('@')[1]}, learned retrieval + popularity + EASE terms "
                "only (no BERT)")
    return {"retrieval": "retrieval alone", "als": "ALS", "ease": "EASE"}.get(name, name)


def _rounded(result: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 5) for key, value in result.items()}
