"""The claim check: every corpus line is a frame with true facts (Python and graph agree), and
lines with a wrong year, era or category, or spliced from two frames, are caught, by the graph's
check and by the evaluation's independent scan."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from rerank.copy import claims, grounding, templates
from towers import data

AKIRA = data.ItemFacts("1", "Aliens", "1986", ("Action", "Sci-Fi", "Thriller", "War"))
PLAIN = data.ItemFacts("2", "Night Ferry", data.UNKNOWN_YEAR, ())


@pytest.fixture(scope="module")
def corpus(movielens):
    examples = templates.build_corpus(movielens, movielens.split("random").train, 1000, seed=5)
    items = templates.catalog(movielens)
    matcher = grounding.TitleMatcher(items)
    return examples, {i: grounding.spoken(f, matcher) for i, f in items.items()}


def test_every_corpus_line_is_a_frame_with_true_facts(corpus):
    """The corpus is what the model learns: each of its lines must pass, or the check would
    reject good copy. Catches a frame or pool the patterns do not cover, a year phrase or
    article the grammar misses, or an allowed-phrase set narrower than the corpus's phrases."""
    examples, items = corpus
    for example in examples:
        matched, wrong = claims.check_template(claims.checked_text(example.template),
                                               items[example.item_id])
        assert matched and wrong == [], (example.template, wrong)


def test_the_graph_agrees_with_python_on_good_and_bad_lines(corpus):
    examples, items = corpus
    ids = list(items)
    good = [(claims.checked_text(e.template), ids.index(e.item_id)) for e in examples[:60]]
    bad = []
    for text, row in good[:30]:
        item = items[ids[row]]
        if item.year != data.UNKNOWN_YEAR and item.year in text:
            bad.append((text.replace(item.year, str(int(item.year) - 11)), row))  # wrong year
        if item.year != data.UNKNOWN_YEAR and templates.era(item.year) in text:
            bad.append((text.replace(templates.era(item.year), "late-'20s"), row))  # wrong era
    assert len(bad) >= 5
    spliced = [(good[0][0][:-1] + " made for to try tonight.", good[0][1])]
    check = claims.ClaimCheck([items[i] for i in ids])
    texts = [t for t, _ in good + bad + spliced]
    rows = [r for _, r in good + bad + spliced]
    matched, holds = check(tf.constant(texts), tf.constant(rows, tf.int32))
    expected = [claims.check_template(t, items[ids[r]]) for t, r in zip(texts, rows)]
    np.testing.assert_array_equal(matched.numpy(), [m for m, _ in expected])
    np.testing.assert_array_equal(holds.numpy(), [m and not w for m, w in expected])
    assert holds.numpy()[:len(good)].all() and not holds.numpy()[len(good):].any()


def test_facts_checked_on_hand_written_lines():
    """Lines written by hand from frames, for Aliens (1986; Action, Sci-Fi, Thriller, War)."""
    lines = {
        "<|title|> brings a mid-'80s suspenseful gem to fans of <|liked1|>.": (True, []),
        "<|title|> brings an early-'70s suspenseful gem to fans of <|liked1|>.":
            (True, [("e", "early-'70s")]),
        "Discover <|title|>, a romantic comedy from 1986.": (True, [("g", "romantic comedy")]),
        "Discover <|title|>, a war epic released in 1985.": (True, [("y", "1985")]),
        "Discover <|title|>, a war epic of 1986 vintage.": (True, []),
        "Discover <|title|>, a war epic of 1985 vintage.": (True, [("y", "1985")]),
        # A year form's ending after another's beginning is no frame (the model wrote these).
        "Discover <|title|>, a war epic that hit screens in 1986 vintage.": (False, []),
        "Discover <|title|>, a war epic from 1986 vintage.": (False, []),
        "<|title|> (1986) is a tense sci-fi tale worth seeing.": (True, []),
        "<|title|> (1986) is a tense sci-fi tale made for to try tonight.": (False, []),
        "Up next: <|title|>, a thriller that opened in 1986 for to put on next.": (False, []),
    }
    check = claims.ClaimCheck([AKIRA])
    for text, expected in lines.items():
        assert claims.check_template(text, AKIRA) == expected, text
        matched, holds = check(tf.constant([text]), tf.constant([0]))
        assert (bool(matched[0]), bool(holds[0])) == (expected[0], expected[0] and not expected[1])


def test_an_item_without_year_or_categories():
    check = claims.ClaimCheck([PLAIN])
    for text, ok in (("Discover <|title|>, an offbeat film.", True),
                     ("Discover <|title|>, a comedy.", False),
                     ("Discover <|title|>, an offbeat film from 1990.", False)):
        assert bool(check(tf.constant([text]), tf.constant([0]))[1][0]) == ok, text


def test_the_independent_scan_finds_each_wrong_claim_by_type():
    vocabulary = claims.claim_vocabulary([AKIRA])
    cited = [data.ItemFacts("9", "Top Gun", "1986", ("Action", "Romance"))]
    scan = lambda line: claims.find_claims(line, AKIRA, cited, vocabulary)
    assert scan("Aliens brings a mid-'80s suspenseful gem to fans of Top Gun.") == {
        "year": [], "era": [], "category": []}
    assert scan("Aliens brings an early-'70s suspenseful gem to fans of Top Gun.")["era"] == [
        "early-'70s"]
    found = scan("Discover Aliens, a romantic comedy released in 1985.")
    assert found["year"] == ["1985"] and sorted(found["category"]) == ["comedy", "romantic"]
    # A cited title's words are not claims about the item ("Romance" in a title, a year in one).
    other = [data.ItemFacts("8", "Romance 1955", "1955", ("Romance",))]
    assert claims.find_claims("Aliens (1986), for fans of Romance 1955.", AKIRA, other,
                              vocabulary) == {"year": [], "era": [], "category": []}
