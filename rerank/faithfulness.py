"""Are the copy's reasons causes? The probability of necessity of a cited history item.

A served (user, item) pair's reason is the user's liked history item whose EASE weight raises the
item's final score most (`pairs.PairTexts.reasons`). It is necessary when taking it away lowers
the item: remove it from the user's history everywhere the final score reads that history, that
is from the query tower's pooled history (`QueryTower(..., exclude_item=...)`), from the
cross-encoder's context text (rebuilt from the training rows without it) and from the EASE sum;
re-score the served list with the same `Reranker`; the pair counts when the item's final score
falls and its rank in the served list drops. The probability of necessity (PN) is the share of
pairs that count. The baseline is the same measure for a liked history item of the user chosen at
random, the reason a copywriter citing "a title you liked" would give.

The user's ID embedding was trained with the item in their history; it is a parameter, not an
input, and stays as it is (occlusion removes inputs).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import pairs, rerank_eval
from towers import data, runs
from towers import model as towers_model

log = logging.getLogger(__name__)

SEP = "\x1f"  # a virtual user, "<user>\x1f<removed item>", is the user without that item


def necessity(run_dir: str | os.PathLike, pairs_wanted: int = 1000, served: int = 10,
              depth: int = 100, seed: int = 0) -> dict:
    """PN of the reasons and of random liked items on about `pairs_wanted` served pairs of test
    users (the top `served` of the re-ranked retrieval top `depth`), with the coverage (share of
    served pairs that have a reason)."""
    run = pathlib.Path(run_dir)
    reranker = ce.load_reranker(run)
    logits, test_users, _, seen, tables = rerank_eval.test_inputs(run)
    retrieval, _ = runs.load_run(run)
    dataset, split = runs.run_data(run)
    rng = np.random.default_rng(seed)
    user_rows = rng.permutation(np.unique(test_users))[:int(np.ceil(pairs_wanted / served * 1.25))]
    top, final = rerank_eval.rerank_scores(reranker, logits, seen, user_rows, tables.user_ids,
                                           tables.item_ids, depth)
    order = np.argsort(-final, axis=1, kind="stable")[:, :served]
    shown = np.take_along_axis(top, order, 1)  # [U, served] item rows, best first
    shown_scores = np.take_along_axis(final, order, 1)
    users = tables.user_ids[user_rows].astype(str)
    item_ids = tables.item_ids.astype(str)
    reasons = reranker.texts.reasons(tf.constant(np.repeat(users, served)),
                                     tf.constant(item_ids[shown].ravel()), count=1).numpy()
    reasons = reasons.astype(str).reshape(len(users), served)
    liked = _liked(reranker.texts, users)
    cases = []  # (user index, position in the served list, removed item ID, kind)
    for u, user in enumerate(users):
        for position in range(served):
            if reasons[u, position]:
                cases.append((u, position, reasons[u, position], "reason"))
                if len(liked[user]):
                    cases.append((u, position, str(rng.choice(liked[user])), "random liked"))
        if sum(kind == "reason" for *_, kind in cases) >= pairs_wanted:
            break
    removed = sorted({(u, item) for u, _, item, _ in cases})
    after = _occluded_scores(reranker, retrieval, tables, dataset, split.train, run, users,
                             removed, shown)
    result = {"pairs": sum(kind == "reason" for *_, kind in cases),
              "coverage": round(float((reasons != "").mean()), 4)}
    for kind in ("reason", "random liked"):
        hits = []
        for u, position, item, case_kind in cases:
            if case_kind != kind:
                continue
            scores = after[(u, item)]
            rank = int(np.sum(scores > scores[position]))  # 0 = first
            hits.append(scores[position] < shown_scores[u, position] and rank > position)
        result[kind] = {"pn": round(float(np.mean(hits)), 4) if hits else None,
                        "pairs": len(hits)}
    return result


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
    """{(user index, removed item ID): final scores [served] of that user's served list with the
    item taken out of the user's history}, through the same `Reranker`."""
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
        texts["neighbour_index"], texts["neighbour_weight"])
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
