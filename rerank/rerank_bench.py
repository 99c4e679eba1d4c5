"""`cascade bench reranker`: what re-ranking costs and what each way of cutting the cost gives up.

One run measures, for the run's trained re-ranker, each variant's
- latency of re-ranking 50 and 100 candidates for one user (median and p95 over single calls of
  the module's `serve` graph: retrieval logits, text lookup, in-graph tokenization, BERT, with
  one user's real retrieval top-M, users cycled), and pairs/second with 8 users x 100 candidates
  a call;
- quality: HR@10 / NDCG@10 / Recall@10 of the re-ranked retrieval top 100 on the run's test
  split for a fixed seeded sample of test users (`quality_users`, 0 for all), beside retrieval
  alone on the same users.
Variants: the trained model read at several sequence lengths (its own length is the default; the
others truncate or extend the same pair texts without retraining) and with Keras mixed bfloat16
(oneDNN uses AVX512-BF16 where the CPU has it). The default is also timed through a saved and
reloaded SavedModel's `serving_default` signature, what TF Serving runs.

int8 is not measured: TensorFlow has no int8 path for this graph on CPU (post-training
quantization is TFLite's, and TFLite cannot run the tensorflow-text tokenizer ops).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import platform
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tf_keras as keras

from rerank import cross_encoder as ce
from rerank import ranking
from rerank import rerank_eval, reranker_graph
from towers import cold_start, files, metrics
from towers import runs
from towers import model as towers_model

log = logging.getLogger(__name__)

SIZES = (50, 100)
SINGLE_CALLS = 30  # timed single-user calls per size
BATCH_USERS = 8
BATCH_CALLS = 5
QUALITY_DEPTH = 100


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    max_length: int
    precision: str = "float32"  # or "mixed_bfloat16"


def run_reranker_benchmark(run_dir: str | os.PathLike, out: str | os.PathLike,
                           lengths: tuple[int, ...] = (32, 48, 64, 96), quality_users: int = 300,
                           bfloat16: bool = True, seed: int = 0) -> dict:
    """Measures every variant; writes `reranker.json`, `reranker.md`, `reranker.png` to `out`."""
    run, out = pathlib.Path(run_dir), pathlib.Path(out)
    config = ce.run_config(run)
    reranker = ce.load_reranker(run)
    retrieval, tables = runs.load_run(run)
    _, candidates = towers_model.embeddings(retrieval, tables)
    cold = cold_start.popularity_query(candidates, tables.item_count)
    logits, users, items, seen, _ = rerank_eval.test_inputs(run)

    rng = np.random.default_rng(seed)
    test_users = np.unique(users)
    sample = (np.sort(rng.choice(test_users, quality_users, replace=False))
              if 0 < quality_users < len(test_users) else test_users)
    keep = np.isin(users, sample)
    top = ranking.top_candidates(logits, seen, QUALITY_DEPTH, users=sample)  # [S, 100]
    top_ids = tables.item_ids[top].astype(str)
    quality = lambda matrix: {k: round(v, 5) for k, v in metrics.evaluate(
        matrix, users[keep], items[keep], seen, (10,)).items()}

    variants = [Variant(f"T={n}" + (" (trained)" if n == config.max_length else ""), n)
                for n in sorted(set(lengths) | {config.max_length})]
    if bfloat16:
        variants.append(Variant(f"T={config.max_length} bfloat16", config.max_length,
                                "mixed_bfloat16"))
    rows = []
    for variant in variants:
        module = reranker_graph.RerankerModule(
            _variant_reranker(run, reranker, config, variant), retrieval.query_tower, cold,
            tables.item_ids, candidates, retrieval.config.temperature)
        row = {**dataclasses.asdict(variant), **_timings(module.serve, tables.user_ids[sample],
                                                         top_ids)}
        final = rerank_eval.rerank_scores(module.reranker, logits, seen, sample, tables.user_ids,
                                          tables.item_ids, QUALITY_DEPTH)[1]
        row["quality"] = quality(ranking.reranked(logits, sample, top, final))
        log.info("%s: %s", variant.name, row)
        rows.append(row)

    # The default once more, through a saved and reloaded signature (what TF Serving runs).
    default = reranker_graph.RerankerModule(reranker, retrieval.query_tower, cold,
                                             tables.item_ids, candidates,
                                             retrieval.config.temperature)
    with tempfile.TemporaryDirectory() as staging:
        reranker_graph.save(default, pathlib.Path(staging) / "1")
        signature = tf.saved_model.load(str(pathlib.Path(staging) / "1")).signatures[
            "serving_default"]
        saved = _timings(lambda user_id, item_ids: signature(user_id=user_id, item_ids=item_ids),
                         tables.user_ids[sample], top_ids)
    result = {
        "run": str(run), "config": dataclasses.asdict(config),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "tensorflow": tf.__version__,
                    "gpu": bool(tf.config.list_physical_devices("GPU"))},
        "quality_sample": {"users": int(len(sample)), "test_rows": int(keep.sum()),
                           "of_users": int(len(test_users)), "seed": seed,
                           "depth": QUALITY_DEPTH},
        "retrieval_quality": quality(logits),
        "variants": rows,
        "saved_model_default": saved,
    }
    out.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out / "reranker.json", json.dumps(result, indent=2).encode())
    files.write_atomic(out / "reranker.md", format_markdown(result).encode())
    _plot(result, out / "reranker.png")
    return result


def _variant_reranker(run: pathlib.Path, trained: ce.Reranker, config: ce.RerankerConfig,
                      variant: Variant) -> ce.Reranker:
    """The trained re-ranker read at `variant.max_length`, in `variant.precision`."""
    if variant.precision == "float32":
        encoder = trained.encoder
    else:  # the same weights in a model built under the mixed policy
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(variant.precision)
        try:
            encoder = ce.new_encoder(run / ce.RERANKER_DIR / ce.BASE_DIR, config, pretrained=False)
            encoder.load_weights(str(run / ce.RERANKER_DIR / ce.WEIGHTS)).expect_partial()
        finally:
            keras.mixed_precision.set_global_policy(previous)
    return _Float32(ce.Reranker(encoder, trained.texts, trained.tokenizer, variant.max_length))


class _Float32(keras.Model):
    """Casts a re-ranker's scores to float32 (a mixed-precision model returns bfloat16)."""

    def __init__(self, reranker: ce.Reranker, **kwargs):
        super().__init__(**kwargs)
        self.inner = reranker
        self.encoder, self.texts, self.max_length = (reranker.encoder, reranker.texts,
                                                     reranker.max_length)

    def call(self, inputs, training=False):
        return tf.cast(self.inner(inputs, training=training), tf.float32)


def _timings(serve, user_ids: np.ndarray, top_ids: np.ndarray) -> dict:
    """Median / p95 ms of single-user calls with 50 and 100 candidates; pairs/s in batches."""
    out = {}
    for size in SIZES:
        call = lambda i: serve(tf.constant(user_ids[i:i + 1].astype(str)),
                               tf.constant(top_ids[i:i + 1, :size]))["scores"].numpy()
        for i in range(3):
            call(i)  # trace and warm up
        seconds = []
        for i in range(SINGLE_CALLS):
            started = time.perf_counter()
            call(i % len(user_ids))
            seconds.append(time.perf_counter() - started)
        out[f"ms@{size}"] = {"median": round(1e3 * float(np.median(seconds)), 1),
                             "p95": round(1e3 * float(np.percentile(seconds, 95)), 1)}
    batch = lambda i: serve(tf.constant(user_ids[i:i + BATCH_USERS].astype(str)),
                            tf.constant(top_ids[i:i + BATCH_USERS]))["scores"].numpy()
    batch(0)
    seconds = []
    for i in range(BATCH_CALLS):
        started = time.perf_counter()
        batch(i * BATCH_USERS % max(len(user_ids) - BATCH_USERS, 1))
        seconds.append(time.perf_counter() - started)
    out["pairs_per_second"] = round(BATCH_USERS * top_ids.shape[1] / float(np.median(seconds)))
    out["pairs_per_second_single_user"] = round(SIZES[-1] / out[f"ms@{SIZES[-1]}"]["median"] * 1e3)
    return out


def format_markdown(result: dict) -> str:
    sample = result["quality_sample"]
    base = result["retrieval_quality"]
    lines = [
        f"Re-ranker cost on {result['machine']['cpus']} CPU cores "
        f"(TensorFlow {result['machine']['tensorflow']}); trained with "
        f"layers={result['config']['layers']}, max_length={result['config']['max_length']}. "
        f"Quality: retrieval top-{sample['depth']} re-ranked, {sample['users']} of "
        f"{sample['of_users']} test users (seed {sample['seed']}, {sample['test_rows']} test rows).",
        "",
        "| variant | 100 cand. median ms | p95 ms | 50 cand. median ms | p95 ms | pairs/s "
        "(8x100) | pairs/s (1x100) | HR@10 | NDCG@10 | Recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| retrieval alone | – | – | – | – | – | – | {base['hit_rate@10']:.4f} | "
        f"{base['ndcg@10']:.4f} | {base['recall@10']:.4f} |",
    ]
    for row in result["variants"]:
        q = row["quality"]
        lines.append(
            f"| {row['name']} | {row['ms@100']['median']} | {row['ms@100']['p95']} | "
            f"{row['ms@50']['median']} | {row['ms@50']['p95']} | {row['pairs_per_second']} | "
            f"{row['pairs_per_second_single_user']} | {q['hit_rate@10']:.4f} | "
            f"{q['ndcg@10']:.4f} | {q['recall@10']:.4f} |")
    saved = result["saved_model_default"]
    lines.append(
        f"| default via SavedModel signature | {saved['ms@100']['median']} | "
        f"{saved['ms@100']['p95']} | {saved['ms@50']['median']} | {saved['ms@50']['p95']} | "
        f"{saved['pairs_per_second']} | {saved['pairs_per_second_single_user']} | – | – | – |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for row in result["variants"]:
        x, y = row["ms@100"]["median"], row["quality"]["hit_rate@10"]
        axis.scatter(x, y, color="tab:red" if row["precision"] != "float32" else "tab:blue")
        axis.annotate(row["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.axhline(result["retrieval_quality"]["hit_rate@10"], color="gray", linestyle="--",
                 label="retrieval alone")
    axis.axvline(250, color="tab:orange", linestyle=":", label="250 ms budget")
    axis.set_xlabel("re-ranking 100 candidates for one user, median ms")
    axis.set_ylabel(f"HR@10 ({result['quality_sample']['users']} test users)")
    axis.set_title("Cross-encoder re-ranker: latency vs quality")
    axis.legend(loc="lower right")
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=120)
    pyplot.close(figure)
    os.replace(staging, path)
