"""Session fixtures: the real MovieLens-100K (fetched by `make test`), a tiny slice of it, a tiny
trained run and its export. Everything heavy is built once per session."""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("CASCADE_DATA", REPO / "data" / "ml-100k"))
TINY_ROWS = 3_000
TINY_TRAIN = 2_400


@pytest.fixture(scope="session")
def movielens_dir() -> pathlib.Path:
    if not (DATA / "ml-100k.inter").exists():
        pytest.fail(f"{DATA} has no MovieLens-100K: run `make test`, which fetches it, or set "
                    "CASCADE_DATA to a folder made by `cascade data fetch movielens-100k`")
    return DATA


@pytest.fixture(scope="session")
def movielens(movielens_dir):
    from towers import data

    return data.load_movielens(movielens_dir)


@pytest.fixture(scope="session")
def tiny_data_dir(movielens_dir, tmp_path_factory) -> pathlib.Path:
    """The first 3,000 ratings of MovieLens-100K in RecBole format, with the full catalog."""
    out = tmp_path_factory.mktemp("tiny-ml")
    lines = (movielens_dir / "ml-100k.inter").read_text().splitlines(keepends=True)
    (out / "ml-100k.inter").write_text("".join(lines[:TINY_ROWS + 1]))
    for suffix in ("item", "user"):
        (out / f"ml-100k.{suffix}").write_bytes((movielens_dir / f"ml-100k.{suffix}").read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_config():
    from towers import model

    return model.RetrievalConfig(embedding_dim=16, id_dim=16, side_dim=4, hidden=32,
                                 history_length=32, epochs=4, batch_size=128, learning_rate=1e-2)


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tiny_config, tmp_path_factory) -> pathlib.Path:
    from towers import train

    run = tmp_path_factory.mktemp("tiny-run")
    train.train(tiny_data_dir, run, tiny_config, train_size=TINY_TRAIN, verbose=0)
    return run


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> pathlib.Path:
    from serving import export

    base = tmp_path_factory.mktemp("models")
    export.export(tiny_run, base, index_kind="bruteforce", k=20)
    return base
