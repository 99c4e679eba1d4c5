"""`cascade report`: one Markdown + HTML page, with PNG plots, of everything a run has measured.

It reads what the run directory already holds and measures only what is cheap and missing:

| section | read from | made by |
| --- | --- | --- |
| results | `metrics.json` (`test`, `reranker.test`, `copywriter.evaluation`) | `cascade evaluate retrieval/reranker/copywriter` |
| training curves | TensorBoard logs (`logs/`, `reranker/logs/`), copywriter loss in `metrics.json` | `cascade train ...` |
| hit rate@K, K = 1..100 | computed here: retrieval, re-ranked top 100, popularity, ALS, EASE | a trained retrieval run |
| ScaNN trade-off | `bench/retrieval_index.json` | `cascade bench retrieval-index` |
| re-rank latency vs quality | `bench/reranker.json` | `cascade bench reranker` |
| serving latency | `bench/serve.json` | `cascade bench serve` |

A section whose input is missing says which command makes it; nothing fails for want of a stage.
The hit-rate curves use the evaluation protocol's test split and metric code (`towers.metrics`),
so their values at K = 10/50/100 are `metrics.json`'s. Re-ranking every test user's top 100 is the
one slow step (minutes with MiniLM on 2 cores); its curve is cached in the output folder, keyed
by the sizes and times of the checkpoints it came from.
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

from towers import files

log = logging.getLogger(__name__)

MAX_K = 100
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CURVES_CACHE = "hit_rate_curves.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ReportError(ValueError):
    """A run's file exists but cannot be read; the message names the file."""


@dataclasses.dataclass
class Section:
    title: str
    body: str  # Markdown
    plot: str | None = None  # PNG file name in the output folder
    missing: str | None = None  # the command that produces the missing input


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 curves: bool = True) -> dict:
    """Writes `report.md`, `report.html` and the PNGs to `out` (default `<run>/report`).

    Returns {"markdown": path, "html": path, "plots": [names], "missing": {section: command}}.
    `curves=False` skips computing the hit-rate curves (the one part that loads models)."""
    run = pathlib.Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory; make one with "
                                f"`cascade train retrieval --run {run}`")
    out = pathlib.Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = _read_json(run / "metrics.json") or {}
    sections = [
        results_section(run, metrics),
        training_section(run, metrics, out),
        hit_rate_section(run, out) if curves else
        Section("Hit rate@K", "Skipped (`--no-curves`).", missing=f"cascade report --run {run}"),
        scann_section(run, out),
        rerank_section(run, out),
        serving_section(run, out),
        copy_section(run, metrics),
    ]
    markdown = _markdown(run, sections)
    files.write_atomic(out / REPORT_MD, markdown.encode())
    files.write_atomic(out / REPORT_HTML, _html(markdown).encode())
    return {"markdown": out / REPORT_MD, "html": out / REPORT_HTML,
            "plots": [s.plot for s in sections if s.plot],
            "missing": {s.title: s.missing for s in sections if s.missing}}


# --- Sections --------------------------------------------------------------------------------

def results_section(run: pathlib.Path, metrics: dict) -> Section:
    """The test tables: retrieval vs peers, the re-ranker, the copywriter."""
    from towers import retrieval_eval

    parts, missing = [], []
    if "test" in metrics:
        parts.append("Retrieval on the test split (training items excluded unless noted):\n\n"
                     + retrieval_eval.format_table(metrics["test"]))
        if "new_items" in metrics["test"]:
            parts.append(retrieval_eval.format_new_items(metrics["test"]["new_items"]))
        if "new_users" in metrics["test"]:
            parts.append(retrieval_eval.format_new_users(metrics["test"]["new_users"]))
    else:
        missing.append(f"cascade evaluate retrieval --run {run}")
    rerank_test = metrics.get("reranker", {}).get("test")
    if rerank_test:
        from rerank import rerank_eval

        table = {k: v for k, v in rerank_test.items() if isinstance(v, dict) and "hit_rate@10" in v}
        parts.append("Re-ranker on the test split:\n\n" + rerank_eval.format_table(table))
        training = metrics.get("reranker", {}).get("training", {})
        if "head" in training:
            parts.append(rerank_eval.format_head(training))
        if rerank_test.get("candidates"):
            parts.append(rerank_eval.format_candidates(rerank_test["candidates"]))
        if rerank_test.get("buckets"):
            parts.append(rerank_eval.format_buckets(rerank_test["buckets"]))
    else:
        missing.append(f"cascade evaluate reranker --run {run}")
    body = "\n\n".join(parts)
    if missing:
        body += ("\n\n" if body else "") + "Not measured yet; run " + _commands(missing) + "."
    return Section("Results", body, missing="; ".join(missing) or None)


def training_section(run: pathlib.Path, metrics: dict, out: pathlib.Path) -> Section:
    """Loss (and validation metrics, when recorded) per epoch of every trained stage."""
    stages = training_curves(run, metrics)
    if not stages:
        command = f"cascade train retrieval --run {run}"
        return Section("Training curves", f"No training logs; run `{command}`.", missing=command)
    _plot_training(stages, out / "training_curves.png")
    lines = ["| stage | epochs | first loss | last loss |", "|---|---|---|---|"]
    for stage, series in stages.items():
        loss = series.get("loss", [])
        if loss:
            lines.append(f"| {stage} | {len(loss)} | {loss[0]:.4g} | {loss[-1]:.4g} |")
    untrained = [s for s, name in (("reranker", "re-ranker"), ("copywriter", "copywriter"))
                 if name not in stages]
    body = "\n".join(lines)
    if untrained:
        body += "\n\nNot trained: " + _commands(f"cascade train {s} --run {run}" for s in untrained) + "."
    return Section("Training curves", body, plot="training_curves.png")


def hit_rate_section(run: pathlib.Path, out: pathlib.Path) -> Section:
    try:
        curves = hit_rate_curves(run, out / CURVES_CACHE)
    except FileNotFoundError as error:
        command = f"cascade train retrieval --run {run}"
        return Section("Hit rate@K", f"No trained retrieval model ({error}); run `{command}`.",
                       missing=command)
    _plot_hit_rate(curves, out / "hit_rate_at_k.png")
    ks = [k for k in (1, 5, 10, 20, 50, 100) if k <= MAX_K]
    lines = ["| model | " + " | ".join(f"HR@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{curve[k - 1]:.4f}" for k in ks) + " |"
              for name, curve in curves.items()]
    body = ("Share of test interactions whose item is in the user's top K, training items "
            "excluded, K = 1..100.\n\n" + "\n".join(lines))
    if "re-ranked top 100" not in curves:
        body += f"\n\nNo re-ranker curve: run `cascade train reranker --run {run}`."
    return Section("Hit rate@K", body, plot="hit_rate_at_k.png",
                   missing=None if "re-ranked top 100" in curves else
                   f"cascade train reranker --run {run}")


def scann_section(run: pathlib.Path, out: pathlib.Path) -> Section:
    bench = _read_json(run / "bench" / "retrieval_index.json")
    if bench is None:
        command = f"cascade bench retrieval-index --run {run}"
        return Section("ScaNN recall / throughput", f"Not measured; run `{command}`.", missing=command)
    _plot_scann(bench, out / "scann_tradeoff.png")
    table = _read_text(run / "bench" / "retrieval_index.md")
    return Section("ScaNN recall / throughput", table or "", plot="scann_tradeoff.png")


def rerank_section(run: pathlib.Path, out: pathlib.Path) -> Section:
    bench = _read_json(run / "bench" / "reranker.json")
    if bench is None:
        command = f"cascade bench reranker --run {run}"
        if not (run / "reranker" / "reranker_config.json").exists():
            command = f"cascade train reranker --run {run}`, then `{command}"
        return Section("Re-rank latency vs quality", f"Not measured; run `{command}`.",
                       missing=command)
    _plot_rerank(bench, out / "rerank_latency_quality.png")
    return Section("Re-rank latency vs quality", _read_text(run / "bench" / "reranker.md") or "",
                   plot="rerank_latency_quality.png")


def serving_section(run: pathlib.Path, out: pathlib.Path) -> Section:
    bench = _read_json(run / "bench" / "serve.json")
    if bench is None:
        command = (f"cascade export --run {run} --model-base-path models`, then "
                   f"`cascade bench serve --model-base-path models --out {run / 'bench'}")
        return Section("Serving latency", f"Not measured; run `{command}`.", missing=command)
    _plot_serving(bench, out / "serving_latency.png")
    return Section("Serving latency", _read_text(run / "bench" / "serve.md") or "",
                   plot="serving_latency.png")


def copy_section(run: pathlib.Path, metrics: dict) -> Section:
    result = metrics.get("copywriter", {}).get("evaluation")
    if not result:
        command = f"cascade evaluate copywriter --run {run}"
        if not (run / "copywriter" / "config.json").exists():
            command = f"cascade train copywriter --run {run}`, then `{command}"
        return Section("Copy grounding", f"Not measured; run `{command}`.", missing=command)
    from rerank.copy import evaluation

    return Section("Copy grounding", evaluation.format_report(result))


# --- Data ------------------------------------------------------------------------------------

def training_curves(run: pathlib.Path, metrics: dict | None = None) -> dict[str, dict[str, list]]:
    """{stage: {series: values per epoch}}: Keras logs from TensorBoard (`loss`, `val_*`), and
    the copywriter's loss from `metrics.json` (it writes no TensorBoard logs)."""
    metrics = metrics if metrics is not None else (_read_json(run / "metrics.json") or {})
    stages = {}
    for stage, logs in (("retrieval", run / "logs"), ("re-ranker", run / "reranker" / "logs")):
        series = {}
        for split, prefix in (("train", ""), ("validation", "val_")):
            for tag, values in read_scalars(logs / split).items():
                name = tag.removeprefix("epoch_")
                if name not in ("regularization_loss", "total_loss", "learning_rate"):
                    series[prefix + name] = values
        if not series and stage == "retrieval" and metrics.get("training", {}).get("loss"):
            series["loss"] = metrics["training"]["loss"]
        if series:
            stages[stage] = series
    copy_loss = metrics.get("copywriter", {}).get("training", {}).get("loss")
    if copy_loss:
        stages["copywriter"] = {"loss": copy_loss}
    return stages


def read_scalars(log_dir: pathlib.Path) -> dict[str, list[float]]:
    """{tag: values in step order} of every scalar in a TensorBoard folder's event files."""
    import tensorflow as tf

    points: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    scalar = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                              else value.simple_value)
                    points.setdefault(value.tag, {})[event.step] = scalar
        except tf.errors.DataLossError:  # a file still being written ends mid-record
            log.warning("%s: truncated; read what was complete", path)
    return {tag: [steps[s] for s in sorted(steps)] for tag, steps in points.items()}


def hit_rate_curves(run: pathlib.Path, cache: pathlib.Path | None = None,
                    max_k: int = MAX_K) -> dict[str, list[float]]:
    """Hit rate@K for K = 1..max_k on the test split: retrieval, the re-ranked retrieval top
    `max_k` (when the run has a re-ranker), popularity, ALS and EASE."""
    from towers import metrics, peers, retrieval_eval, runs
    from towers import model as towers_model

    retrieval, tables = runs.load_run(run)
    test = runs.run_data(run)[1].test
    users, items, seen = retrieval_eval.test_rows(tables, test)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    test_users, index = np.unique(users, return_inverse=True)
    curve = lambda scores: _curve(metrics.rankings(scores, seen, max_k, users=test_users), index,
                                  items, max_k)
    curves = {"retrieval": curve(metrics.embedding_scores(queries, candidates))}
    if (run / "reranker" / "reranker_config.json").exists():
        logits = metrics.embedding_scores(queries, candidates, 1.0 / retrieval.config.temperature)
        curves["re-ranked top 100"] = _reranked_curve(run, logits, seen, users, items, tables,
                                                      cache, max_k)
    curves["popularity"] = curve(peers.popularity_scores(seen))
    curves["ALS"] = curve(peers.als_scores(seen))
    curves["EASE"] = curve(peers.ease_scores(seen))
    return curves


def _curve(top: np.ndarray, index: np.ndarray, items: np.ndarray, max_k: int) -> list[float]:
    """Hit rate at K = 1..max_k from the ranked item rows `top` [test users, >= max_k] of each
    test pair's user (`index` [N] into them)."""
    hits = top[index, :max_k] == items[:, None]  # [N, max_k]: where each test item was ranked
    return [round(float(v), 5) for v in np.cumsum(hits.mean(axis=0))]


def _reranked_curve(run, logits, seen, users, items, tables, cache, max_k) -> list[float]:
    from rerank import cross_encoder, rerank_eval

    stamp = {str(p.relative_to(run)): [p.stat().st_size, p.stat().st_mtime_ns]
             for p in sorted([*(run / "reranker" / "checkpoints").glob("final.*"),
                              *(run / "checkpoints").glob("final.*")])}
    cached = _read_json(cache) if cache is not None else None
    if cached and cached.get("stamp") == stamp and len(cached.get("curve", [])) == max_k:
        return cached["curve"]
    started = time.perf_counter()
    user_rows, index = np.unique(users, return_inverse=True)
    top, final = rerank_eval.rerank_scores(cross_encoder.load_reranker(run), logits, seen,
                                           user_rows, tables.user_ids, tables.item_ids, max_k)
    order = np.take_along_axis(top, np.argsort(-final, axis=1, kind="stable"), axis=1)
    curve = _curve(order, index, items, max_k)
    log.info("re-ranked %d users' top %d in %.0f s", len(user_rows), max_k,
             time.perf_counter() - started)
    if cache is not None:
        files.write_atomic(cache, json.dumps({"stamp": stamp, "curve": curve}).encode())
    return curve


def _read_json(path: pathlib.Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: not valid JSON ({error}); re-run the command that wrote it")


def _read_text(path: pathlib.Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


# --- Plots -----------------------------------------------------------------------------------

def _figure(columns: int = 1, rows: int = 1, width: float = 6.5, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)


def _save(figure, path: pathlib.Path) -> None:
    from matplotlib import pyplot

    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=110)
    pyplot.close(figure)
    os.replace(staging, path)


def _plot_training(stages: dict[str, dict[str, list]], path: pathlib.Path) -> None:
    from matplotlib import ticker

    figure, axes = _figure(len(stages), width=4.8)
    for axis, (stage, series) in zip(axes[0], stages.items()):
        if "loss" in series:
            epochs = np.arange(1, len(series["loss"]) + 1)
            axis.plot(epochs, series["loss"], "o-", color="tab:blue", label="training loss")
            axis.set_ylabel("loss")
        validation = {k: v for k, v in series.items() if k.startswith("val_")}
        if validation:
            twin = axis.twinx()
            for name, values in validation.items():
                twin.plot(np.arange(1, len(values) + 1), values, "s--", label=name)
            twin.set_ylabel("validation")
            twin.legend(loc="center right", fontsize=7)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        axis.set_title(stage)
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper right", fontsize=7)
    _save(figure, path)


def _plot_hit_rate(curves: dict[str, list[float]], path: pathlib.Path) -> None:
    figure, axes = _figure()
    axis = axes[0][0]
    for name, curve in curves.items():
        axis.plot(np.arange(1, len(curve) + 1), curve, label=name,
                  linestyle="-" if name in ("retrieval", "re-ranked top 100") else "--")
    axis.set_xlabel("K")
    axis.set_ylabel("hit rate@K (test split, seen items excluded)")
    axis.set_title("Hit rate@K: Cascade stages vs peers")
    axis.grid(True, alpha=0.3)
    axis.legend()
    _save(figure, path)


def _plot_scann(bench: dict, path: pathlib.Path) -> None:
    catalogs = bench["catalogs"]
    figure, axes = _figure(len(catalogs), width=5.5)
    for axis, (name, catalog) in zip(axes[0], catalogs.items()):
        chosen = catalog["scann_config"]
        for leaves in sorted({p["leaves_to_search"] for p in catalog["sweep"]}):
            points = [p for p in catalog["sweep"] if p["leaves_to_search"] == leaves]
            axis.plot([p["recall@10"] for p in points], [p["single_qps"] for p in points], "o-",
                      markersize=4, label=f"{leaves} leaves searched")
        for point in catalog["sweep"]:
            if (point["leaves_to_search"], point["reorder"]) == (
                    chosen["num_leaves_to_search"], chosen["num_reordering_candidates"]):
                axis.plot(point["recall@10"], point["single_qps"], "*", color="black",
                          markersize=14, label="chosen")
        axis.axvline(bench.get("target_recall", 0.95), color="gray", linestyle=":",
                     label="target recall")
        axis.set_yscale("log")
        axis.set_xlabel(f"recall@{bench.get('k', 10)} vs brute force")
        axis.set_ylabel("queries / s (sweep)")
        axis.set_title(f"ScaNN on {name} ({catalog['items']:,} items); brute force "
                       f"{catalog['bruteforce']['single_qps']:,.0f} q/s", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, path)


def _plot_rerank(bench: dict, path: pathlib.Path) -> None:
    figure, axes = _figure()
    axis = axes[0][0]
    for row in bench["variants"]:
        for size, marker in (("ms@100", "o"), ("ms@50", "^")):
            x, y = row[size]["median"], row["quality"]["hit_rate@10"]
            axis.scatter(x, y, marker=marker,
                         color="tab:red" if row["precision"] != "float32" else "tab:blue")
            if size == "ms@100":
                axis.annotate(row["name"], (x, y), textcoords="offset points", xytext=(5, 4),
                              fontsize=7)
    axis.axhline(bench["retrieval_quality"]["hit_rate@10"], color="gray", linestyle="--",
                 label="retrieval alone")
    axis.scatter([], [], marker="o", color="gray", label="100 candidates")
    axis.scatter([], [], marker="^", color="gray", label="50 candidates")
    axis.set_xlabel("median ms to re-rank one user's candidates")
    axis.set_ylabel(f"HR@10 ({bench['quality_sample']['users']} test users)")
    axis.set_title("Re-ranker: latency vs quality (red: bfloat16)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    _save(figure, path)


def _plot_serving(bench: dict, path: pathlib.Path) -> None:
    rows = bench["rows"]
    groups = sorted({(r["model"], r["mode"]) for r in rows})
    levels = sorted({r["concurrency"] for r in rows})
    figure, axes = _figure(len(levels), width=4.5)
    width = 0.8 / len(groups)
    for axis, level in zip(axes[0], levels):
        for n, group in enumerate(groups):
            row = next((r for r in rows if (r["model"], r["mode"]) == group
                        and r["concurrency"] == level), None)
            if row is None:
                continue
            axis.bar(np.arange(3) + n * width, [row["p50_ms"], row["p95_ms"], row["p99_ms"]],
                     width, label=" ".join(group))
        axis.set_xticks(np.arange(3) + width * (len(groups) - 1) / 2, ["p50", "p95", "p99"])
        axis.set_yscale("log")  # retrieval's ~2 ms and the cascade's ~200 ms on one axis
        axis.set_ylabel("ms (log scale)")
        axis.set_title(f"{level} concurrent client{'s' if level > 1 else ''}")
        axis.grid(True, axis="y", alpha=0.3)
        axis.set_ylim(top=axis.get_ylim()[1] * 20)  # headroom above the bars for the legend
        axis.legend(fontsize=7, ncol=2, loc="upper left")
    _save(figure, path)


# --- Output ----------------------------------------------------------------------------------

def _commands(commands) -> str:
    return ", then ".join(f"`{c}`" for c in commands)


def _markdown(run: pathlib.Path, sections: list[Section]) -> str:
    lines = [f"# Cascade report: `{run}`", "",
             f"Written by `cascade report --run {run}` on {time.strftime('%Y-%m-%d %H:%M')}. "
             "Numbers are the run's own; timings are from the machine each benchmark ran on.", ""]
    for section in sections:
        lines += [f"## {section.title}", "", section.body.strip(), ""]
        if section.plot:
            lines += [f"![{section.title}]({section.plot})", ""]
    return "\n".join(lines)


def _html(markdown_text: str) -> str:
    import markdown  # ships with TensorBoard, which TensorFlow installs

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Cascade report</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")
