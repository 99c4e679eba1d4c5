"""Exports a run as SavedModels in the TF Serving model-base-path layout (docs/design.md).

    models/models.config
    models/query_tower/<version>/      user_id [B] -> embedding [B, D]
    models/candidate_tower/<version>/  item_id [B] -> embedding [B, D]
    models/retrieval/<version>/        user_id [B] -> item_ids [B, K], scores [B, K]
    models/reranker/<version>/         user_id [B], item_ids [B, M] -> scores [B, M]
    models/copywriter/<version>/       user_id [B], item_ids [B, N] -> copy [B, N], reasons [B, N, 2]
    models/cascade/<version>/          user_id [B] -> item_ids, titles, scores, retrieval_scores,
                                       copy, each [B, N]: the whole cascade in one Predict call
    models/batching_parameters.txt     TF Serving batching parameters sized for this machine

`reranker`, `copywriter` and `cascade` are written when the run has those stages
(`cascade train reranker|copywriter --run RUN`); the `cascade` SavedModel contains the
retrieval index, the cross-encoder with its in-graph tokenizer and text tables, and the GPT-2
decoder with its detokenizer and grounding check, so it loads with TensorFlow and
tensorflow-text alone (and scann for the ScaNN variant).

Each version is written to a staging directory outside every model's base path and renamed into
place, so TF Serving's file-system poller never sees a half-written version. Each version carries
`assets.extra/tf_serving_warmup_requests` and `assets.extra/cascade_export.json` (what was
exported: index kind, K, run directory).

`export` writes every stage at once; `export_copywriter` writes the copywriter alone (its graph is
`rerank.copy.graph.CopywriterModule`). The `rerank` modules are imported inside the
functions that need them, and none of them imports this module.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import TYPE_CHECKING

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server import config as server_config
from towers import cold_start, data, features, index, peers, runs, saving, sources
from towers import model as towers_model

if TYPE_CHECKING:
    from rerank.copy import graph

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
WARMUP_FILE = "tf_serving_warmup_requests"
RECORD_FILE = "cascade_export.json"
BATCHING_FILE = "batching_parameters.txt"  # for --enable_batching --batching_parameters_file
USER_ID = tf.TensorSpec([None], tf.string, name="user_id")
ITEM_ID = tf.TensorSpec([None], tf.string, name="item_id")
ITEM_IDS = tf.TensorSpec([None, None], tf.string, name="item_ids")
STAGES = ("query_tower", "candidate_tower", "retrieval", "reranker", "copywriter", "cascade")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to change."""


class QueryTowerModule(tf.Module):
    """user_id -> embedding. Every user in the dataset's files goes through the tower (one without
    a training interaction on their features, through the cold ID row); a user the files do not
    hold gets the popularity-based cold-start query."""

    def __init__(self, tower, cold_start_query: np.ndarray):
        super().__init__()
        self.tower = tower
        self.cold_start = tf.constant(cold_start_query[None, :])  # [1, D]

    @tf.function(input_signature=[USER_ID])
    def serve(self, user_id):
        known = self.tower.lookup(user_id) > 0  # row 0: not in the files
        embedding = tf.where(known[:, None], self.tower(user_id), self.cold_start)
        return {"embedding": embedding}


class CandidateTowerModule(tf.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    @tf.function(input_signature=[ITEM_ID])
    def serve(self, item_id):
        return {"embedding": self.tower(item_id)}


class RetrievalModule(tf.Module):
    """user_id -> top-K item IDs and scores, the user's training items excluded: the candidate
    sources of `towers.sources` merged (the two-tower index, item-to-item neighbours of the user's
    history, new items by content), ordered by the two-tower score. `sources` names each
    candidate's source.

    Per-user state is ragged (each user's training item rows, looked up by the query tower's ID
    row), the item-to-item weights are k per item: nothing in the graph is sized users x items or
    items x items. Item rows are int32 so exclusion compares integers; rows are mapped back to the
    dataset's string IDs at the end.
    """

    def __init__(self, query: QueryTowerModule, top_k, tables: features.FeatureTables,
                 candidates: np.ndarray, config: sources.SourceConfig,
                 neighbours: peers.ItemNeighbours | None = None):
        super().__init__()
        if config.item_item and neighbours is None:
            raise ExportError("item-to-item candidates need the item neighbours")
        self.query = query
        self.index = top_k
        self.config = config
        self.k = config.k
        self.item_ids = tf.constant(tables.item_ids)
        self.source_names = tf.constant(sources.SOURCES)
        # Arrays as variables: the SavedModel keeps them in variables/, not in its graph.
        self.candidates = saving.frozen(np.asarray(candidates, np.float32), "candidates")  # [I, D]
        # Row 0 of the query tower's lookup is an unknown user: an empty history.
        self.seen_values = saving.frozen(tables.seen_items, "seen_values")
        self.seen_splits = saving.frozen(
            np.concatenate([[0], tables.seen_splits]).astype(np.int64), "seen_splits")
        self.widest = max(1, int(np.diff(tables.seen_splits).max(initial=0)))
        self.num_items = len(tables.item_ids)
        neighbours = neighbours or peers.ItemNeighbours(
            np.zeros((self.num_items, 0), np.int32), np.zeros((self.num_items, 0), np.float32))
        self.neighbour_index = saving.frozen(neighbours.index, "neighbour_index")
        self.neighbour_weight = saving.frozen(neighbours.weight, "neighbour_weight")
        self.is_new = tf.constant(tables.item_count <= config.new_item_max_count)

    def seen(self, user_id: tf.Tensor) -> tf.RaggedTensor:
        """int32 ragged [B, None]: each user's training item rows (none for an unknown user)."""
        seen = tf.RaggedTensor.from_row_splits(saving.read(self.seen_values),
                                               saving.read(self.seen_splits))
        return tf.gather(seen, self.query.tower.lookup(user_id))

    @tf.function(input_signature=[USER_ID])
    def serve(self, user_id):
        rows, codes, scores = self.merged(user_id)
        return {"item_ids": tf.gather(self.item_ids, rows), "scores": scores,
                "sources": tf.gather(self.source_names, codes)}

    def merged(self, user_id: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(item rows int32 [B, K], source codes int32 [B, K], two-tower scores [B, K]): the
        algorithm of `towers.sources.merged`, step by step. Plain Python: call it inside a
        `tf.function`."""
        config = self.config
        query = self.query.serve(user_id)["embedding"]  # [B, D]
        seen = self.seen(user_id)
        if isinstance(self.index, tfrs.layers.factorized_top_k.BruteForce):
            # Exact search: every score, the seen items set to -inf, top k (ties to the lower
            # row, as the index's own top_k). Cost B x I, where TFRS's exclusions compare each
            # of k + S candidates with each of S seen items (S: the longest history).
            logits = tf.matmul(query, saving.read(self.candidates), transpose_b=True)  # [B, I]
            where = tf.stack([tf.cast(seen.value_rowids(), tf.int32), seen.values], axis=1)
            logits = tf.tensor_scatter_nd_update(
                logits, where, tf.fill([tf.shape(where)[0]], tf.constant(-np.inf, tf.float32)))
            found, ranked = tf.math.top_k(logits, k=config.k)  # T [B, K]
        else:
            # [B, S] for S the longest history: TFRS needs the width when the graph is traced.
            exclusions = seen.to_tensor(default_value=-1, shape=[None, self.widest])
            found, ranked = self.index.query_with_exclusions(query, exclusions, k=config.k)
            ranked = tf.reshape(ranked, [-1, config.k])  # ScaNN's op leaves the shape unknown
        if not (config.item_item or config.new_items):  # the index's own order and scores
            return ranked, tf.zeros_like(ranked), found
        batch = tf.shape(query)[0]
        # taken [B, I]: per request, never stored. Seen items and T's first slots first.
        def mark(mask, rows, valid):
            b = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(rows))
            where = tf.stack([tf.boolean_mask(b, valid), tf.boolean_mask(rows, valid)], axis=1)
            return tf.tensor_scatter_nd_update(mask, where, tf.ones([tf.shape(where)[0]], tf.bool))

        empty = tf.zeros([batch, self.num_items], tf.bool)
        taken = mark(empty, seen.to_tensor(default_value=0), seen.to_tensor(default_value=-1) >= 0)
        head = ranked[:, :config.two_tower]
        taken = mark(taken, head, tf.ones_like(head, tf.bool))
        parts = [(head, tf.ones_like(head, tf.bool), 0)]
        neg_inf = tf.constant(-np.inf, tf.float32)
        if config.item_item:
            ii = tf.round(self.item_item_scores(seen, batch) * sources.RESOLUTION)
            key = tf.where(taken | (ii <= 0), neg_inf, ii)
            parts.append(self._take(key, config.item_item, 1))
            taken = mark(taken, parts[-1][0], parts[-1][1])
        if config.new_items:
            logits = tf.matmul(query, saving.read(self.candidates), transpose_b=True)  # [B, I]
            key = tf.where(taken | ~self.is_new[None, :], neg_inf, logits)
            parts.append(self._take(key, config.new_items, 2))
            taken = mark(taken, parts[-1][0], parts[-1][1])
        rest = ranked[:, config.two_tower:]
        parts.append((rest, ~tf.gather(taken, rest, batch_dims=1), 0))
        rows = tf.concat([p[0] for p in parts], axis=1)
        valid = tf.concat([p[1] for p in parts], axis=1)
        codes = tf.concat([tf.fill(tf.shape(p[0]), p[2]) for p in parts], axis=1)
        # The first K valid slots, in slot order.
        slot = tf.range(tf.shape(rows)[1])[None, :]
        first = tf.math.top_k(tf.where(valid, -slot, -slot - 1_000_000), k=config.k).indices
        rows = tf.gather(rows, first, batch_dims=1)
        codes = tf.gather(codes, first, batch_dims=1)
        scores = tf.einsum("bd,bkd->bk", query, tf.gather(saving.read(self.candidates), rows))
        # By score, then by item row: sort by row, then stably by score.
        by_row = tf.argsort(rows, axis=1, stable=True)
        order = tf.gather(by_row, tf.argsort(tf.gather(scores, by_row, batch_dims=1), axis=1,
                                             direction="DESCENDING", stable=True), batch_dims=1)
        return (tf.gather(rows, order, batch_dims=1), tf.gather(codes, order, batch_dims=1),
                tf.gather(scores, order, batch_dims=1))

    def item_item_scores(self, seen: tf.RaggedTensor, batch: tf.Tensor) -> tf.Tensor:
        """float32 [B, I]: the sum of each history item's neighbour weights per target item."""
        index = tf.gather(saving.read(self.neighbour_index), seen.values)  # [N, k]
        weight = tf.gather(saving.read(self.neighbour_weight), seen.values)
        segment = tf.cast(seen.value_rowids(), tf.int32)[:, None] * self.num_items + index
        flat = tf.math.unsorted_segment_sum(tf.reshape(weight, [-1]), tf.reshape(segment, [-1]),
                                            batch * self.num_items)
        return tf.reshape(flat, [batch, self.num_items])

    @staticmethod
    def _take(key: tf.Tensor, slots: int, code: int):
        best = tf.math.top_k(key, k=slots)
        return best.indices, tf.math.is_finite(best.values), code


class CascadeModule(tf.Module):
    """user_id -> the final N items: retrieval top-K (seen items excluded, cold start for unknown
    users), cross-encoder re-rank of the K, top N by the final score, a line of copy for each.

    `scores` is the re-ranker's final score (cross-encoder logit plus its learned retrieval and
    popularity terms); `retrieval_scores` the retrieval stage's score of the same item; `reasons`
    the liked history items without which the item would rank lower (`rerank.reasons`), the
    titles its copy cites.
    """

    def __init__(self, retrieval: RetrievalModule, reranker, copywriter, titles: dict[str, str],
                 temperature: float, n: int, depth: int | None = None):
        super().__init__()
        self.retrieval, self.reranker, self.copywriter = retrieval, reranker, copywriter
        from rerank import reasons

        self.reasons = reasons.Reasons(
            reranker.reranker, retrieval.query.tower, retrieval.candidates,
            [item.decode() for item in retrieval.item_ids.numpy()], temperature)
        self.n = n
        # Candidates BERT re-scores; 0: none, the scalar terms rank every candidate alone.
        self.depth = min(retrieval.k if depth is None else depth, retrieval.k)
        self.inverse_temperature = tf.constant(1.0 / temperature, tf.float32)
        keys = sorted(titles)
        self.titles = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys), tf.constant([titles[key] for key in keys])), "")

    def _rescored(self, user_id, candidates, retrieval_scores, origin):
        """(candidates, retrieval scores, sources, final scores) of the candidates BERT re-scores:
        the scalar terms' best `depth` in retrieval order (all when depth is k)."""
        if self.depth < self.retrieval.k:  # the scalar terms keep the best `depth` for BERT
            head = self.reranker.reranker.head(user_id, candidates,
                                               retrieval_scores * self.inverse_temperature)
            keep = tf.sort(tf.math.top_k(head, k=self.depth).indices, axis=1)  # retrieval order
            candidates, retrieval_scores, origin = (
                tf.gather(t, keep, batch_dims=1) for t in (candidates, retrieval_scores, origin))
        # The re-ranker was trained on retrieval logits: dot products over the temperature.
        scores = self.reranker.score(user_id, candidates, retrieval_scores * self.inverse_temperature)
        return candidates, retrieval_scores, origin, scores

    @tf.function(input_signature=[USER_ID])
    def serve(self, user_id):
        found = self.retrieval.serve(user_id)
        candidates, retrieval_scores = found["item_ids"], found["scores"]  # [B, K]
        origin = found["sources"]
        if self.depth == 0:  # no BERT in the graph: the scalar terms' order is served
            scores = self.reranker.reranker.head(user_id, candidates,
                                                 retrieval_scores * self.inverse_temperature)
        else:
            candidates, retrieval_scores, origin, scores = self._rescored(
                user_id, candidates, retrieval_scores, origin)
        best = tf.math.top_k(scores, k=self.n)  # ties keep the retrieval order
        item_ids = tf.gather(candidates, best.indices, batch_dims=1)
        # The liked history items without which each served item would rank lower.
        reasons = self.reasons(user_id, candidates, retrieval_scores * self.inverse_temperature,
                               scores, best.indices)
        copy = self.copywriter.write(user_id, item_ids, reasons)
        return {"item_ids": item_ids, "titles": self.titles.lookup(item_ids),
                "scores": best.values,
                "retrieval_scores": tf.gather(retrieval_scores, best.indices, batch_dims=1),
                "sources": tf.gather(origin, best.indices, batch_dims=1),
                "copy": copy["copy"], "reasons": copy["reasons"]}


def export(run_dir: str | os.PathLike, model_base_path: str | os.PathLike,
           version: int | None = None, index_kind: str = "bruteforce", k: int = 100,
           scann: index.ScannConfig | None = None, n: int = 10,
           models: tuple[str, ...] | None = None, item_item: int | None = None,
           new_items: int | None = None, new_item_max_count: int | None = None,
           bert_depth: int | None = None) -> dict[str, pathlib.Path]:
    """Writes one version of every model the run can make (or of `models`); returns their paths.

    query_tower, candidate_tower and retrieval always; reranker when the run has a trained
    re-ranker, copywriter when it has a copywriter, cascade when it has both. `k` is the
    two-tower's slots in retrieval's list and the candidates BERT re-scores in the cascade;
    `item_item`, `new_items` and `new_item_max_count` the other sources' (`towers.sources`;
    default: what the run's re-ranker was trained with, else none), so `retrieval` returns
    k + item_item + new_items items, of which the cascade's scalar terms keep k, and BERT
    re-scores their best `bert_depth` (default: the run's `serve_depth`, chosen on validation
    rows by `rerank.cross_encoder.record_depth`, else k; 0: no BERT in the cascade's graph, the
    scalar terms rank the candidates alone); `n` is the cascade's final list.
    """
    base = pathlib.Path(model_base_path).resolve()
    run = pathlib.Path(run_dir)
    available = _available_stages(run)
    wanted = tuple(models) if models else available
    missing = [name for name in wanted if name not in available]
    if missing:
        raise ExportError(f"{run}: cannot export {', '.join(missing)}: " + "; ".join(
            _HOW_TO_MAKE[name].format(run=run) for name in missing))
    trained = _reranker_record(run)
    requested = bert_depth if bert_depth is not None else trained.get("serve_depth")
    depth = k if requested is None else min(k, requested)
    if depth < 0:
        raise ExportError(f"--bert-depth {bert_depth}: the candidates BERT re-scores must be 0 "
                          "(no BERT) or more")
    if "cascade" in wanted and not 1 <= n <= (depth or k):
        raise ExportError(f"n={n}: the cascade's final list must hold 1 to {depth or k} items, "
                          f"the candidates {'BERT re-scores' if depth else 'the scalar terms rank'}"
                          f" (k={k}; --bert-depth {requested})")
    retrieval, tables = runs.load_run(run_dir)
    candidates = towers_model.candidate_embeddings(retrieval, tables)
    slots = sources.SourceConfig(
        k, trained.get("item_item_candidates", 0) if item_item is None else item_item,
        trained.get("new_item_candidates", 0) if new_items is None else new_items,
        trained.get("new_item_max_count", 0) if new_item_max_count is None else new_item_max_count)
    widest = max(1, int(np.diff(tables.seen_splits).max(initial=0)))
    if slots.k + widest > len(tables.item_ids):
        raise ExportError(f"{slots.k} candidates (k={k} + {slots.item_item} item-to-item + "
                          f"{slots.new_items} new) plus the longest training history ({widest} "
                          f"items) exceed the catalog ({len(tables.item_ids)} items); choose a "
                          "smaller --k")
    query = QueryTowerModule(retrieval.query_tower,
                             cold_start.popularity_query(candidates, tables.item_count))
    rows = np.arange(len(tables.item_ids), dtype=np.int32)
    if index_kind == "scann" and scann is None:
        scann = benchmarked_scann_config(run_dir)
    top_k = index.build_index(index_kind, rows, candidates, k=slots.k + widest, scann=scann)
    neighbours = None
    if slots.item_item:
        neighbours = peers.ease_neighbours(
            tables.seen_matrix(), trained.get("ease_l2", 500.0), trained.get("ease_neighbours", 200),
            trained.get("ease_max_items", peers.EASE_MAX_ITEMS))
    retrieval_module = RetrievalModule(query, top_k, tables, candidates, slots, neighbours)
    users = [*tables.user_ids[:2], "unknown-user"]
    candidates_in = [list(tables.item_ids[:n])] * len(users)
    modules = {  # name: (module, warmup inputs)
        "query_tower": (query, {"user_id": users}),
        "candidate_tower": (CandidateTowerModule(retrieval.candidate_tower),
                            {"item_id": list(tables.item_ids[:3])}),
        "retrieval": (retrieval_module, {"user_id": users}),
    }
    if {"reranker", "cascade"} & set(wanted):
        from rerank import reranker_graph

        # One query tower, one set of tables: the cascade's graph holds each once.
        reranker = reranker_graph.RerankerModule.from_run(run, loaded=(retrieval, tables, candidates))
        modules["reranker"] = (reranker, {"user_id": users, "item_ids": candidates_in})
    if {"copywriter", "cascade"} & set(wanted):
        from rerank.copy import graph

        source = runs.data_config(run)
        dataset = data.load(source.data_dir, source.card)
        # The re-ranker's tables name the reasons (`graph.reason_tables` reads the same file):
        # shared, the data and the tables are read once and the cascade's graph holds them once.
        copywriter = (graph.CopywriterModule.from_run(run, dataset=dataset,
                                                      reasons=reranker.reranker.texts)
                      if "reranker" in modules else graph.CopywriterModule.from_run(run))
        modules["copywriter"] = (copywriter, {"user_id": users, "item_ids": candidates_in})
    if "cascade" in wanted:
        titles = dict(zip(tables.item_ids, dataset.labels(tables.item_ids)))
        modules["cascade"] = (CascadeModule(retrieval_module, reranker, copywriter, titles,
                                            retrieval.config.temperature, n, depth=depth),
                              {"user_id": users})
    modules = {name: modules[name] for name in STAGES if name in wanted}
    version = version or next_version(base, modules)
    if {"copywriter", "cascade"} & set(wanted):
        copywriter.salt.assign(version)  # the same lines from `copywriter` and `cascade`
    record = {"run_dir": str(run.resolve()), "version": version,
              "index": index_kind, "k": slots.k, "n": n, "bert_depth": depth, "embedding_dim": int(candidates.shape[1]),
              "sources": dataclasses.asdict(slots),
              "num_items": len(tables.item_ids), "num_users": len(tables.user_ids),
              "scann": (dataclasses.asdict((scann or index.ScannConfig()).for_catalog(len(rows)))
                        if index_kind == "scann" else None),
              "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    paths = {}
    for name, (module, inputs) in modules.items():
        with_index = name in ("retrieval", "cascade")
        options = index.save_options(index_kind if with_index else "bruteforce")
        paths[name] = save_version(module, base / name, version, options,
                                   warmup_request(name, inputs),
                                   {**record, "model": name})
    write_models_config(base, list(modules))
    batching = base / BATCHING_FILE
    if not batching.exists():  # a hand-tuned file is kept
        server_config.write_batching_parameters(batching)
    return paths


def export_copywriter(run_dir: str | os.PathLike, model_base_path: str | os.PathLike,
                      version: int | None = None,
                      module: graph.CopywriterModule | None = None) -> pathlib.Path:
    """Writes `<model_base_path>/copywriter/<version>/` (staging directory, then one rename) with
    its warmup request, and lists it in `models.config`; returns the version directory.
    `module`: one already built from `run_dir`, to save building it again (its salt is set to
    the version)."""
    from rerank.copy import graph

    name = graph.MODEL_NAME
    base = pathlib.Path(model_base_path).resolve()
    module = module or graph.CopywriterModule.from_run(run_dir)
    version = version or next_version(base, [name])
    module.salt.assign(version)  # each version samples its own lines
    users = [user for user in ("1", "2") if module.reasons.user_row.lookup(tf.constant(user)) >= 0]
    items = list(module.item_ids[:3])  # the catalog's first three, in ID order
    warmup = warmup_request(name, "user_id", [*users, "unknown-user"])
    warmup.predict_log.request.inputs["item_ids"].CopyFrom(
        tf.make_tensor_proto(np.array([items] * (len(users) + 1), dtype=object)))
    record = {"run_dir": str(pathlib.Path(run_dir).resolve()), "version": version,
              "model": name, "decoding": {
                  k: getattr(module.decoder.config, k) for k in (
                      "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")},
              "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = save_version(module, base / name, version, tf.saved_model.SaveOptions(), warmup, record)
    write_models_config(base, [name])
    return path


_HOW_TO_MAKE = {
    "reranker": "train the re-ranker first: `cascade train reranker --run {run}`",
    "copywriter": "train the copywriter first: `cascade train copywriter --run {run}`",
    "cascade": "the cascade needs both `cascade train reranker --run {run}` and "
               "`cascade train copywriter --run {run}`",
}


def _reranker_record(run: pathlib.Path) -> dict:
    """The run's reranker_config.json ({} without a trained re-ranker)."""
    path = run / "reranker" / "reranker_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _available_stages(run: pathlib.Path) -> tuple[str, ...]:
    """The models a run can be exported as, in docs/design.md order."""
    if not (run / runs.CONFIG_FILE).exists():
        raise ExportError(f"{run / runs.CONFIG_FILE}: not found; is {run} a retrieval run "
                          "(`cascade train retrieval --run DIR`)?")
    names = ["query_tower", "candidate_tower", "retrieval"]
    if (run / "reranker" / "reranker_config.json").exists():
        names.append("reranker")
    if (run / "copywriter" / "config.json").exists():
        names.append("copywriter")
    if {"reranker", "copywriter"} <= set(names):
        names.append("cascade")
    return tuple(names)


def benchmarked_scann_config(run_dir: str | os.PathLike) -> index.ScannConfig | None:
    """The ScaNN config `cascade bench retrieval-index` chose for this run's catalog, if it ran."""
    path = pathlib.Path(run_dir) / "bench" / "retrieval_index.json"
    if not path.exists():
        log.warning("%s not found: ScaNN uses default parameters; run `cascade bench "
                    "retrieval-index --run %s` to choose them by measurement", path, run_dir)
        return None
    return index.ScannConfig(**json.loads(path.read_text())["scann_config"])


def next_version(base: pathlib.Path, names) -> int:
    """One more than the highest version any of `names` has under `base` (1 for a new base)."""
    versions = [int(p.name) for name in names if (base / name).is_dir()
                for p in (base / name).iterdir() if p.name.isdigit()]
    return max(versions, default=0) + 1


def save_version(module: tf.Module, model_dir: pathlib.Path, version: int,
                 options: tf.saved_model.SaveOptions, warmup: prediction_log_pb2.PredictionLog,
                 record: dict) -> pathlib.Path:
    """Saves `module` as `model_dir/<version>` through a staging directory and one rename."""
    target = model_dir / str(version)
    if target.exists():
        raise ExportError(f"{target} already exists; TF Serving may be serving it. Export a new "
                          "version (leave out --version) instead of overwriting one")
    staging_root = model_dir.parent / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f"{model_dir.name}-{version}-", dir=staging_root))
    try:
        signatures = {SIGNATURE: module.serve}
        if hasattr(module, "other_signatures"):
            signatures.update(module.other_signatures())
        saving.save(module, staging, signatures, options)
        extra = staging / "assets.extra"
        extra.mkdir()
        with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
            writer.write(warmup.SerializeToString())
        (extra / RECORD_FILE).write_text(json.dumps(record, indent=2))
        model_dir.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s", target)
    return target


def warmup_request(model: str, inputs: dict[str, list] | str,
                   values: list | None = None) -> prediction_log_pb2.PredictionLog:
    """One Predict request that TF Serving replays while loading the version: `inputs` maps input
    names to values (or is one input's name, with its `values`)."""
    if values is not None:
        inputs = {inputs: values}
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=SIGNATURE))
    for name, values in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(np.array(values, dtype=object)))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def write_models_config(base: pathlib.Path, names: list[str]) -> pathlib.Path:
    """Adds or updates `names` in `base/models.config`, keeping the other models listed there."""
    path = base / "models.config"
    config = model_server_config_pb2.ModelServerConfig()
    if path.exists():
        text_format.Parse(path.read_text(), config)
    entries = {entry.name: entry for entry in config.model_config_list.config}
    for name in names:
        entry = entries.get(name) or config.model_config_list.config.add()
        entry.name, entry.base_path, entry.model_platform = name, str(base / name), "tensorflow"
    staging = path.with_name(".models.config.tmp")
    staging.write_text(text_format.MessageToString(config))
    os.replace(staging, path)
    return path
