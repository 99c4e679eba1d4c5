"""Are the copy's reasons causes? The probability of necessity of a cited history item.

A served (user, item) pair's reason is the liked history item without which the item would rank
lower (`rerank.reasons`, the `cascade` graph's own choice, which predicts that by occlusion of the
scalar terms, BERT's held). It is necessary when taking it away in fact lowers the item: remove it
from the user's history everywhere the final score reads that history, that is from the query
tower's pooled history (`QueryTower(..., exclude_item=...)`), from the cross-encoder's context text
(rebuilt from the training rows without it) and from the EASE sum; re-score the user's re-ranked
candidates with the same `Reranker`, BERT included; the pair counts when the item's final score
falls and its rank drops (it falls below a candidate that ranked under it, in the served list or
out of it). The probability of necessity (PN) is the share of pairs that count. Two baselines get
the same measure: the liked history item with the largest item-item (EASE) weight towards the item
(the reason the copy cited before occlusion chose it) and a liked history item chosen at random,
the reason a copywriter citing "a title you liked" would give.

The user's ID embedding was trained with the item in their history; it is a parameter, not an
input, and stays as it is (occlusion removes inputs).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import pairs, ranking, rerank_eval
from rerank import reasons as rerank_reasons
from towers import data, runs
from towers import model as towers_model

log = logging.getLogger(__name__)

SEP = "\x1f"  # a virtual user, "<user>\x1f<removed item>", is the user without that item
KINDS = ("reason", "item-item share", "random liked", "item-item share, all served")


def necessity(run_dir: str | os.PathLike, pairs_wanted: int = 1000, served: int = 10,
              depth: int | None = None, seed: int = 0, served_out: list | None = None) -> dict:
    """PN of the reasons, of the largest item-item share and of random liked items on about
    `pairs_wanted` served pairs with a reason (and of the item-item share on every served pair,
    the reason the copy cited before), of test users (the top `served` of the re-ranked
    retrieval top K whose best `depth` by the scalar terms BERT re-scores, as the cascade serves
    them; default: the run's `serve_depth`), with the coverage (share of served pairs that have
    a reason).
    `served_out`, if given, receives each user's (user ID, served item IDs [served], their
    reasons [served, 2]), for the copy written with them."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)
    k = ce.run_config(run).candidates
    depth = min(k, depth or ce.served_depth(run))
    logits, test_users, _, seen, tables = rerank_eval.test_inputs(run)
    retrieval, _ = runs.load_run(run)
    dataset, split = runs.run_data(run)
    rng = np.random.default_rng(seed)
    user_rows = rng.permutation(np.unique(test_users))
    item_ids = tables.item_ids.astype(str)
    finder = tf.function(rerank_reasons.Reasons(
        reranker, retrieval.query_tower, towers_model.embeddings(retrieval, tables)[1], item_ids,
        retrieval.config.temperature), reduce_retracing=True)
    timings = []  # ms of finding one user's reasons
    cases = []  # (user index, position in the re-ranked list, removed item ID, kind)
    users, lists, scores = [], [], []  # per user: ID, candidates best first, their final scores
    shown_pairs = with_reason = 0
    for start in range(0, len(user_rows), 32):
        rows = user_rows[start:start + 32]
        top = ranking.top_candidates(logits, seen, k, users=rows)
        top, final = ce.rerank_candidates(reranker, tables.user_ids[rows], tables.item_ids, top,
                                          ranking.pair_scores(logits, rows, top), depth)
        order = np.argsort(-final, axis=1, kind="stable")
        top, final = np.take_along_axis(top, order, 1), np.take_along_axis(final, order, 1)
        ids = tables.user_ids[rows].astype(str)
        inputs = (ids, item_ids[top], ranking.pair_scores(logits, rows, top).astype(np.float32),
                  final, np.tile(np.arange(served), (len(rows), 1)))
        found = finder(*map(tf.constant, inputs)).numpy()
        timings += [_one_user_ms(finder, [value[b:b + 1] for value in inputs])
                    for b in range(min(2, len(rows)))]
        both, found = found.astype(str), found[:, :, 0].astype(str)
        shares = reranker.texts.reasons(tf.constant(np.repeat(ids, served)),
                                        tf.constant(item_ids[top[:, :served]].ravel()), count=1)
        shares = shares.numpy().astype(str).reshape(len(rows), served)
        liked = _liked(reranker.texts, ids)
        for b, user in enumerate(ids):
            u = len(users)
            users.append(user)
            if served_out is not None:
                served_out.append((user, item_ids[top[b, :served]], both[b]))
            lists.append(top[b])
            scores.append(final[b])
            for position in range(served):
                shown_pairs += 1
                if shares[b, position]:  # the item-item reason over every served item
                    cases.append((u, position, shares[b, position], "item-item share, all served"))
                if not found[b, position]:
                    continue
                with_reason += 1
                cases.append((u, position, found[b, position], "reason"))
                if shares[b, position]:
                    cases.append((u, position, shares[b, position], "item-item share"))
                cases.append((u, position, str(rng.choice(liked[user])), "random liked"))
            if with_reason >= pairs_wanted:
                break
        if with_reason >= pairs_wanted:
            break
    users, lists, scores = np.array(users), np.array(lists), np.array(scores)
    removed = sorted({(u, item) for u, _, item, _ in cases})
    after = _occluded_scores(reranker, retrieval, tables, dataset, split.train, run, users,
                             removed, lists)
    result = {"pairs": with_reason, "served": shown_pairs,
              "coverage": round(with_reason / max(shown_pairs, 1), 4),
              "ms_per_user": round(float(np.median(timings)), 1)}
    for kind in KINDS:
        hits = []
        for u, position, item, case_kind in cases:
            if case_kind != kind:
                continue
            changed = after[(u, item)]
            rank = int(np.sum(changed > changed[position]))  # 0 = first
            hits.append(changed[position] < scores[u, position] and rank > position)
        result[kind] = {"pn": round(float(np.mean(hits)), 4) if hits else None,
                        "pairs": len(hits)}
    return result


def _one_user_ms(finder, inputs: list[np.ndarray]) -> float:
    """ms of one call of `finder` on one user's inputs, as the cascade serves one (after a call
    that traces it for that shape)."""
    inputs = [tf.constant(value) for value in inputs]
    finder(*inputs)
    started = time.perf_counter()
    finder(*inputs)
    return 1000 * (time.perf_counter() - started)


def _liked(texts: pairs.PairTexts, users: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's liked history item IDs."""
    arrays = texts.arrays
    row = {u: r for r, u in enumerate(arrays["user_ids"])}
    out = {}
    for user in users:
        r = row.get(user, -1)
        if r < 0:
            out[user] = np.array([], str)
            continue
        span = slice(arrays["history_splits"][r], arrays["history_splits"][r + 1])
        keep = arrays["history_liked"][span]
        out[user] = arrays["item_ids"][arrays["history_values"][span][keep]]
    return out


def _occluded_scores(reranker: ce.Reranker, retrieval, tables, dataset: data.Dataset,
                     train: data.Interactions, run: pathlib.Path, users: np.ndarray,
                     removed: list[tuple[int, str]], shown: np.ndarray) -> dict:
    """{(user index, removed item ID): final scores [K] of that user's candidates (`shown`, item
    rows [U, K]) with the item taken out of the user's history}, through the same `Reranker`."""
    texts = reranker.texts.arrays
    virtual = np.array([f"{users[u]}{SEP}{item}" for u, item in removed])
    # The training rows of each virtual user: the user's rows without the removed item.
    by_user: dict[str, np.ndarray] = {}
    user_of = train.user_id.astype(str)
    for user in {users[u] for u, _ in removed}:
        by_user[user] = np.flatnonzero(user_of == user)
    record = json.loads((run / ce.RERANKER_DIR / ce.CONFIG_FILE).read_text())
    contexts = []
    for u, item in removed:  # the user's own context (their text too), without the item's rows
        rows = by_user[users[u]]
        rows = train.take(rows[train.item_id[rows].astype(str) != item])
        contexts.append(pairs.user_contexts(dataset, rows, np.array([users[u]]),
                                            record["history_titles"])[users[u]])
    history = reranker.texts.history(np.array([users[u] for u, _ in removed]))
    column = {i: c for c, i in enumerate(texts["item_ids"])}
    values, splits = [], [0]
    for n, (_, item) in enumerate(removed):
        kept = history.indices[history.indptr[n]:history.indptr[n + 1]]
        kept = kept[kept != column[item]]
        values.append(kept)
        splits.append(splits[-1] + len(kept))
    occluded = pairs.PairTexts(
        virtual, np.array(contexts), texts["item_ids"], texts["item_texts"],
        texts["popularity"], np.concatenate(values).astype(np.int32), np.array(splits, np.int64),
        texts["neighbour_index"], texts["neighbour_weight"], prior=texts["prior"])
    scorer = ce.Reranker(reranker.encoder, occluded, reranker.tokenizer, reranker.max_length)
    # Retrieval logits with the item hidden from the query tower's history.
    item_row = {i: r for r, i in enumerate(tables.item_ids.astype(str))}
    candidates = towers_model.embeddings(retrieval, tables)[1]
    queries = retrieval.query_tower(
        tf.constant(np.array([users[u] for u, _ in removed])),
        exclude_item=tf.constant([item_row[item] + 1 for _, item in removed])).numpy()
    lists = shown[[u for u, _ in removed]]  # [V, served] item rows
    logits = np.einsum("vd,vsd->vs", queries, candidates[lists]) / retrieval.config.temperature
    scores = ce.score_candidates(scorer, virtual, tables.item_ids[lists], logits)
    return {key: scores[n] for n, key in enumerate(removed)}
