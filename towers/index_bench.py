"""`cascade bench retrieval-index`: ScaNN against brute force, side by side in one run.

Two catalogs: the real one (with each user's training items excluded, as `retrieval` serves) and a
synthetic one of 1,000,000 items with the model's embedding size, where approximate search has
something to win. The synthetic items are the real item embeddings resampled with Gaussian noise
(by default 0.5 x each dimension's spread), then re-normalized like the tower's outputs: clustered like a real
catalog, unlike isotropic noise, which is the worst case for any partitioning index. Queries are
the real users' query embeddings.

ScaNN's knobs are chosen by measurement: a sweep over leaves searched and re-ranked candidates with
ScaNN's own searcher (query-time overrides, one build), keeping the fastest point whose recall@10
against exact search reaches the target; the chosen config is then built as the TFRS layer that
gets exported and timed beside the brute-force layer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tqdm

from towers import files, index

log = logging.getLogger(__name__)

K = 10
SINGLE_QUERIES = 200  # timed one at a time
BATCH = 256  # queries per call for throughput
SWEEP_LEAVES = (5, 10, 20, 40, 80, 160)
SWEEP_REORDER = (50, 100, 200, 400)
SELECTION_MARGIN = 0.01  # recall kept above the target when choosing a sweep point


def run_index_benchmark(query_embeddings: np.ndarray, candidate_ids: np.ndarray,
                        candidate_embeddings: np.ndarray, exclusions: np.ndarray | None,
                        out_dir: str | os.PathLike, synthetic_items: int = 1_000_000,
                        target_recall: float = 0.95, seed: int = 0, noise: float = 0.5) -> dict:
    """Measures both indexes on both catalogs; writes retrieval_index.{json,md,png} to `out_dir`."""
    out = pathlib.Path(out_dir)
    queries = np.asarray(query_embeddings, np.float32)
    real = np.asarray(candidate_embeddings, np.float32)
    row_of = {item: r for r, item in enumerate(candidate_ids)}
    excluded = None
    if exclusions is not None:
        excluded = np.array([[row_of.get(i, -1) for i in user] for user in exclusions], np.int32)

    log.info("synthetic catalog: %d items x %d dims", synthetic_items, real.shape[1])
    synthetic = synthetic_catalog(real, synthetic_items, seed, noise)
    results = {"k": K, "target_recall": target_recall, "synthetic_noise": noise, "catalogs": {}}
    for name, catalog, ex in (("real", real, excluded), ("synthetic", synthetic, None)):
        sweep = scann_sweep(queries, catalog, target_recall)
        chosen = sweep["chosen"]
        config = index.ScannConfig(num_leaves=sweep["num_leaves"],
                                   num_leaves_to_search=chosen["leaves_to_search"],
                                   num_reordering_candidates=chosen["reorder"])
        log.info("timing brute force and ScaNN on the %s catalog (%d items)", name, len(catalog))
        depth = K + (0 if ex is None else ex.shape[1])  # what query_with_exclusions asks for
        ids = np.arange(len(catalog), dtype=np.int32)
        brute = index.build_index("bruteforce", ids, catalog, k=depth)
        scann = index.build_index("scann", ids, catalog, k=depth, scann=config)
        exact = _search_all(brute, queries, ex)
        rows_out = {}
        for kind, layer in (("bruteforce", brute), ("scann", scann)):
            found = exact if kind == "bruteforce" else _search_all(layer, queries, ex)
            rows_out[kind] = {"recall@10": float(_recall(found, exact)), **_timings(layer, queries, ex)}
        rows_out["scann"]["speedup_single"] = rows_out["scann"]["single_qps"] / rows_out["bruteforce"]["single_qps"]
        rows_out["scann"]["speedup_batched"] = rows_out["scann"]["batched_qps"] / rows_out["bruteforce"]["batched_qps"]
        results["catalogs"][name] = {"items": len(catalog), "exclusions": ex is not None,
                                     "scann_config": dataclasses.asdict(config), "sweep": sweep["points"],
                                     **rows_out}
        del brute, scann
    # The real catalog's config is the one `cascade export --index scann` uses for this run.
    results["scann_config"] = results["catalogs"]["real"]["scann_config"]

    out.mkdir(parents=True, exist_ok=True)
    files.write_atomic(out / "retrieval_index.json", json.dumps(results, indent=2).encode())
    files.write_atomic(out / "retrieval_index.md", format_table(results).encode())
    _plot(results, out / "retrieval_index.png")
    return results


def synthetic_catalog(real: np.ndarray, size: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """`size` unit vectors: real embeddings resampled with Gaussian noise of `noise` x each
    dimension's spread (more noise: less cluster structure, a harder catalog for ScaNN)."""
    rng = np.random.default_rng(seed)
    spread = real.std(axis=0, keepdims=True)
    items = np.empty((size, real.shape[1]), np.float32)
    for start in range(0, size, 100_000):  # in chunks to bound memory
        stop = min(size, start + 100_000)
        chunk = real[rng.integers(0, len(real), stop - start)]
        chunk = chunk + noise * spread * rng.standard_normal(chunk.shape, dtype=np.float32)
        items[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return items


def scann_sweep(queries: np.ndarray, catalog: np.ndarray, target_recall: float) -> dict:
    """Recall@10 and single-query speed over ScaNN's query-time knobs, one build."""
    import scann

    num_leaves = max(1, int(round(np.sqrt(len(catalog)))))  # the usual sqrt(N) partitions
    started = time.perf_counter()
    searcher = (scann.scann_ops_pybind.builder(catalog, K, "dot_product")
                .tree(num_leaves=num_leaves, num_leaves_to_search=max(SWEEP_LEAVES))
                .score_ah(2).reorder(max(SWEEP_REORDER)).build())
    log.info("ScaNN built over %d items in %.1f s", len(catalog), time.perf_counter() - started)
    exact = _exact_top_k(queries, catalog)
    points = []
    leaf_counts = sorted({min(leaves, num_leaves) for leaves in SWEEP_LEAVES})
    for leaves, reorder in tqdm.tqdm([(l, r) for l in leaf_counts for r in SWEEP_REORDER],
                                     desc=f"ScaNN sweep, {len(catalog):,} items", unit="config"):
        found, _ = searcher.search_batched(queries, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)
        started = time.perf_counter()
        for query in queries[:SINGLE_QUERIES]:
            searcher.search(query, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)
        seconds = (time.perf_counter() - started) / min(SINGLE_QUERIES, len(queries))
        points.append({"leaves_to_search": leaves, "reorder": reorder,
                       "recall@10": float(_recall(found, exact)), "single_qps": 1.0 / seconds})
    # A margin over the target: the exported layer is a separate build whose k-means lands a little
    # differently (measured: 0.956 in the sweep, 0.949 rebuilt).
    good = [p for p in points if p["recall@10"] >= target_recall + SELECTION_MARGIN]
    chosen = max(good, key=lambda p: p["single_qps"]) if good else max(points, key=lambda p: p["recall@10"])
    log.info("chosen ScaNN config: %s", chosen)
    return {"num_leaves": num_leaves, "points": points, "chosen": chosen}


def format_table(results: dict) -> str:
    lines = ["| catalog | items | index | recall@10 | p50 ms | p95 ms | single-query QPS | batched QPS | "
             "speed-up (single / batched) |", "|---" * 9 + "|"]
    for name, catalog in results["catalogs"].items():
        for kind in ("bruteforce", "scann"):
            row = catalog[kind]
            speedup = (f"{row['speedup_single']:.1f}x / {row['speedup_batched']:.1f}x"
                       if kind == "scann" else "1x")
            lines.append(f"| {name}{' (seen items excluded)' if catalog['exclusions'] else ''} | "
                         f"{catalog['items']:,} | {kind} | {row['recall@10']:.3f} | {row['p50_ms']:.2f} | "
                         f"{row['p95_ms']:.2f} | {row['single_qps']:,.0f} | {row['batched_qps']:,.0f} | {speedup} |")
    lines.append("")
    for name, catalog in results["catalogs"].items():
        config = catalog["scann_config"]
        lines.append(f"ScaNN on {name}: {config['num_leaves']} leaves, {config['num_leaves_to_search']} "
                     f"searched, {config['num_reordering_candidates']} re-ranked; chosen as the fastest "
                     f"sweep point with recall@10 >= {results['target_recall']} + {SELECTION_MARGIN} margin.  ")
    return "\n".join(lines) + "\n"


def _exact_top_k(queries: np.ndarray, catalog: np.ndarray) -> np.ndarray:
    best = np.empty((len(queries), K), np.int64)
    for start in range(0, len(queries), 64):
        scores = queries[start:start + 64] @ catalog.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        best[start:start + 64] = np.take_along_axis(top, order, axis=1)
    return best


def _search_all(layer, queries: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
    found = []
    for start in range(0, len(queries), BATCH):
        q = tf.constant(queries[start:start + BATCH])
        if excluded is None:
            _, ids = layer(q, k=K)
        else:
            _, ids = layer.query_with_exclusions(q, tf.constant(excluded[start:start + BATCH]), k=K)
        found.append(ids.numpy())
    return np.concatenate(found)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact)]))


def _timings(layer, queries: np.ndarray, excluded: np.ndarray | None) -> dict:
    """Single-query latency percentiles and batched throughput through a traced tf.function."""
    dim = queries.shape[1]
    if excluded is None:
        call = tf.function(lambda q: layer(q, k=K), input_signature=[tf.TensorSpec([None, dim], tf.float32)])
        args = lambda s, e: (tf.constant(queries[s:e]),)
    else:
        call = tf.function(lambda q, x: layer.query_with_exclusions(q, x, k=K),
                           input_signature=[tf.TensorSpec([None, dim], tf.float32),
                                            tf.TensorSpec([None, excluded.shape[1]], tf.int32)])
        args = lambda s, e: (tf.constant(queries[s:e]), tf.constant(excluded[s:e]))
    inputs = [args(i, i + 1) for i in range(min(SINGLE_QUERIES, len(queries)))]
    for warm in inputs[:10]:
        call(*warm)
    latencies = []
    for single in inputs:
        started = time.perf_counter()
        call(*single)[1].numpy()
        latencies.append(time.perf_counter() - started)
    batches = [args(s, s + BATCH) for s in range(0, len(queries), BATCH)]
    call(*batches[0])
    started = time.perf_counter()
    for _ in range(3):
        for batch in batches:
            call(*batch)[1].numpy()
    batched_qps = 3 * len(queries) / (time.perf_counter() - started)
    latencies = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95)),
            "single_qps": float(1000 / latencies.mean()), "batched_qps": float(batched_qps)}


def _plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    sweep = results["catalogs"]["synthetic"]["sweep"]
    for reorder in SWEEP_REORDER:
        points = [p for p in sweep if p["reorder"] == reorder]
        axis.plot([p["single_qps"] for p in points], [p["recall@10"] for p in points], "o-",
                  label=f"ScaNN sweep (scann searcher), {reorder} re-ranked", alpha=0.7)
    synthetic = results["catalogs"]["synthetic"]
    axis.scatter([synthetic["scann"]["single_qps"]], [synthetic["scann"]["recall@10"]], marker="*",
                 s=250, color="black", zorder=5, label="chosen config (TFRS layer, as exported)")
    axis.scatter([synthetic["bruteforce"]["single_qps"]], [1.0], marker="s", s=90, color="red",
                 zorder=5, label="brute force (exact)")
    axis.axhline(results["target_recall"], color="grey", linestyle="--", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("single-query throughput (queries/s, log scale)")
    axis.set_ylabel("recall@10 vs exact search")
    axis.set_title(f"ScaNN vs brute force, {synthetic['items']:,} synthetic items")
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=120)
    pyplot.close(figure)
    os.replace(staging, path)
