"""The re-ranking stages' configs, apart from their models so that reading them (the CLI's flags,
a run's reranker_config.json and copywriter/config.json) does not import TensorFlow.
`rerank.cross_encoder` and `rerank.copy.copywriter` re-export them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
    # Measured on runs/ml100k (2 CPU cores, validation from training rows; docs/results.md): BERT learned
    # no signal beyond the retrieval + popularity terms at 32 or 48 tokens, lr 1e-4 to 1e-3, with
    # or without trainable embeddings, so the default is the cheapest of those runs.
    max_length: int = 32  # tokens per pair: 2 layers x 100 pairs within the 250 ms budget
    history_titles: int = 4  # newest training interactions in the context (truncation cuts more)
    layers: int = 2  # first MiniLM layers kept (a layer-dropped student)
    candidates: int = 100  # two-tower top-K re-ranked by BERT, and where hard negatives come from
    # Further candidate sources (towers/sources.py) merged into the list the scalar terms score
    # first; BERT then re-scores the best `candidates` of it. 0: the two-tower list alone.
    # Chosen on the validation rows (held-out training rows, shadow model; `cascade evaluate
    # reranker --sweep-candidates`), ML-100K hit rate of the set, two-tower + item-to-item slots:
    # 100+0 0.539, 75+25 0.551; 150+0 0.649, 125+25 0.659, 100+50 0.657, 75+75 0.660; 200+0 0.724,
    # 150+50 0.735. Depth buys most of it; the item-to-item source adds ~0.01 at equal size.
    # 100 + 50 keeps BERT at 100 pairs (the latency budget) and lets the scalar terms pick them.
    item_item_candidates: int = 50  # neighbours of the user's history by the EASE weights
    new_item_candidates: int = 0  # items with <= new_item_max_count training rows, by content
    new_item_max_count: int = 0
    group_size: int = 8  # one positive and 7 hard negatives per softmax
    # A second softmax per group for the BERT term alone: the positive against `text_negatives`
    # items drawn from the whole catalog, its loss weighted by `text_loss_weight` (0: off). It
    # is what teaches BERT the topic of a title rather than the residual of retrieval: on the
    # synthetic new-words catalog (docs/results.md) the new-arrivals shelf goes from chance to 2x with it
    # (tests/rerank/test_text_preference.py: 0.19 -> 0.32 at tiny size). Off by default: it
    # doubles the pairs of a training step, and on MovieLens-100K's random split, where every
    # test item has training rows, it was not measured against validation rows.
    text_negatives: int = 7
    text_loss_weight: float = 0.0
    holdout: int = 20_000  # training rows the shadow retrieval model does not see: the positives
    validation_share: float = 0.2  # last share of the held-out rows, for validation only
    validation_users: int = 300  # users re-ranked for validation, 0 for all (each costs K pairs)
    popularity_feature: bool = True  # w_p * log(1 + training count) in the final score
    # How the popularity term counts: `auto` (all-time counts unless a half-life raises the
    # held-out rows' popularity hit rate@100, `towers.peers.choose_half_life`: MovieLens-100K
    # keeps all-time counts under `random` and `user-temporal`, takes 14 days under `temporal`),
    # `none` (all-time), or a half-life in the timestamp's units. The run's reranker_config.json
    # records the value used.
    popularity_half_life: str = "auto"
    ease_feature: bool = True  # w_e * EASE score in the final score (test HR@10 0.166 -> 0.176)
    ease_l2: float = 500.0  # EASE ridge strength: best EASE-alone validation hit rate of 200-1000
    # EASE weights kept per item (largest by magnitude): the term's size is items x this, never
    # users x items. MovieLens-100K, EASE alone test HR@10: dense 0.1767, 400: 0.1762,
    # 200: 0.1747, 100: 0.1705, 50: 0.1640.
    ease_neighbours: int = 200
    # Items the EASE fit covers (one dense m x m inverse); a larger catalog's term covers its most
    # interacted items and gives the rest 0 (towers.peers.ease_neighbours).
    ease_max_items: int = 10_000
    train_embeddings: bool = False  # fine-tune the embedding layer (12M of 15M weights at 2 layers)
    epochs: int = 1  # 8,660 groups, 542 steps: 7-8 min of training on 2 cores
    batch_groups: int = 16  # groups per step (16 x 8 = 128 pairs)
    learning_rate: float = 1e-3  # AdamW on BERT, linear decay to 0
    weight_decay: float = 0.01
    seed: int = 42


def half_life(config: RerankerConfig) -> str | float | None:
    """The config's popularity half-life: "auto", None (all-time counts) or a positive number."""
    text = str(config.popularity_half_life).strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"--popularity-half-life: expected auto, none or a positive number (in "
                         f"the timestamp's units), got {config.popularity_half_life!r}")
    return value


def source_config(config: RerankerConfig):
    """The candidate sources (`towers.sources.SourceConfig`) a re-ranker config names."""
    from towers import sources

    return sources.SourceConfig(config.candidates, config.item_item_candidates,
                                config.new_item_candidates, config.new_item_max_count)


@dataclasses.dataclass(frozen=True)
class CopywriterConfig:
    # Model (ignored when fine-tuning a checkpoint, which brings its own). Sized by measurement:
    # 2 layers x 128 fits the 150 ms budget for 10 lines on 2 cores with room to spare.
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 160  # longest served prompt (~90 tokens) plus max_new_tokens, and slack
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus; copy lines average ~20 tokens
    dropout: float = 0.0  # a few minutes of training on templated text does not overfit
    # Corpus and training.
    corpus_size: int = 40_000  # examples drawn from the training rows (ML-100K: 80,000)
    heldout_fraction: float = 0.05  # kept out of training, for perplexity
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 3e-3  # AdamW peak, after linear warmup, cosine decay to 10%
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Decoding.
    # Decoding chosen on 1,000 (user, item) pairs of the training split (never the test split),
    # ML-100K: temperature / top-k / samples per line -> share of lines served as the fallback,
    # distinct-2 of served lines: 1.0/40/2 -> 0.7%, 0.420; 1.3/80/3 -> 0.9%, 0.452;
    # 1.4/80/4 -> 1.5%, 0.460; 1.45/80/4 -> 2.4%, 0.467 (`cascade evaluate copywriter --sweep`).
    temperature: float = 1.4
    top_k: int = 80
    top_p: float = 0.95
    repetition_penalty: float = 1.3  # on tokens already generated, never on the prompt's
    max_new_tokens: int = 40  # p95 of corpus copy lines is 29 tokens
    # Samples drawn per line, in one batch: the first that passes every check is served, the
    # factual fallback only when none does (rejection sampling against the graph's own check).
    attempts: int = 4
    jit_compile: bool = True  # XLA for the train step only; never exported
    seed: int = 42
