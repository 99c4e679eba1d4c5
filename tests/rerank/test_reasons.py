"""The cascade's reasons (`rerank.reasons`): the occluded scores are the final score with one liked
history item taken out of the EASE sum and the query's history (BERT's term held), and the cited
reasons are exactly the history items without which the served item would rank lower, widest
margin first; an item no single history item holds in place cites none."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import ranking, reasons, rerank_eval
from towers import model as towers_model
from towers import runs

SERVED = 5


@pytest.fixture(scope="module")
def ranked(tiny_cascade_run):
    """The tiny run's re-ranker, query tower and candidate embeddings; eight test users' top 15
    re-ranked candidates, best first, with their logits and final scores."""
    reranker = ce.load_reranker(tiny_cascade_run)
    retrieval, tables = runs.load_run(tiny_cascade_run)
    logits, users, _, seen, _ = rerank_eval.test_inputs(tiny_cascade_run)
    rows = np.unique(users)[:8]
    top, final = rerank_eval.rerank_scores(reranker, logits, seen, rows, tables.user_ids,
                                           tables.item_ids, 15)
    order = np.argsort(-final, axis=1, kind="stable")
    top, final = np.take_along_axis(top, order, 1), np.take_along_axis(final, order, 1)
    candidates = towers_model.embeddings(retrieval, tables)[1]
    finder = reasons.Reasons(reranker, retrieval.query_tower, candidates, tables.item_ids,
                             retrieval.config.temperature)
    return dict(reranker=reranker, retrieval=retrieval, tables=tables, finder=finder,
                users=tables.user_ids[rows].astype(str), items=tables.item_ids.astype(str)[top],
                top=top, logits=ranking.pair_scores(logits, rows, top).astype(np.float32),
                final=final.astype(np.float32), candidates=candidates)


def _by_hand(ranked) -> dict[tuple[int, str], np.ndarray]:
    """{(user index, liked history item ID): every candidate's final score without it}, from the
    EASE weight matrix (scipy) and the query tower's own `exclude_item`, through the head's terms."""
    reranker, retrieval, tables = ranked["reranker"], ranked["retrieval"], ranked["tables"]
    texts, encoder = reranker.texts, reranker.encoder
    weights = texts.neighbours().matrix().tocsr()
    column = {item: c for c, item in enumerate(texts.arrays["item_ids"])}
    row_of = {user: r for r, user in enumerate(texts.arrays["user_ids"])}
    item_row = {item: r for r, item in enumerate(tables.item_ids.astype(str))}
    out = {}
    for u, user in enumerate(ranked["users"]):
        r = row_of[user]
        span = slice(texts.arrays["history_splits"][r], texts.arrays["history_splits"][r + 1])
        history = texts.arrays["history_values"][span][texts.arrays["history_liked"][span]]
        items = ranked["items"][u]
        columns = [column[i] for i in items]
        ease = np.asarray(texts.ease_pairs(np.array([user]), items[None]))[0]
        popularity = texts.popularity.lookup(tf.constant(items)).numpy()
        query = retrieval.query_tower(tf.constant([user])).numpy()[0]
        for h in history:
            removed = str(texts.arrays["item_ids"][h])
            without = retrieval.query_tower(
                tf.constant([user]), exclude_item=tf.constant([item_row[removed] + 1])).numpy()[0]
            shift = ranked["candidates"][ranked["top"][u]] @ (query - without)
            shift /= retrieval.config.temperature
            lost = weights[h].toarray()[0][columns]
            logits = ranked["logits"][u]
            change = (encoder.scalar_terms(logits, popularity, ease).numpy()
                      - encoder.scalar_terms(logits - shift, popularity, ease - lost).numpy())
            out[(u, removed)] = ranked["final"][u] - change
    return out


def test_occluded_scores_are_the_final_score_without_the_history_item(ranked):
    """Catches a wrong EASE key (source x target), a leave-one-out query that is not the query
    tower's `exclude_item`, logits not over the temperature, or the scalar terms applied twice."""
    after, removed = ranked["finder"].occluded(
        tf.constant(ranked["users"]), tf.constant(ranked["items"]), tf.constant(ranked["logits"]),
        tf.constant(ranked["final"]))
    owner = after.value_rowids().numpy()
    after, removed = after.flat_values.numpy(), removed.numpy().astype(str)
    expected = _by_hand(ranked)
    assert sorted(zip(owner, removed)) == sorted(expected)
    changed = 0
    for n, key in enumerate(zip(owner, removed)):
        np.testing.assert_allclose(after[n], expected[key], rtol=1e-4, atol=1e-4)
        changed += not np.allclose(after[n], ranked["final"][key[0]])
    assert changed > len(removed) // 2  # most history items move some candidate's score


def test_reasons_are_the_history_items_without_which_the_item_ranks_lower(ranked):
    """Brute force over the by-hand occluded scores: a reason lowers the item's score and puts
    it below a candidate ranked under it; the cited ones are the two with the widest margin; an
    item with none cites "". The tiny run must have served items of both kinds."""
    found = ranked["finder"](
        tf.constant(ranked["users"]), tf.constant(ranked["items"]), tf.constant(ranked["logits"]),
        tf.constant(ranked["final"]),
        tf.constant(np.tile(np.arange(SERVED), (len(ranked["users"]), 1))))
    found = found.numpy().astype(str)
    assert found.shape == (len(ranked["users"]), SERVED, 2)
    expected = _by_hand(ranked)
    kinds = set()
    for u in range(len(ranked["users"])):
        for p in range(SERVED):
            margins = []
            for (v, item), after in expected.items():
                if v != u:
                    continue
                others = np.delete(after, p)
                margin = np.sort(others)[::-1][p] - after[p]
                falls = after[p] < ranked["final"][u, p] - reasons.MIN_CHANGE
                if falls and margin > reasons.MIN_CHANGE:
                    margins.append((margin, item))
            margins.sort(key=lambda m: -m[0])
            want = [item for _, item in margins[:2]] + [""] * (2 - min(2, len(margins)))
            assert list(found[u, p]) == want, (u, p, margins[:3])
            kinds.add(bool(margins))
    assert kinds == {True, False}


def test_a_user_without_history_gets_no_reason(ranked):
    found = ranked["finder"](
        tf.constant(["nobody", ranked["users"][0]]), tf.constant(ranked["items"][:2]),
        tf.constant(ranked["logits"][:2]), tf.constant(ranked["final"][:2]),
        tf.constant(np.tile(np.arange(SERVED), (2, 1)))).numpy().astype(str)
    assert (found[0] == "").all()
