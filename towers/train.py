"""Training and evaluation of the retrieval model over a run directory.

A run directory holds everything one experiment made: `retrieval_config.json`, `features.npz`,
`checkpoints/`, `logs/` (TensorBoard) and `metrics.json`. Training runs inside a
`tf.distribute` strategy scope, so the same code runs on one device or under `MirroredStrategy`.
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

from towers import data, features, files, metrics, model, peers

log = logging.getLogger(__name__)

CONFIG_FILE = "retrieval_config.json"
TABLES_FILE = "features.npz"
WEIGHTS = "checkpoints/final"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a run's data comes from and how it is split; stored in the run's config."""

    data_dir: str
    card: str | None = None  # a card file overriding the folder's own
    split: str | None = None  # protocol; None: the card's default (pre-split folders: the files)
    test_share: float = 0.2
    seed: int = 42  # the split's seed (random, cold-items)

    def load(self) -> tuple[data.Dataset, data.Split]:
        dataset = data.load(self.data_dir, self.card)
        return dataset, dataset.split(self.split, self.test_share, self.seed)


def train(data_dir: str | os.PathLike | DataConfig, run_dir: str | os.PathLike,
          config: model.RetrievalConfig = model.RetrievalConfig(),
          strategy: tf.distribute.Strategy | None = None, holdout: int = 0,
          verbose: int | None = None) -> model.RetrievalModel:
    """Trains on the split's training rows and writes the run directory.

    `data_dir` is a dataset folder (its card's default protocol) or a `DataConfig`. `holdout` > 0
    keeps the last `holdout` training rows out as a validation set (for tuning; the test split is
    never used here) and records their metrics as `validation`.
    """
    source = data_dir if isinstance(data_dir, DataConfig) else DataConfig(str(data_dir))
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
    tables.save(run / TABLES_FILE)
    config = resolve_cold_dropout(config, tables)
    record = {"data": {**dataclasses.asdict(source), "protocol": split.protocol},
              "holdout": holdout, **dataclasses.asdict(config)}
    files.write_atomic(run / CONFIG_FILE, json.dumps(record, indent=2).encode())

    tf.keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        retrieval = model.RetrievalModel(tables, config)
        retrieval.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    dataset = training_dataset(train_rows, config)
    validation = split.train.take(np.arange(len(split.train) - holdout, len(split.train)))
    callbacks = [
        keras.callbacks.TensorBoard(log_dir=str(run / "logs")),
        keras.callbacks.ModelCheckpoint(str(run / "checkpoints" / "epoch-{epoch:02d}"),
                                        save_weights_only=True),
    ]
    if holdout:
        callbacks.insert(0, ValidationMetrics(tables, validation))
    started = time.perf_counter()
    if verbose is None:  # a progress bar on a terminal, one line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    history = retrieval.fit(dataset, epochs=config.epochs, callbacks=callbacks, verbose=verbose)
    seconds = time.perf_counter() - started
    retrieval.save_weights(str(run / WEIGHTS))

    result = {"training": {"seconds": round(seconds, 1), "epochs": config.epochs,
                           "replicas": strategy.num_replicas_in_sync,
                           "loss": [float(v) for v in history.history["loss"]]}}
    if holdout:
        result["validation"] = evaluate_model(retrieval, tables, validation)
        result["validation_per_epoch"] = callbacks[0].history
    update_metrics(run, result)
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


class ValidationMetrics(keras.callbacks.Callback):
    """Adds hit rate@10/100 on the validation rows to each epoch's logs (and so to TensorBoard)."""

    def __init__(self, tables: features.FeatureTables, validation: data.Interactions):
        super().__init__()
        self.tables, self.validation, self.history = tables, validation, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        result = evaluate_model(self.model, self.tables, self.validation, ks=(10, 100))
        self.history.append({k: round(v, 4) for k, v in result.items() if k.startswith("hit")})
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.history[-1].items()})


def training_dataset(rows: data.Interactions, config: model.RetrievalConfig) -> tf.data.Dataset:
    """(user_id, item_id, timestamp) rows, reshuffled each epoch, in batches."""
    dataset = tf.data.Dataset.from_tensor_slices(
        {"user_id": rows.user_id.astype(str), "item_id": rows.item_id.astype(str),
         "timestamp": rows.timestamp.astype(np.int64)})
    return (dataset.shuffle(len(rows), seed=config.seed, reshuffle_each_iteration=True)
            .batch(config.batch_size).prefetch(tf.data.AUTOTUNE))


def data_config(run_dir: str | os.PathLike) -> DataConfig:
    """The data source and split a run was trained on."""
    run = pathlib.Path(run_dir)
    path = run / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; train first with `cascade train retrieval "
                                f"--data DIR --run {run}`")
    record = json.loads(path.read_text())["data"]
    return DataConfig(**{k: v for k, v in record.items() if k != "protocol"})


def run_data(run_dir: str | os.PathLike) -> tuple[data.Dataset, data.Split]:
    """The dataset and split of a run, exactly as it was trained (test rows included)."""
    return data_config(run_dir).load()


def load_run(run_dir: str | os.PathLike) -> tuple[model.RetrievalModel, features.FeatureTables]:
    """Rebuilds the trained model of a run directory from its config, tables and final weights."""
    run = pathlib.Path(run_dir)
    for needed in (CONFIG_FILE, TABLES_FILE, WEIGHTS + ".index"):
        if not (run / needed).exists():
            raise FileNotFoundError(f"{run / needed}: not found; train first with "
                                    f"`cascade train retrieval --run {run}`")
    record = json.loads((run / CONFIG_FILE).read_text())
    names = {f.name for f in dataclasses.fields(model.RetrievalConfig)}
    config = model.RetrievalConfig(**{k: v for k, v in record.items() if k in names})
    tables = features.FeatureTables.load(run / TABLES_FILE)
    retrieval = model.RetrievalModel(tables, config)
    retrieval.load_weights(str(run / WEIGHTS)).expect_partial()
    return retrieval, tables


def embeddings(retrieval: model.RetrievalModel, tables: features.FeatureTables,
               batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings [U, D] in `tables.user_ids` order, candidate embeddings [I, D])."""
    def run(tower, ids):
        return np.concatenate([tower(tf.constant(ids[i:i + batch_size])).numpy()
                               for i in range(0, len(ids), batch_size)])
    return run(retrieval.query_tower, tables.user_ids), run(retrieval.candidate_tower, tables.item_ids)


def evaluate_model(retrieval: model.RetrievalModel, tables: features.FeatureTables,
                   test: data.Interactions, ks: tuple[int, ...] = (10, 50, 100)) -> dict[str, float]:
    """Hit rate / Recall / NDCG of the model on `test`, training items excluded."""
    queries, candidates = embeddings(retrieval, tables)
    users, items, seen = test_rows(tables, test)
    return metrics.evaluate(queries @ candidates.T, users, items, seen, ks)


def evaluate_run(run_dir: str | os.PathLike, ks: tuple[int, ...] = (10, 50, 100),
                 with_peers: bool = True) -> dict:
    """Evaluates a run on its test split beside popularity, ALS and EASE; writes metrics.json."""
    run = pathlib.Path(run_dir)
    retrieval, tables = load_run(run)
    test = run_data(run)[1].test
    queries, candidates = embeddings(retrieval, tables)
    users, items, seen = test_rows(tables, test)
    scores = queries @ candidates.T
    table = {
        "cascade_retrieval": metrics.evaluate(scores, users, items, seen, ks),
        "cascade_retrieval_no_exclusion": metrics.evaluate(scores, users, items, None, ks),
    }
    if with_peers:
        table["popularity"] = metrics.evaluate(peers.popularity_scores(seen), users, items, seen, ks)
        table["als"] = metrics.evaluate(peers.als_scores(seen), users, items, seen, ks)
        table["ease"] = metrics.evaluate(peers.ease_scores(seen), users, items, seen, ks)
    update_metrics(run, {"test": table})
    return table


def protocol_line(run_dir: str | os.PathLike) -> str:
    """One line naming the run's dataset, protocol and split sizes, printed above every table."""
    source = data_config(run_dir)
    dataset, split = source.load()
    how = ("the folder's own files" if split.protocol == "pre-split" else
           f"test share {source.test_share}, seed {source.seed}")
    return (f"dataset: {dataset.name} ({source.data_dir}); protocol: {split.protocol} ({how}); "
            f"{len(split.train):,} training / {len(split.test):,} test rows, "
            f"{len(set(split.test.user_id) - set(split.train.user_id)):,} test users and "
            f"{len(set(split.test.item_id) - set(split.train.item_id)):,} test items without "
            "a training row")


def format_table(table: dict[str, dict[str, float]], ks: tuple[int, ...] = (10, 50, 100)) -> str:
    """A Markdown table with one row per model."""
    columns = [f"{m}@{k}" for m in ("hit_rate", "recall", "ndcg") for k in ks]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def test_rows(tables: features.FeatureTables, test: data.Interactions):
    user_row = {u: r for r, u in enumerate(tables.user_ids)}
    item_row = {i: r for r, i in enumerate(tables.item_ids)}
    users = np.array([user_row[u] for u in test.user_id])
    items = np.array([item_row[i] for i in test.item_id])
    seen = np.zeros((len(tables.user_ids), len(tables.item_ids)), bool)  # [U, I]: issue #16
    for row, ids in enumerate(tables.seen):
        seen[row, [item_row[i] for i in ids if i != features.PAD]] = True
    return users, items, seen


def update_metrics(run: pathlib.Path, update: dict, section: str | None = None) -> None:
    """Merges `update` into `<run>/metrics.json` (into its `section` when given), keeping the rest."""
    path = run / METRICS_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    (current.setdefault(section, {}) if section else current).update(update)
    files.write_atomic(path, json.dumps(current, indent=2).encode())
