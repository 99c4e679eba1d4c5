"""Exports a run as SavedModels in the TF Serving model-base-path layout (DESIGN.md).

    models/models.config
    models/query_tower/<version>/      user_id [B] -> embedding [B, D]
    models/candidate_tower/<version>/  item_id [B] -> embedding [B, D]
    models/retrieval/<version>/        user_id [B] -> item_ids [B, K], scores [B, K]
    models/batching_parameters.txt     TF Serving batching parameters sized for this machine

Each version is written to a staging directory outside every model's base path and renamed into
place, so TF Serving's file-system poller never sees a half-written version. Each version carries
`assets.extra/tf_serving_warmup_requests` and `assets.extra/cascade_export.json` (what was
exported: index kind, K, run directory).
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

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import server_config
from towers import cold_start, features, index, train

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
WARMUP_FILE = "tf_serving_warmup_requests"
RECORD_FILE = "cascade_export.json"
BATCHING_FILE = "batching_parameters.txt"  # for --enable_batching --batching_parameters_file
USER_ID = tf.TensorSpec([None], tf.string, name="user_id")
ITEM_ID = tf.TensorSpec([None], tf.string, name="item_id")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to change."""


class QueryTowerModule(tf.Module):
    """user_id -> embedding; unknown users get the popularity-based cold-start query."""

    def __init__(self, tower, cold_start_query: np.ndarray):
        super().__init__()
        self.tower = tower
        self.cold_start = tf.constant(cold_start_query[None, :])  # [1, D]

    @tf.function(input_signature=[USER_ID])
    def serve(self, user_id):
        known = self.tower.lookup(user_id) > 0  # row 0 is out of vocabulary
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
    """user_id -> top-K item IDs and scores over the index, the user's training items excluded.

    The index is keyed by item row (int32) so exclusion compares integers, and rows are mapped
    back to the dataset's string IDs at the end.
    """

    def __init__(self, query: QueryTowerModule, top_k, tables: features.FeatureTables, k: int):
        super().__init__()
        self.query = query
        self.index = top_k
        self.k = k
        self.item_ids = tf.constant(tables.item_ids)
        row = {item: r for r, item in enumerate(tables.item_ids)}
        seen = np.array([[row.get(i, -1) for i in ids] for ids in tables.seen], np.int32)
        self.seen = tf.constant(np.concatenate([np.full((1, seen.shape[1]), -1, np.int32), seen]))

    @tf.function(input_signature=[USER_ID])
    def serve(self, user_id):
        query = self.query.serve(user_id)["embedding"]
        exclusions = tf.gather(self.seen, self.query.tower.lookup(user_id))  # [B, S], -1 pads
        scores, rows = self.index.query_with_exclusions(query, exclusions, k=self.k)
        return {"item_ids": tf.gather(self.item_ids, rows), "scores": scores}


def export(run_dir: str | os.PathLike, model_base_path: str | os.PathLike,
           version: int | None = None, index_kind: str = "bruteforce", k: int = 100,
           scann: index.ScannConfig | None = None) -> dict[str, pathlib.Path]:
    """Writes query_tower, candidate_tower and retrieval for one version; returns their paths."""
    base = pathlib.Path(model_base_path).resolve()
    retrieval, tables = train.load_run(run_dir)
    queries, candidates = train.embeddings(retrieval, tables)
    widest = tables.seen.shape[1]
    if k + widest > len(tables.item_ids):
        raise ExportError(f"k={k} plus the longest training history ({widest} items) exceeds the "
                          f"catalog ({len(tables.item_ids)} items); choose a smaller --k")
    query = QueryTowerModule(retrieval.query_tower,
                             cold_start.popularity_query(candidates, tables.item_count))
    rows = np.arange(len(tables.item_ids), dtype=np.int32)
    if index_kind == "scann" and scann is None:
        scann = benchmarked_scann_config(run_dir)
    top_k = index.build_index(index_kind, rows, candidates, k=k + widest, scann=scann)
    modules = {
        "query_tower": (query, "user_id"),
        "candidate_tower": (CandidateTowerModule(retrieval.candidate_tower), "item_id"),
        "retrieval": (RetrievalModule(query, top_k, tables, k), "user_id"),
    }
    version = version or next_version(base, modules)
    record = {"run_dir": str(pathlib.Path(run_dir).resolve()), "version": version,
              "index": index_kind, "k": k, "embedding_dim": int(candidates.shape[1]),
              "num_items": len(tables.item_ids), "num_users": len(tables.user_ids),
              "scann": (dataclasses.asdict((scann or index.ScannConfig()).for_catalog(len(rows)))
                        if index_kind == "scann" else None),
              "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    warmup_ids = {"user_id": [*tables.user_ids[:2], "unknown-user"], "item_id": list(tables.item_ids[:3])}
    paths = {}
    for name, (module, input_name) in modules.items():
        options = index.save_options(index_kind if name == "retrieval" else "bruteforce")
        paths[name] = save_version(module, base / name, version, options,
                                   warmup_request(name, input_name, warmup_ids[input_name]),
                                   {**record, "model": name})
    write_models_config(base, list(modules))
    batching = base / BATCHING_FILE
    if not batching.exists():  # a hand-tuned file is kept
        server_config.write_batching_parameters(batching)
    return paths


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
        tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve}, options=options)
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


def warmup_request(model: str, input_name: str, values: list[str]) -> prediction_log_pb2.PredictionLog:
    """One Predict request that TF Serving replays while loading the version."""
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=SIGNATURE))
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(np.array(values, dtype=object)))
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
