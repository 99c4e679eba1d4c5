"""Training the retrieval model into a run directory (`towers.runs`).

Training runs inside a `tf.distribute` strategy scope, so the same code runs on one device or
under `MirroredStrategy`. Evaluation is `towers.retrieval_eval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf
import tf_keras as keras

from towers import data, features, files, model, retrieval_eval, runs

log = logging.getLogger(__name__)


def train(data_dir: str | os.PathLike | runs.DataConfig, run_dir: str | os.PathLike,
          config: model.RetrievalConfig = model.RetrievalConfig(),
          strategy: tf.distribute.Strategy | None = None, holdout: int = 0,
          verbose: int | None = None) -> model.RetrievalModel:
    """Trains on the split's training rows and writes the run directory.

    `data_dir` is a dataset folder (its card's default protocol) or a `runs.DataConfig`. `holdout` > 0
    keeps the last `holdout` training rows out as a validation set (for tuning; the test split is
    never used here) and records their metrics as `validation`.
    """
    source = data_dir if isinstance(data_dir, runs.DataConfig) else runs.DataConfig(str(data_dir))
    source = dataclasses.replace(source, data_dir=str(pathlib.Path(source.data_dir).resolve()),
                                 card=str(pathlib.Path(source.card).resolve()) if source.card else None)
    strategy = strategy or tf.distribute.get_strategy()
    chief = strategy.extended.should_checkpoint  # False only on non-chief multi-worker tasks
    run = pathlib.Path(run_dir)
    if not chief:  # other workers write to a scratch folder that is removed at the end
        run = run / f".worker-{strategy.cluster_resolver.task_id}"
    run.mkdir(parents=True, exist_ok=True)
    dataset, split = source.load()
    if not 0 <= holdout < len(split.train):
        raise ValueError(f"holdout must be between 0 and {len(split.train) - 1} (training rows), "
                         f"got {holdout}")
    train_rows = split.train.take(np.arange(len(split.train) - holdout))
    tables = features.build_tables(dataset, train_rows, config.history_length)
    tables.save(run / runs.TABLES_FILE)
    config = resolve_cold_dropout(config, tables)
    record = {"data": {**dataclasses.asdict(source), "protocol": split.protocol},
              "holdout": holdout, **dataclasses.asdict(config)}
    files.write_atomic(run / runs.CONFIG_FILE, json.dumps(record, indent=2).encode())

    tf.keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        retrieval = model.RetrievalModel(tables, config)
        retrieval.compile(optimizer=model.optimizer(config))
    dataset = training_dataset(train_rows, config, tables)
    validation = split.train.take(np.arange(len(split.train) - holdout, len(split.train)))
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=str(run / "logs")),
        keras.callbacks.ModelCheckpoint(str(run / "checkpoints" / "epoch-{epoch:02d}"),
                                        save_weights_only=True),
    ]
    if holdout:
        callbacks.insert(0, ValidationMetrics(tables, validation))
    started = time.perf_counter()
    if verbose is None:  # a progress bar on a terminal; in logs, a line a minute and per epoch
        verbose = 1 if sys.stdout.isatty() else 2
    if verbose == 2:
        callbacks.append(ProgressLog())
    history = retrieval.fit(dataset, epochs=config.epochs, callbacks=callbacks, verbose=verbose)
    seconds = time.perf_counter() - started
    retrieval.save_weights(str(run / runs.WEIGHTS))

    result = {"training": {"seconds": round(seconds, 1), "epochs": config.epochs,
                           "replicas": strategy.num_replicas_in_sync,
                           "loss": [float(v) for v in history.history["loss"]]}}
    if holdout:
        result["validation"] = retrieval_eval.evaluate_model(retrieval, tables, validation)
        result["validation_per_epoch"] = callbacks[0].history
    runs.update_metrics(run, result)
    if not chief:
        shutil.rmtree(run, ignore_errors=True)
    return retrieval


def resolve_cold_dropout(config: model.RetrievalConfig,
                         tables: features.FeatureTables) -> model.RetrievalConfig:
    """Fills an unset `cold_*_dropout` with the share of users / items in the files that have no
    training interaction (0 when every one has some), at most `model.MAX_COLD_DROPOUT`."""
    share = lambda rows: min(round(float(np.mean(rows == 0)), 4), model.MAX_COLD_DROPOUT)
    return dataclasses.replace(
        config,
        cold_user_dropout=(share(tables.user_id_row) if config.cold_user_dropout is None
                           else config.cold_user_dropout),
        cold_item_dropout=(share(tables.item_id_row) if config.cold_item_dropout is None
                           else config.cold_item_dropout))


def make_strategy(name: str) -> tf.distribute.Strategy | None:
    """`default` (one device), `mirrored` (every local device) or `multiworker` (reads TF_CONFIG).

    Create it first thing in the process: multi-worker collectives must be set up before any op.
    """
    if name == "default":
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy multiworker needs TF_CONFIG describing the cluster and "
                             "this task, e.g. {\"cluster\": {\"worker\": [\"host1:12345\", "
                             "\"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be default, mirrored or multiworker, got {name!r}")


PROGRESS_SECONDS = 60.0  # how often `ProgressLog` writes its line


class ProgressLog(keras.callbacks.Callback):
    """Logs the step, the loss and the time left of the epoch every `every` seconds
    (`PROGRESS_SECONDS` by default): Keras's one line per epoch says nothing for hours on a large
    dataset, or for the many minutes of fine-tuning BERT on 2 cores."""

    def __init__(self, every: float | None = None):
        super().__init__()
        self.every = PROGRESS_SECONDS if every is None else every

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch, self.started = epoch, time.perf_counter()
        self.last = self.started

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last, steps = now, self.params.get("steps")
        per_step = (now - self.started) / (batch + 1)
        left = f", {per_step * (steps - batch - 1) / 60:.0f} min left" if steps else ""
        log.info("epoch %d: step %d%s, loss %.4f, %.0f ms/step%s", self.epoch + 1, batch + 1,
                 f"/{steps}" if steps else "", (logs or {}).get("loss", float("nan")),
                 per_step * 1000, left)


class ValidationMetrics(keras.callbacks.Callback):
    """Adds hit rate@10/100 on the validation rows to each epoch's logs (and so to TensorBoard)."""

    def __init__(self, tables: features.FeatureTables, validation: data.Interactions):
        super().__init__()
        self.tables, self.validation, self.history = tables, validation, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        result = retrieval_eval.evaluate_model(self.model, self.tables, self.validation, ks=(10, 100))
        self.history.append({k: round(v, 4) for k, v in result.items() if k.startswith("hit")})
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.history[-1].items()})


def training_dataset(rows: data.Interactions, config: model.RetrievalConfig,
                     tables: features.FeatureTables) -> tf.data.Dataset:
    """Batches of `user_row`, `item_row` (row + 1 in `tables`, as the towers' lookups give) and
    `timestamp`, reshuffled each epoch.

    Row positions are shuffled, not the rows: `Dataset.shuffle` permutes positions independently
    of the values, so the order is the one shuffling the rows gave, while the buffer holds one
    integer per row (3.6 GiB at 16M rows; the string rows it held before took 13 GiB).
    """
    columns = {"user_row": features.rows_of(tables.user_ids, rows.user_id, "user") + 1,
               "item_row": features.rows_of(tables.item_ids, rows.item_id, "item") + 1,
               "timestamp": rows.timestamp.astype(np.int64)}
    columns = {name: tf.constant(values, tf.int64) for name, values in columns.items()}

    def gather(at: tf.Tensor) -> dict[str, tf.Tensor]:
        return {name: tf.gather(values, at) for name, values in columns.items()}

    return (tf.data.Dataset.range(len(rows))
            .shuffle(len(rows), seed=config.seed, reshuffle_each_iteration=True)
            .batch(config.batch_size).map(gather).prefetch(tf.data.AUTOTUNE))
