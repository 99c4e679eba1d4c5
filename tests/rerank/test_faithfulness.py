"""The occlusion behind the reasons' probability of necessity: removing nothing changes nothing,
and removing an item is the same as the run trained without it in every input the final score
reads (context text, EASE history, query history)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from rerank import cross_encoder as ce
from rerank import faithfulness, rerank_eval
from towers import runs


@pytest.fixture(scope="module")
def scored(tiny_cascade_run):
    reranker = ce.load_reranker(tiny_cascade_run)
    logits, users, _, seen, tables = rerank_eval.test_inputs(tiny_cascade_run)
    user_rows = np.unique(users)[:4]
    top, final = rerank_eval.rerank_scores(reranker, logits, seen, user_rows, tables.user_ids,
                                           tables.item_ids, 10)
    return reranker, tables, user_rows, top, final


def test_removing_an_item_the_user_never_had_changes_no_score(scored, tiny_cascade_run):
    """A virtual user without an item they never interacted with is the user: the same context,
    history and query, so the same final scores. Catches a context rebuilt from the wrong rows,
    a history or query of the wrong user, or logits scaled differently from the run's."""
    reranker, tables, user_rows, top, final = scored
    retrieval, _ = runs.load_run(tiny_cascade_run)
    dataset, split = runs.run_data(tiny_cascade_run)
    users = tables.user_ids[user_rows].astype(str)
    never = [str(i) for i in tables.item_ids if i not in set(split.train.item_id)][:1]
    assert never, "the tiny split must hold an item without training rows"
    removed = [(u, never[0]) for u in range(len(users))]
    after = faithfulness._occluded_scores(reranker, retrieval, tables, dataset, split.train,
                                          tiny_cascade_run, users, removed, top)
    for u in range(len(users)):
        np.testing.assert_allclose(after[(u, never[0])], final[u], rtol=1e-4, atol=1e-4)


def test_removing_a_history_item_is_the_user_without_it(scored, tiny_cascade_run):
    """The occluded EASE term equals the sum of the weights over the history without the item,
    and the context no longer holds the item's text."""
    reranker, tables, user_rows, top, _ = scored
    user = str(tables.user_ids[user_rows[0]])
    history = reranker.texts.history(np.array([user]))
    item_ids = reranker.texts.arrays["item_ids"]
    dropped = str(item_ids[history.indices[0]])
    weights = reranker.texts.neighbours().matrix()
    kept = np.setdiff1d(history.indices, [history.indices[0]])
    expected = np.asarray(weights[kept].sum(axis=0)).ravel()[
        [list(item_ids).index(str(i)) for i in tables.item_ids[top[0]]]]
    virtual = f"{user}{faithfulness.SEP}{dropped}"
    captured = {}
    original = ce.score_candidates

    def spy(scorer, user_ids, items, logits, *args):
        captured["ease"] = scorer.texts.ease_score(
            tf.constant(np.repeat(user_ids, items.shape[1])), tf.constant(items.ravel().astype(str))
        ).numpy().reshape(items.shape)
        captured["context"] = scorer.texts.context.lookup(tf.constant([virtual])).numpy()[0]
        return original(scorer, user_ids, items, logits, *args)

    retrieval, _ = runs.load_run(tiny_cascade_run)
    dataset, split = runs.run_data(tiny_cascade_run)
    ce_score, ce.score_candidates = ce.score_candidates, spy
    try:
        faithfulness._occluded_scores(reranker, retrieval, tables, dataset, split.train,
                                      tiny_cascade_run, np.array([user]), [(0, dropped)], top[:1])
    finally:
        ce.score_candidates = ce_score
    np.testing.assert_allclose(captured["ease"][0], expected, rtol=1e-4, atol=1e-5)
    title = dataset.item_texts([dropped])[0]
    assert title.encode() not in captured["context"]


def test_falling_out_of_the_served_list_is_a_drop(tiny_cascade_run, monkeypatch):
    """The rank after occlusion is taken over every re-ranked candidate, not only the served ones:
    when removing a history item puts every served item below every unserved candidate (in their
    served order), every pair counts, the last served item's included. Ranked within the served
    list alone, their order is unchanged and none would."""
    served, depth = 4, 12

    def below_the_rest(reranker, retrieval, tables, dataset, train, run, users, removed, lists):
        assert lists.shape[1] == depth  # the whole re-ranked list is re-scored
        scores = -100.0 - np.arange(depth, dtype=np.float32)
        scores[:served] = -1000.0 - np.arange(served)
        return {key: scores for key in removed}

    monkeypatch.setattr(faithfulness, "_occluded_scores", below_the_rest)
    served_out = []
    result = faithfulness.necessity(tiny_cascade_run, pairs_wanted=6, served=served, depth=depth,
                                    served_out=served_out)
    assert result["pairs"] >= 1 and len(served_out) * served == result["served"]
    # each served pair with a reason is tried with its reason and with a random liked title
    assert result["reason"]["pairs"] == result["random liked"]["pairs"] == result["pairs"]
    for kind in faithfulness.KINDS:
        assert result[kind]["pn"] == (1.0 if result[kind]["pairs"] else None), kind
