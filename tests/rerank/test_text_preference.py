"""Proof that the re-ranker's text path learns (issue: every stage earns its cost). A synthetic
catalog whose preference lives only in the titles (flat popularity, random categories), where
new items are named with words no old item has (`cascade data synth --new-words`): the two-tower,
which learns words from interactions, knows nothing of a new item and ranks the new-arrivals
shelf like chance; the cross-encoder, trained with its text loss against random catalog items,
reads the titles with MiniLM's pretrained vocabulary and finds the topic of the user's history in
the new words. Tiny sizes here; the full-size run is in the README."""

from __future__ import annotations

import json

import pytest

from rerank import checkpoint as checkpoints
from rerank import cross_encoder as ce
from rerank import rerank_eval
from towers import runs, synth, train

SYNTH = dict(users=500, items=240, interactions=15_000, topics=4, text_only=True, new_words=True,
             new_item_share=0.3, text_signal=1.0, seed=1)
RERANKER = dict(max_length=32, history_titles=2, layers=1, candidates=30, group_size=4,
                holdout=3000, validation_users=20, epochs=1, batch_groups=16,
                learning_rate=2e-3, item_item_candidates=0, text_negatives=7,
                text_loss_weight=1.0, popularity_half_life="none")
# All-time popularity: this catalog's held-out rows favour a half-life (new items arrive over
# time), which re-weights the warm items' head; what is tested here is the text path, measured
# as below without it.


@pytest.fixture(scope="module")
def text_run(tiny_config, tmp_path_factory):
    folder = synth.synthesize(tmp_path_factory.mktemp("words"), progress=False, **SYNTH)
    run = tmp_path_factory.mktemp("words-run")
    train.train(runs.DataConfig(str(folder), split="temporal"), run, tiny_config, verbose=0)
    return run


def _shelf(run, **config):
    ce.train_reranker(run, checkpoint=checkpoints.fetch_minilm(), verbose=0,
                      config=ce.RerankerConfig(**{**RERANKER, **config}))
    return rerank_eval.evaluate_new_items(run, record=False)["shelf_hit_rate@10"]


def test_cross_encoder_finds_the_topic_in_words_retrieval_never_saw(text_run):
    """Measured at these sizes: retrieval 0.158 on the shelf (chance: 10 of 72 new items, 0.14),
    re-ranked 0.325 (2.1x; BERT's weights at 1: the fit on 22 validation rows, 0.48 for warm
    items, lowered their hit rate and was rejected), and 0.187 with the text loss off (the
    ablation: the hard negatives alone teach BERT no topic, because retrieval already ranks by
    it on the items it knows).
    The bounds leave room for numerics; the full-size run in the README measures 2x and more."""
    shelf = _shelf(text_run)
    assert shelf["retrieval"] < 0.2, shelf  # new words: the towers rank the shelf as chance would
    assert shelf["head_only"] == shelf["retrieval"]  # no scalar term knows a new item
    assert shelf["reranked"] >= 1.7 * shelf["retrieval"], shelf
    # Training fit BERT's weight for warm items on its validation rows (new items, none among
    # them, keep 1) and checked it against the validation hit rate; `--calibrate`, for runs
    # trained before the fit, comes to the same weights from the rebuilt validation.
    trained = json.loads((text_run / "metrics.json").read_text())["reranker"]["validation"][
        "text_weights"]
    assert trained["rows"] >= ce.MIN_FIT_ROWS and not trained["accepted"], trained
    # The listwise fit landed on 0.48 for warm items, which lowered validation hit rate@10
    # (0.154 -> 0.141): rejected, both weights stay at the fine-tuned 1.
    rejected = trained["rejected"]
    assert rejected["text_weight"] != 1.0 and trained["text_weight"] == 1.0, trained
    assert rejected["metrics"]["hit_rate@10"] < trained["before"]["hit_rate@10"], trained
    again = rerank_eval.calibrate(text_run)["text_weights"]
    for name in ("text_weight", "new_text_weight"):
        assert again[name] == pytest.approx(trained[name], abs=1e-4), (again, trained)
        assert again["rejected"][name] == pytest.approx(rejected[name], abs=1e-4), again
    assert again["after"] == trained["after"]
    ablation = _shelf(text_run, text_loss_weight=0.0)["reranked"]
    assert ablation <= 0.75 * shelf["reranked"], (ablation, shelf)
