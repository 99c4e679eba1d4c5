"""Evaluation of the GPT-2 copywriter (stage three): grounding, diversity, perplexity, latency.

`evaluate_copywriter` writes copy for (user, item) pairs of a run's test split with the served
graph (`graph.CopywriterModule`), checks every line again in Python, times the graph
saved as a plain SavedModel, and records the result in the run's `metrics.json`;
`format_report` renders it as Markdown (`cascade evaluate copywriter`, `cascade report`).

The model, training and decoding are `rerank.copy.copywriter`; the served graph is
`rerank.copy.graph`; the versioned TF Serving export is `serving.export.export_copywriter`.
This module imports the first two and nothing from `serving`.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank.copy import claims, copywriter, evaluation, graph, grounding, templates
from towers import data
from towers import runs, saving


def evaluate_copywriter(run_dir: str | os.PathLike, pairs: int = 1000, examples: int = 20,
                        timing_calls: int = 20, necessity_pairs: int | None = None) -> dict:
    """Copy for `pairs` (user, item) pairs of the run's test split, written by the served
    graph, checked again in Python: grounding before and after the check, hallucinated titles,
    distinct-1/2, held-out perplexity, and latency of the graph saved as a SavedModel (the
    served signature) for one line and for one user's 10 items; the claims of the generated lines
    that do not hold, by type, from the independent scan (`claims.find_claims`), and malformed
    lines (no frame); the share of served lines that are the fallback; and, when the run has a
    re-ranker, the probability of necessity of the cited reasons (`rerank.faithfulness`, on
    `necessity_pairs`, default `pairs`; 0 leaves it out). Records the result in `metrics.json` and returns it."""
    run = pathlib.Path(run_dir)
    loaded = copywriter.load_run(run)
    record, model, tokenizer, dataset, split = loaded
    module = graph.CopywriterModule.from_run(run, loaded)
    chosen = evaluation.benchmark_pairs(split.test, pairs)
    out = _details(module, chosen)
    rows = [{key: value[n] for key, value in out.items()} for n in range(len(chosen))]
    items = templates.catalog(dataset)
    matcher = grounding.TitleMatcher(items)
    vocabulary = claims.claim_vocabulary(items.values())
    lines = []
    for (user, item), row in zip(chosen, rows):
        liked = tuple(r.decode() for r in row["candidate_reasons"] if r)  # the prompt's titles
        cited = tuple(r.decode() for r in row["reasons"] if r)
        generated, served = row["generated"].decode(), row["copy"].decode()
        present, foreign = matcher.check(generated, item, liked)
        facts = grounding.spoken(items[item], matcher)
        wrong = claims.find_claims(generated, facts, [items[i] for i in liked], vocabulary)
        served_wrong = claims.find_claims(served, facts, [items[i] for i in cited], vocabulary)
        lines.append({"user_id": user, "item_id": item, "liked": liked, "reasons": cited,
                      "generated": generated, "copy": served, "present": present,
                      "foreign": foreign, "finished": bool(row["finished"]),
                      "slots_ok": bool(row["slots_ok"]),
                      "malformed": not claims.check_template(row["skeleton"].decode(), facts)[0],
                      **{f"wrong_{kind}": bool(found) for kind, found in wrong.items()},
                      "served_claim_error": any(served_wrong.values()),
                      "attempt": int(row["attempt"]),
                      "fallback": int(row["attempt"]) < 0,
                      "resampled": int(row["attempt"]) > 0,
                      "graph_agrees": (present, bool(foreign)) == (
                          bool(row["title_present"]), bool(row["other_title"])),
                      "served_grounded": matcher.check(served, item, cited) == (True, [])})

    def rate(key):
        return round(float(np.mean([bool(line[key]) for line in lines])), 4)
    heldout = [templates.CopyExample(**{**e, "liked": tuple(e["liked"])}) for e in map(
        json.loads, (run / copywriter.SUBDIR / copywriter.HELDOUT_FILE).read_text().splitlines())]
    tables = copywriter.PromptTables.build(tokenizer, items)
    # A liked-title slot the prompt lacks names a title the prompt does not hold (it would be
    # served as a hole): counted as a hallucinated title, as a catalog title outside the prompt is.
    for line in lines:
        line["hallucinated"] = bool(line["foreign"]) or not line["slots_ok"]
        line["grounded"] = line["present"] and not line["hallucinated"]
    result = {
        "pairs": len(lines),
        "grounded_before_check": rate("grounded"),
        "title_present": rate("present"),
        "hallucinated_title": rate("hallucinated"),
        "other_catalog_title": rate("foreign"),
        "finished": rate("finished"),
        "slots_ok": rate("slots_ok"),
        "served_generated": round(float(np.mean(
            [line["copy"] == line["generated"] for line in lines])), 4),
        "served_resampled": rate("resampled"),
        "grounded_after_check": rate("served_grounded"),
        "malformed_before_check": rate("malformed"),
        "wrong_year_before_check": rate("wrong_year"),
        "wrong_era_before_check": rate("wrong_era"),
        "wrong_category_before_check": rate("wrong_category"),
        "served_claim_errors": rate("served_claim_error"),
        "fallback_share": rate("fallback"),
        "graph_check_agrees_with_python": rate("graph_agrees"),
        "distinct_1": round(evaluation.distinct_n([line["generated"] for line in lines], 1), 4),
        "distinct_2": round(evaluation.distinct_n([line["generated"] for line in lines], 2), 4),
        "served_distinct_2": round(evaluation.distinct_n([line["copy"] for line in lines], 2), 4),
        "heldout_perplexity": round(copywriter.perplexity(
            model, copywriter.encode_corpus(tokenizer, tables, heldout),
            tokenizer.eos_token_id), 3),
    }
    with tempfile.TemporaryDirectory() as saved:
        # The signature `serving.export.export_copywriter` writes, without the serving layout
        # (versions, warmup, models.config): the same graph, so the same latency.
        saving.save(module, saved, {"serving_default": module.serve})
        result["latency_ms"] = _latency(saved, split.test, timing_calls)
    result["examples"] = [{key: line[key] for key in ("user_id", "item_id", "liked", "reasons",
                                                      "generated", "copy", "attempt")}
                          for line in lines[:examples]]
    if (run / "reranker").is_dir() and necessity_pairs != 0:
        from rerank import faithfulness

        served = []
        result["reasons_necessity"] = faithfulness.necessity(run, necessity_pairs or pairs,
                                                             served_out=served)
        result["cascade_lines"] = _cascade_lines(module, served, items, matcher, vocabulary)
    runs.update_metrics(run, {"evaluation": result}, copywriter.SUBDIR)
    return result


def _latency(saved_model: str, test: data.Interactions, calls: int) -> dict:
    """Median ms of the exported signature: one line per call, and one user's 10 items per call
    (fewer when no test user has 10: `lines_per_user`)."""
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    by_user: dict[str, list[str]] = {}
    for user, item in zip(test.user_id.tolist(), test.item_id.tolist()):
        by_user.setdefault(user, []).append(item)
    width = min(10, max(map(len, by_user.values())))
    users = [user for user, items in sorted(by_user.items()) if len(items) >= width][:calls]

    def median_ms(requests) -> float:
        serve(**requests[0])  # warm up
        times = []
        for request in requests:
            started = time.perf_counter()
            serve(**request)["copy"].numpy()
            times.append((time.perf_counter() - started) * 1000)
        return round(float(np.median(times)), 1)
    single = median_ms([{"user_id": tf.constant([u]), "item_ids": tf.constant([by_user[u][:1]])}
                        for u in users])
    batched = median_ms([{"user_id": tf.constant([u]),
                          "item_ids": tf.constant([by_user[u][:width]])} for u in users])
    result = {"single_line": single, "ten_lines_one_user": batched,
              "per_line_batched": round(batched / width, 1), "calls": len(users)}
    return result if width == 10 else {**result, "lines_per_user": width}


def format_report(result: dict) -> str:
    """The evaluation as a Markdown table and the example lines, for the CLI to print."""
    keys = ("pairs", "grounded_before_check", "title_present", "hallucinated_title",
            "other_catalog_title", "slots_ok", "finished", "served_generated",
            "served_resampled", "grounded_after_check", "malformed_before_check", "wrong_year_before_check",
            "wrong_era_before_check", "wrong_category_before_check", "served_claim_errors",
            "fallback_share", "graph_check_agrees_with_python", "distinct_1", "distinct_2",
            "served_distinct_2", "heldout_perplexity")
    lines = ["| metric | value |", "|---|---|"] + [f"| {key} | {result[key]} |" for key in keys
                                                  if key in result]  # older records lack some
    lines += [f"| latency ms ({name}) | {value} |"
              for name, value in result.get("latency_ms", {}).items()]
    necessity = result.get("reasons_necessity")
    if necessity:
        lines.append(f"| reasons: probability of necessity ({necessity['pairs']} pairs) | "
                     f"{necessity['reason']['pn']} |")
        for kind in ("item-item share", "random liked", "item-item share, all served"):
            if kind in necessity:
                lines.append(f"| {kind} as the reason: probability of necessity | "
                             f"{necessity[kind]['pn']} |")
        lines.append(f"| served items with a reason | {necessity['coverage']} |")
        if "ms_per_user" in necessity:
            lines.append(f"| ms to find one user's reasons (median) | {necessity['ms_per_user']} |")
    for key, value in result.get("cascade_lines", {}).items():
        if isinstance(value, dict):  # the ablation
            lines += [f"| cascade's served items, {key}: {k} | {v} |" for k, v in value.items()]
        else:
            lines.append(f"| cascade's served lines: {key} | {value} |")
    lines.append("")
    for example in result.get("examples", []):
        reasons = ", ".join(example.get("reasons", ())) or "none"
        lines.append(f"- user {example['user_id']}, item {example['item_id']} (reasons: {reasons}): "
                     f"{example['copy']}" + ("" if example.get("attempt", 0) == 0 else
                                             f"  ({'fallback' if example['attempt'] < 0 else 'sample ' + str(example['attempt'] + 1)}; "
                                             f"first sample, rejected: {example['generated']})"))
    return "\n".join(lines)


DECODING_GRID = ((1.0, 40, 2), (1.3, 80, 3), (1.4, 80, 4), (1.45, 80, 4))


def sweep_decoding(run_dir: str | os.PathLike, grid=DECODING_GRID, pairs: int = 1000,
                   seed: int = 1) -> list[dict]:
    """Each (temperature, top_k, attempts) of `grid` on `pairs` (user, item) pairs of the
    training split, never the test split (the defaults are chosen here): the share of lines
    whose first sample passes every check, the share served as the fallback, and distinct-2 of
    the first samples and of the served lines."""
    record, model, tokenizer, dataset, split = copywriter.load_run(run_dir)
    chosen = benchmark_pairs(split.train, pairs, seed)
    rows = []
    for temperature, top_k, attempts in grid:
        settings = {**record, "temperature": temperature, "top_k": top_k, "attempts": attempts}
        module = graph.CopywriterModule.from_run(
            run_dir, (settings, model, tokenizer, dataset, split))
        out = _details(module, chosen)
        first, served = ([line.decode() for line in out[key]] for key in ("generated", "copy"))
        attempt = out["attempt"]
        rows.append({"temperature": temperature, "top_k": top_k, "attempts": attempts,
                     "first_sample_passes": round(float(np.mean(attempt == 0)), 4),
                     "fallback_share": round(float(np.mean(attempt < 0)), 4),
                     "distinct_2_first_sample": round(distinct_n(first, 2), 4),
                     "served_distinct_2": round(distinct_n(served, 2), 4)})
    return rows


def _details(module: graph.CopywriterModule, chosen: list[tuple[str, str]],
             batch: int = 50) -> dict[str, np.ndarray]:
    """`module.details` of each (user, item) pair, one line per user row, in batches: each
    output as an array over the pairs."""
    parts = []
    for start in range(0, len(chosen), batch):
        pairs = chosen[start:start + batch]
        out = module.details(tf.constant([u for u, _ in pairs]), tf.constant([[i] for _, i in pairs]))
        parts.append({key: value.numpy()[:, 0] for key, value in out.items()})
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _cascade_lines(module: graph.CopywriterModule, served: list, items: dict, matcher,
                   vocabulary) -> dict:
    """The lines the `cascade` serves: each user's served items written with the reasons its
    ranking found (`served`: (user, item IDs [N], reasons [N, 2]) per user), checked again in
    Python: claims that do not hold (independent scan), titles outside the cited reasons, the
    fallback's share, the share that cites a liked title, distinct-2; and, as the ablation, the
    same items written with the copywriter's own reasons (the item-item share)."""
    write = tf.function(module.write, input_signature=[graph.USER_ID, graph.ITEM_IDS, graph.REASONS])
    result = _served_lines(write, served, items, matcher, vocabulary)
    # Ablation: the same items written with the copywriter's own reasons (the item-item share).
    own = [(user, row_items, module.reasons.reasons(
        tf.constant([user] * len(row_items)), tf.constant(row_items), templates.MAX_LIKED
    ).numpy().astype(str)) for user, row_items, _ in served]
    ablation = _served_lines(write, own, items, matcher, vocabulary)
    result["with_item_item_share_reasons"] = {key: ablation[key] for key in (
        "cites_a_liked_title", "fallback_share", "distinct_2")}
    return result


def _served_lines(write, served: list, items: dict, matcher, vocabulary) -> dict:
    lines = []
    for start in range(0, len(served), 25):
        chunk = served[start:start + 25]
        out = write(tf.constant([user for user, _, _ in chunk]),
                    tf.constant(np.stack([i for _, i, _ in chunk])),
                    tf.constant(np.stack([r for _, _, r in chunk])))
        copy, cited, attempt = (out[key].numpy() for key in ("copy", "reasons", "attempt"))
        for b, (_, row_items, _) in enumerate(chunk):
            for n, item in enumerate(row_items):
                line = copy[b, n].decode()
                named = [r.decode() for r in cited[b, n] if r]
                facts = grounding.spoken(items[item], matcher)
                wrong = claims.find_claims(line, facts, [items[i] for i in named], vocabulary)
                lines.append({"copy": line, "cites": bool(named), "fallback": attempt[b, n] < 0,
                              "claim_error": any(wrong.values()),
                              "grounded": matcher.check(line, item, named) == (True, [])})
    rate = lambda key: round(float(np.mean([bool(line[key]) for line in lines])), 4)
    return {"lines": len(lines), "cites_a_liked_title": rate("cites"),
            "fallback_share": rate("fallback"), "claim_errors": rate("claim_error"),
            "grounded": rate("grounded"),
            "distinct_2": round(evaluation.distinct_n([line["copy"] for line in lines], 2), 4)}


def format_sweep(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
                     + ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows])


def distinct_n(lines: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all n-grams of `lines` (whitespace words)."""
    grams = [tuple(words[i:i + n]) for words in (line.split() for line in lines)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def benchmark_pairs(test: data.Interactions, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` distinct (user, item) pairs of the test split, chosen with a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(test))
    pairs, seen = [], set()
    for row in order:
        pair = (str(test.user_id[row]), str(test.item_id[row]))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
        if len(pairs) == count:
            break
    return pairs
