"""`rerank.cross_encoder.fit_head` recovers the weights of the scalar terms from groups generated
by a known listwise model: positives drawn from softmax(w . features) over each group."""

from __future__ import annotations

import numpy as np
import pytest

from rerank import cross_encoder as ce
from rerank import negatives

PLANTED = {"retrieval_weight": 0.5, "popularity_weight": 1.5, "ease_weight": 0.0}


def planted_groups(count: int = 1500, size: int = 8, seed: int = 0):
    """Groups whose positive is drawn from softmax(0.5 retrieval + 1.5 popularity + 0 EASE) over
    the group: popularity is the informative term, EASE is noise."""
    rng = np.random.default_rng(seed)
    items = 300
    popularity = rng.normal(size=items).astype(np.float32)  # [I] one feature per item row
    candidates = np.array([rng.choice(items, size, replace=False) for _ in range(count)], np.int32)
    retrieval = rng.normal(size=(count, size)).astype(np.float32)
    ease = rng.normal(size=(count, size)).astype(np.float32)  # [P, K]: each candidate's EASE score
    logits = (PLANTED["retrieval_weight"] * retrieval + PLANTED["popularity_weight"]
              * popularity[candidates] + PLANTED["ease_weight"] * ease)
    return drawn_groups(rng, candidates, retrieval, logits), popularity, ease


def drawn_groups(rng, candidates: np.ndarray, retrieval: np.ndarray, logits: np.ndarray
                 ) -> negatives.Groups:
    """One group per row of `candidates` [P, K], its positive drawn from softmax(`logits`)."""
    count, size = candidates.shape
    probability = np.exp(logits - logits.max(axis=1, keepdims=True))
    probability /= probability.sum(axis=1, keepdims=True)
    positive = np.array([rng.choice(size, p=p) for p in probability], np.int32)
    negative = np.ones((count, size), bool)
    negative[np.arange(count), positive] = False
    return negatives.Groups(user_row=np.arange(count, dtype=np.int32), candidates=candidates,
                            retrieval=retrieval, positive=positive, negative=negative)


def test_fit_head_recovers_planted_weights():
    """The fit lands on the planted (0.5, 1.5, 0.0) and gives popularity the largest weight.
    Catches: a feature paired with another term's weight (popularity's values under the EASE
    weight), the positive's label misplaced
    (then nothing is learned and the weights stay at the start, 1, 0, 0), a loss with the wrong
    sign, or the allowed mask inverted (scoring only the masked-out columns)."""
    groups, popularity, ease = planted_groups()
    encoder = ce.CrossEncoder(bert=None)  # fit_head touches only the three scalar weights
    fitted = ce.fit_head(encoder, groups, popularity, ease, steps=300)
    for name, planted in PLANTED.items():
        assert fitted[name] == pytest.approx(planted, abs=0.15), (name, fitted)
    assert fitted["popularity_weight"] > max(abs(fitted["retrieval_weight"]), abs(fitted["ease_weight"]))
    assert ce.head_weights(encoder) == {k: v for k, v in fitted.items()
                                        if k not in ("loss", "new_positives")}


def test_fit_head_ignores_candidates_that_are_not_negatives():
    """A candidate that is neither the positive nor an allowed negative (another held-out item of
    the user) must not enter the softmax. Here every group has one such column with a huge
    popularity: if it leaked in, the fit would push the popularity weight down, below zero."""
    groups, popularity, ease = planted_groups(count=800, seed=1)
    blocked = (groups.positive + 1) % groups.candidates.shape[1]  # one column per group
    negative = groups.negative.copy()
    negative[np.arange(len(groups)), blocked] = False
    # The blocked columns get their own item rows, so no positive shares their popularity.
    rows = popularity.size + np.arange(len(groups))
    popularity = np.concatenate([popularity, np.full(len(groups), 20.0, np.float32)])
    ease = ease.copy()
    ease[np.arange(len(groups)), blocked] = 0.0
    candidates = groups.candidates.copy()
    candidates[np.arange(len(groups)), blocked] = rows
    groups = negatives.Groups(groups.user_row, candidates, groups.retrieval, groups.positive, negative)
    fitted = ce.fit_head(ce.CrossEncoder(bert=None), groups, popularity, ease, steps=300)
    assert fitted["popularity_weight"] == pytest.approx(PLANTED["popularity_weight"], abs=0.25)


def test_fit_head_learns_the_new_item_terms_from_groups_with_new_positives():
    """Items without a training interaction (popularity 0) get their own bias and an extra weight
    on their retrieval score, recovered from planted values (new-item bias 1.0, retrieval weight
    0.5 + 0.8 on new items). Groups whose positives never are new items leave both at 0: the
    head of a run without new items scores exactly as before these terms existed."""
    rng = np.random.default_rng(2)
    count, size, items = 2500, 8, 300
    popularity = rng.normal(size=items).astype(np.float32)
    popularity[:75] = 0.0  # a quarter of the catalog is new
    candidates = np.array([rng.choice(items, size, replace=False) for _ in range(count)], np.int32)
    retrieval = rng.normal(size=(count, size)).astype(np.float32)
    ease = np.zeros((count, size), np.float32)
    new = (popularity[candidates] == 0).astype(np.float32)
    logits = (0.5 + 0.8 * new) * retrieval + 1.5 * popularity[candidates] + 1.0 * new
    groups = drawn_groups(rng, candidates, retrieval, logits)
    encoder = ce.CrossEncoder(bert=None)
    fitted = ce.fit_head(encoder, groups, popularity, ease, steps=400)
    assert float(encoder.new_item_gate) == 1.0
    # The served head adds the terms for new items only: one new and one old candidate.
    scores = ce.head_scores(encoder, np.array([2.0, 2.0]), np.array([0.0, 0.5]), np.zeros(2))
    assert scores[0] == pytest.approx((fitted["retrieval_weight"] + fitted["new_retrieval_weight"])
                                      * 2.0 + fitted["new_item_weight"], rel=1e-5)
    assert scores[1] == pytest.approx(fitted["retrieval_weight"] * 2.0
                                      + fitted["popularity_weight"] * 0.5, rel=1e-5)
    assert fitted["new_item_weight"] == pytest.approx(1.0, abs=0.2), fitted
    assert fitted["new_retrieval_weight"] == pytest.approx(0.8, abs=0.2), fitted
    assert fitted["retrieval_weight"] == pytest.approx(0.5, abs=0.15), fitted

    old, old_popularity, old_ease = planted_groups(count=300, seed=3)
    encoder = ce.CrossEncoder(bert=None)
    fitted = ce.fit_head(encoder, old, old_popularity, old_ease, steps=50)
    assert fitted["new_item_weight"] == 0.0 and fitted["new_retrieval_weight"] == 0.0
    assert float(encoder.new_item_gate) == 0.0 and fitted["new_positives"] == 0

    # Too few new positives to fit on (19 < MIN_FIT_ROWS): the terms stay off; 20 open them.
    is_new = new[np.arange(count), groups.positive] > 0
    for keep_new, gate in ((ce.MIN_FIT_ROWS - 1, 0.0), (ce.MIN_FIT_ROWS, 1.0)):
        rows = np.concatenate([np.flatnonzero(is_new)[:keep_new], np.flatnonzero(~is_new)[:500]])
        few = negatives.Groups(*(getattr(groups, f)[rows] for f in
                                 ("user_row", "candidates", "retrieval", "positive", "negative")))
        encoder = ce.CrossEncoder(bert=None)
        fitted = ce.fit_head(encoder, few, popularity, ease[rows], steps=20)
        assert fitted["new_positives"] == keep_new
        assert float(encoder.new_item_gate) == gate
        assert (fitted["new_item_weight"] == 0.0) == (gate == 0.0), fitted


def test_fit_head_learns_the_content_popularity_weight_of_new_items():
    """New items' positives follow their content popularity (planted weight 1.2 on `prior`, which
    counts for new items only): the fit recovers it, and the served head adds it to new items
    alone. Without `prior` the same groups leave the weight at 0."""
    rng = np.random.default_rng(5)
    count, size, items = 2500, 8, 300
    popularity = rng.normal(size=items).astype(np.float32)
    popularity[:100] = 0.0
    prior = rng.normal(size=items).astype(np.float32)  # every item has one; old ones ignore it
    candidates = np.array([rng.choice(items, size, replace=False) for _ in range(count)], np.int32)
    retrieval = rng.normal(size=(count, size)).astype(np.float32)
    new = (popularity[candidates] == 0).astype(np.float32)
    logits = 0.5 * retrieval + 1.5 * popularity[candidates] + 1.2 * new * prior[candidates]
    groups = drawn_groups(rng, candidates, retrieval, logits)
    ease = np.zeros((count, size), np.float32)
    encoder = ce.CrossEncoder(bert=None)
    fitted = ce.fit_head(encoder, groups, popularity, ease, steps=400, prior=prior)
    assert fitted["new_prior_weight"] == pytest.approx(1.2, abs=0.2), fitted
    assert abs(fitted["new_item_weight"]) < 0.3, fitted
    scores = ce.head_scores(encoder, np.array([1.0, 1.0]), np.array([0.0, 0.5]), np.zeros(2),
                            np.array([2.0, 2.0]))
    assert scores[0] == pytest.approx((fitted["retrieval_weight"] + fitted["new_retrieval_weight"])
                                      + fitted["new_item_weight"]
                                      + 2.0 * fitted["new_prior_weight"], rel=1e-5)
    assert scores[1] == pytest.approx(fitted["retrieval_weight"]
                                      + 0.5 * fitted["popularity_weight"], rel=1e-5)
    without = ce.fit_head(ce.CrossEncoder(bert=None), groups, popularity, ease, steps=50)
    assert without["new_prior_weight"] == 0.0


def planted_text_rows(count: int, new_share: float, warm: float, new: float, seed: int = 4):
    """Validation rows whose positive is drawn from softmax(head + w * text) over 10 candidates,
    w = `warm` on items with training rows and `new` on the others (`new_share` of them)."""
    rng = np.random.default_rng(seed)
    size = 10
    head = rng.normal(size=(count, size)).astype(np.float32)
    text = rng.normal(size=(count, size)).astype(np.float32)
    is_new = rng.random((count, size)) < new_share
    logits = head + np.where(is_new, new, warm) * text
    probability = np.exp(logits - logits.max(axis=1, keepdims=True))
    probability /= probability.sum(axis=1, keepdims=True)
    positive = np.array([rng.choice(size, p=p) for p in probability], np.int32)
    return text, head, is_new, positive, np.ones((count, size), bool)


def test_fit_text_weights_switches_off_a_bert_term_that_hurts_and_keeps_one_that_pays():
    """Planted: BERT's score points the wrong way on items with training rows (-1) and the right
    way on new items (1.5). The warm weight is switched off (0, never negative) and the new
    one recovered; the head's own weights are not touched. Catches the two weights swapped (the
    new mask inverted), the clip missing (a negative weight), or the scalar terms refit."""
    text, head, is_new, positive, allowed = planted_text_rows(3000, 0.5, warm=-1.0, new=1.5)
    encoder = ce.CrossEncoder(bert=None)
    fitted = ce.fit_text_weights(encoder, text, head, is_new, positive, allowed)
    assert fitted["text_weight"] == 0.0, fitted
    assert fitted["new_text_weight"] == pytest.approx(1.5, abs=0.25), fitted
    assert fitted["rows"] + fitted["new_rows"] == 3000
    assert fitted["new_rows"] == int(is_new[np.arange(3000), positive].sum())
    assert float(encoder.retrieval_weight) == 1.0 and float(encoder.ease_weight) == 0.0
    # The served score uses the weight of the item's kind: popularity 0 is a new item.
    scores = encoder.text_weights(np.array([0.0, 1.2], np.float32)).numpy()
    np.testing.assert_allclose(scores, [fitted["new_text_weight"], 0.0])


def test_fit_text_weights_keeps_the_fine_tuned_weight_of_a_kind_validation_does_not_show():
    """A temporal holdout has (next to) no new items among its positives: their weight stays at
    1, the term as fine-tuned with the text loss for them, while the warm weight is fit (here
    the planted 0.6)."""
    text, head, is_new, positive, allowed = planted_text_rows(3000, 0.002, warm=0.6, new=3.0,
                                                              seed=5)
    fitted = ce.fit_text_weights(ce.CrossEncoder(bert=None), text, head, is_new, positive,
                                 allowed)
    assert fitted["new_rows"] < ce.MIN_FIT_ROWS
    assert fitted["new_text_weight"] == 1.0
    assert fitted["text_weight"] == pytest.approx(0.6, abs=0.15), fitted
