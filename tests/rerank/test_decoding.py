"""The copywriter decoder's sampling step (`rerank.copy.copywriter.Decoder.sample`) on hand-set logits:
top-p, temperature and the repetition penalty, each against the distribution worked out by hand.
20,000 rows of the same logits are sampled in one stateless call (a fixed seed, so the counts are
the same on every run); 20,000 draws put each frequency within about 0.01 of its probability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from rerank.copy import copywriter, decoding

VOCAB, ROWS = 6, 20_000


@pytest.fixture(scope="module")
def tiny_model():
    tf.keras.utils.set_random_seed(0)
    config = copywriter.CopywriterConfig(n_layer=1, n_embd=8, n_head=2, n_positions=8)
    return copywriter.build_model(config, vocab_size=VOCAB, eos_id=0)


def frequencies(tiny_model, logits, generated=None, **options) -> np.ndarray:
    """Share of each token among ROWS draws from one logits row [V], under `options`."""
    config = dataclasses.replace(copywriter.CopywriterConfig(n_layer=1, n_embd=8, n_head=2,
                                                             n_positions=8, top_k=VOCAB), **options)
    decoder = decoding.Decoder(tiny_model, config, eos_id=0)
    logits = tf.constant(np.tile(np.asarray(logits, np.float32), (ROWS, 1)))
    marks = np.zeros(VOCAB, np.float32) if generated is None else np.asarray(generated, np.float32)
    tokens = decoder.sample(logits, tf.constant(np.tile(marks, (ROWS, 1))),
                            tf.constant([7, 11], tf.int64)).numpy()
    return np.bincount(tokens, minlength=VOCAB) / ROWS


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


PROBABILITIES = np.array([0.5, 0.3, 0.12, 0.05, 0.02, 0.01])
LOGITS = np.log(PROBABILITIES)


def test_plain_sampling_follows_the_softmax(tiny_model):
    """The reference for the tests below: no penalty, temperature 1, top-p 1."""
    found = frequencies(tiny_model, LOGITS, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    np.testing.assert_allclose(found, PROBABILITIES, atol=0.012)


def test_top_p_keeps_the_smallest_head_reaching_p(tiny_model):
    """top_p 0.7: tokens before which the cumulative probability is below 0.7 stay (0.5, then
    0.3 crosses it), renormalised to 0.625 / 0.375; the tail never appears. Catches an inclusive
    cumulative sum (only token 0 would stay), cutting on logits instead of probabilities, or the
    cut not applied."""
    found = frequencies(tiny_model, LOGITS, temperature=1.0, top_p=0.7, repetition_penalty=1.0)
    assert found[2:].sum() == 0.0
    np.testing.assert_allclose(found[:2], [0.625, 0.375], atol=0.012)


def test_temperature_divides_the_logits(tiny_model):
    """Temperature 2 flattens (softmax(logits / 2)), 0.5 sharpens (softmax(2 logits)). Catches a
    temperature that multiplies instead of divides (the two would swap), or is ignored."""
    for temperature in (2.0, 0.5):
        found = frequencies(tiny_model, LOGITS, temperature=temperature, top_p=1.0,
                            repetition_penalty=1.0)
        np.testing.assert_allclose(found, softmax(LOGITS / temperature), atol=0.012)


def test_temperature_comes_before_top_p(tiny_model):
    """Temperature 2 then top-p 0.7: softmax(logits / 2) is about (0.35, 0.27, 0.17, 0.11, ...),
    so tokens 0, 1, 2 stay (cumulative before token 2: 0.62 < 0.7), token 3 does not."""
    tempered = softmax(LOGITS / 2)
    assert tempered[:2].sum() < 0.7 <= tempered[:3].sum()
    found = frequencies(tiny_model, LOGITS, temperature=2.0, top_p=0.7, repetition_penalty=1.0)
    assert found[3:].sum() == 0.0
    np.testing.assert_allclose(found[:3], tempered[:3] / tempered[:3].sum(), atol=0.012)


def test_repetition_penalty_divides_generated_logits_by_the_factor(tiny_model):
    """Penalty 2 on generated tokens 0 (logit 2 -> 1) and 2 (logit -1 -> -2, a negative logit is
    multiplied so that it also drops); tokens 1 and 3 untouched. Catches a penalty applied to
    tokens not generated, dividing negative logits (which would raise them), or a penalty of
    the wrong size."""
    logits = [2.0, 2.0, -1.0, -1.0, -3.0, -3.0]
    found = frequencies(tiny_model, logits, generated=[1, 0, 1, 0, 0, 0], temperature=1.0,
                        top_p=1.0, repetition_penalty=2.0)
    np.testing.assert_allclose(found, softmax([1.0, 2.0, -2.0, -1.0, -3.0, -3.0]), atol=0.012)
    assert found[0] < found[1] and found[2] < found[3]
