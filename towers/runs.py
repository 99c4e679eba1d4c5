"""A run directory: what one experiment made, and reading it back.

`<run>/retrieval_config.json` (the retrieval config and the data it was trained on, `DataConfig`),
`features.npz` (the feature tables), `checkpoints/` (weights), `logs/` (TensorBoard) and
`metrics.json`, which every stage's evaluation updates in place (`update_metrics`, atomically).
The re-ranker and the copywriter add their own subdirectories.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from towers import data, features, files, model

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


def update_metrics(run: pathlib.Path, update: dict,
                   section: str | tuple[str, ...] | None = None) -> None:
    """Merges `update` into `<run>/metrics.json` (into its `section` when given: a key, or a path
    of keys such as ("reranker", "test")), keeping the rest."""
    path = run / METRICS_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    target = current
    for key in (section,) if isinstance(section, str) else section or ():
        target = target.setdefault(key, {})
    target.update(update)
    files.write_atomic(path, json.dumps(current, indent=2).encode())
