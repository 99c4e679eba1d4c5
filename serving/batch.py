"""`cascade batch`: batch candidate generation for every user, as an Apache Beam pipeline.

    users ──► RunInference(SavedModel signature) ──► records ──► Parquet | TFRecord
                          └─► failed users (dead letter) ──► failed.jsonl     └─► sample.jsonl

The model handler loads the exported SavedModel once per worker (RunInference shares it) and calls
its `serving_default` signature on batches of user IDs; every output of the signature becomes a
field of the record. The same code runs on the DirectRunner (`--direct_running_mode
multi_processing --direct_num_workers N` for local parallelism) and on Dataflow, Flink or Spark
(`--runner ...`, see the README). Output goes to a staging folder beside `--out` and replaces
`--out` whole only when the pipeline succeeded (local file systems).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base as inference
from apache_beam.options.pipeline_options import PipelineOptions

from towers import files

log = logging.getLogger(__name__)

NAMESPACE = "cascade"
SAMPLE_SIZE = 100


class SignatureModelHandler(inference.ModelHandler):
    """Beam model handler for a TF Serving SavedModel: string IDs in, a dict of arrays out.

    A batch that fails is retried one user at a time, so one bad user costs only itself: its
    result carries the error and goes to the dead letter.
    """

    def __init__(self, model_dir: str, input_name: str = "user_id", max_batch_size: int = 256):
        self._model_dir = model_dir
        self._input_name = input_name
        self._max_batch_size = max_batch_size

    def load_model(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  registers the tokenizer ops the exports use

        record = pathlib.Path(self._model_dir) / "assets.extra" / "cascade_export.json"
        if record.exists() and json.loads(record.read_text()).get("index") == "scann":
            import scann  # noqa: F401  registers the ScaNN ops
        return tf.saved_model.load(self._model_dir).signatures["serving_default"]

    def run_inference(self, batch: Sequence[str], model, inference_args=None) -> Iterable:
        try:
            outputs = self._call(model, list(batch))
        except Exception as error:  # noqa: BLE001 - retried per user, failures go to the dead letter
            if len(batch) == 1:
                return [inference.PredictionResult(batch[0], {"error": _message(error)})]
            return [result for user in batch for result in self.run_inference([user], model)]
        return [inference.PredictionResult(user, {name: values[row] for name, values in outputs.items()})
                for row, user in enumerate(batch)]

    def _call(self, model, users: list[str]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        outputs = model(**{self._input_name: tf.constant(users)})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def batch_elements_kwargs(self):
        # Small batches waste the model's vectorized search; Beam adapts within these bounds.
        return {"min_batch_size": min(64, self._max_batch_size), "max_batch_size": self._max_batch_size}


class ToRecord(beam.DoFn):
    """PredictionResult -> a plain record; errors to the `failed` output."""

    FAILED = "failed"

    def __init__(self):
        self.written = beam.metrics.Metrics.counter(NAMESPACE, "users_written")
        self.failed = beam.metrics.Metrics.counter(NAMESPACE, "users_failed")

    def process(self, result):
        if "error" in result.inference:
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(self.FAILED, {"user_id": result.example,
                                                         "error": result.inference["error"]})
            return
        self.written.inc()
        record = {"user_id": result.example}
        for name, value in result.inference.items():
            record[name] = _plain(value)
        yield record


def read_users(source: str, export_record: dict) -> list[str]:
    """`all` (every user the export knows), `synthetic:N`, or a file with one user ID per line."""
    if source == "all":
        return _known_users(export_record)
    if source.startswith("synthetic:"):
        known = _known_users(export_record) if "run_dir" in export_record else []
        return synthetic_users(int(source.split(":", 1)[1]), known)
    path = pathlib.Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: users file not found (expected `all`, `synthetic:N` or a file)")
    users = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        user = line.strip()
        if not user:
            continue
        if "\t" in user or "," in user:
            raise ValueError(f"{path}:{number}: expected one user ID per line, got {line[:80]!r}")
        users.append(user)
    return users


def _known_users(export_record: dict) -> list[str]:
    """Every user of the exported run's files, in ID order."""
    from towers import features, runs

    tables = features.FeatureTables.load(pathlib.Path(export_record["run_dir"]) / runs.TABLES_FILE)
    return [str(u) for u in tables.user_ids]


def synthetic_users(count: int, known: list[str] = (), seed: int = 0) -> list[str]:
    """A deterministic population of `count` unique IDs: the `known` users first (the export's
    own), then `synthetic-<n>` IDs, which the model answers with its cold-start query. Every ID
    runs the full retrieval graph (lookup, query tower, index search, exclusion)."""
    rng = np.random.default_rng(seed)
    real = list(known)[:count]
    synthetic = [f"synthetic-{n:07d}" for n in rng.permutation(max(0, count - len(real)))]
    return real + synthetic


def run_batch(model_base_path: str | os.PathLike, model: str, users: list[str], out: str | os.PathLike,
              output_format: str = "parquet", beam_args: list[str] | None = None,
              max_batch_size: int = 256) -> dict:
    """Runs the pipeline; returns counts and timing. `out` is replaced whole on success."""
    from serving import local

    if output_format not in ("parquet", "tfrecord"):
        raise ValueError(f"--format must be parquet or tfrecord, got {output_format!r}")
    version = local.latest_version(pathlib.Path(model_base_path) / model)
    handler = SignatureModelHandler(str(version), max_batch_size=max_batch_size)
    schema = parquet_schema(handler.load_model()) if output_format == "parquet" else None
    out = pathlib.Path(out).resolve()
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        options = PipelineOptions(beam_args or [])
        with beam.Pipeline(options=options) as pipeline:
            user_ids = (pipeline | "Users" >> beam.Create(users)
                        | "Count read" >> beam.Map(_count_read))
            results = user_ids | "RunInference" >> inference.RunInference(handler)
            records = results | "Records" >> beam.ParDo(ToRecord()).with_outputs(ToRecord.FAILED, main="ok")
            _write(records.ok, staging, output_format, schema)
            (records.ok | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(SAMPLE_SIZE)
             | "Sample lines" >> beam.FlatMap(lambda rows: sorted(json.dumps(r) for r in rows))
             | "Write sample" >> beam.io.WriteToText(str(staging / "sample"), file_name_suffix=".jsonl",
                                                     shard_name_template=""))
            (records[ToRecord.FAILED] | "Failed lines" >> beam.Map(json.dumps)
             | "Write failed" >> beam.io.WriteToText(str(staging / "failed"), file_name_suffix=".jsonl",
                                                     shard_name_template=""))
        result = pipeline.result
        seconds = time.perf_counter() - started
        counts = {name: _counter(result, name) for name in ("users_read", "users_written", "users_failed")}
        summary = {"model": model, "version": int(version.name), "format": output_format,
                   "users": len(users), "seconds": round(seconds, 2),
                   "users_per_second": round(len(users) / seconds, 1), **counts}
        (staging / "_SUMMARY.json").write_text(json.dumps(summary, indent=2))
        files.replace_folder(out, staging)
        return summary
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write(records, staging: pathlib.Path, output_format: str, schema) -> None:
    prefix = str(staging / "recommendations")
    if output_format == "parquet":
        records | "Write parquet" >> beam.io.WriteToParquet(prefix, schema=schema,
                                                            file_name_suffix=".parquet")
    else:
        (records | "Examples" >> beam.Map(_to_example)
         | "Write tfrecord" >> beam.io.WriteToTFRecord(prefix, file_name_suffix=".tfrecord"))


def parquet_schema(signature):
    """One column per signature output: [B] -> a scalar, [B, K] -> a list, [B, N, 2] -> a list of
    lists (`reasons`), strings or floats."""
    import pyarrow
    import tensorflow as tf

    kinds = {tf.string: pyarrow.string(), tf.float32: pyarrow.float32(), tf.int64: pyarrow.int64(),
             tf.int32: pyarrow.int32()}
    fields = [("user_id", pyarrow.string())]
    for name, spec in sorted(signature.structured_outputs.items()):
        kind = kinds[spec.dtype]
        for _ in range(max(spec.shape.rank - 1, 0)):
            kind = pyarrow.list_(kind)
        fields.append((name, kind))
    return pyarrow.schema(fields)


def _count_read(user: str) -> str:
    beam.metrics.Metrics.counter(NAMESPACE, "users_read").inc()
    return user


def _plain(value):
    """numpy values -> JSON/Parquet-friendly Python values (bytes decoded)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _to_example(record: dict) -> bytes:
    import tensorflow as tf

    def flat(value) -> list:  # row-major: a [N, 2] output becomes 2N values
        return [v for part in value for v in flat(part)] if isinstance(value, list) else [value]

    feature = {}
    for name, value in record.items():
        values = flat(value)
        if values and isinstance(values[0], float):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        elif values and isinstance(values[0], int):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode() for v in values]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _counter(result, name: str) -> int:
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE).with_name(name))
    return int(sum(c.committed or c.attempted or 0 for c in query["counters"]))


def _message(error: Exception) -> str:
    text = " ".join(str(getattr(error, "message", error)).split())  # TF errors span many lines
    return f"{type(error).__name__}: {text[:1000]}"
