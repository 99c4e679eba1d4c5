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
TINY_TRAIN = 2_400  # the tiny data's random split: 80% of 3,000 rows


@pytest.fixture(scope="session")
def movielens_dir() -> pathlib.Path:
    if not (DATA / "ml-100k.inter").exists():
        pytest.fail(f"{DATA} has no MovieLens-100K: run `make test`, which fetches it, or set "
                    "CASCADE_DATA to a folder made by `cascade data fetch movielens-100k`")
    return DATA


@pytest.fixture(scope="session")
def movielens(movielens_dir):
    """MovieLens-100K through the data layer (`towers.data.Dataset`, its card from the folder)."""
    from towers import data

    return data.load(movielens_dir)


@pytest.fixture(scope="session")
def benchmark_rows(movielens):
    """(seen [U, I] training matrix, test user rows, test item rows) of the benchmark split, users
    and items in ID order: what a peer is scored and evaluated on."""
    import numpy as np

    split = movielens.split("random")
    user_row = {u: r for r, u in enumerate(sorted(movielens.user_ids(), key=int))}
    item_row = {i: r for r, i in enumerate(sorted(movielens.item_ids(), key=int))}
    rows = lambda ratings: (np.array([user_row[u] for u in ratings.user_id]),
                            np.array([item_row[i] for i in ratings.item_id]))
    seen = np.zeros((len(user_row), len(item_row)), bool)
    seen[rows(split.train)] = True
    return (seen, *rows(split.test))


@pytest.fixture(scope="session")
def tiny_data_dir(movielens_dir, tmp_path_factory) -> pathlib.Path:
    """The first 3,000 ratings of MovieLens-100K in RecBole format, with the full catalog and the
    card; its default random split has 2,400 training rows."""
    out = tmp_path_factory.mktemp("tiny-ml")
    lines = (movielens_dir / "ml-100k.inter").read_text().splitlines(keepends=True)
    (out / "ml-100k.inter").write_text("".join(lines[:TINY_ROWS + 1]))
    for suffix in ("item", "user", "yaml"):
        (out / f"ml-100k.{suffix}").write_bytes((movielens_dir / f"ml-100k.{suffix}").read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_config():
    from towers import model

    # No cold dropout: tests that compare runs need the same examples in each (the shapes in
    # tests/e2e/test_shapes.py train with the automatic one).
    return model.RetrievalConfig(embedding_dim=16, id_dim=16, side_dim=4, hidden=32,
                                 history_length=32, epochs=4, batch_size=128, learning_rate=1e-2,
                                 cold_user_dropout=0.0, cold_item_dropout=0.0)


@pytest.fixture(scope="session")
def tiny_trained(tiny_data_dir, tiny_config, tmp_path_factory) -> tuple[pathlib.Path, tuple]:
    """(the tiny run directory, the (query, candidate) embeddings of the model `train` returned,
    in memory, before anything was read back from the run)."""
    from towers import features, model, runs, train

    run = tmp_path_factory.mktemp("tiny-run")
    retrieval = train.train(tiny_data_dir, run, tiny_config, verbose=0)
    return run, model.embeddings(retrieval, features.FeatureTables.load(run / runs.TABLES_FILE))


@pytest.fixture(scope="session")
def tiny_run(tiny_trained) -> pathlib.Path:
    return tiny_trained[0]


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> pathlib.Path:
    from serving import export

    base = tmp_path_factory.mktemp("models")
    export.export(tiny_run, base, index_kind="bruteforce", k=20)
    return base


# A tiny random BERT (characters as WordPieces, so every catalog word tokenizes) and tiny
# re-ranker / copywriter configs: the whole cascade in seconds.
TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def tiny_bert_vocab() -> list[str]:
    import string

    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
            + ["##" + c for c in string.ascii_lowercase] + list(string.digits)
            + ["##" + c for c in string.digits] + list(".,:;()'!?-&"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> pathlib.Path:
    """A local Hugging Face BERT directory (TF weights + vocab.txt) with random weights."""
    import tensorflow as tf
    import transformers

    tf.keras.utils.set_random_seed(0)
    directory = tmp_path_factory.mktemp("tiny-bert-dir")
    model = transformers.TFBertModel(transformers.BertConfig(**TINY_BERT))
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    (directory / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n")
    return directory


# With every candidate source: 12 two-tower, 6 item-to-item and 2 new-item slots.
TINY_RERANKER = dict(max_length=32, history_titles=2, layers=1, candidates=12, group_size=4,
                     holdout=400, validation_users=8, epochs=1, batch_groups=4, learning_rate=1e-3,
                     item_item_candidates=6, new_item_candidates=2, new_item_max_count=0)


def tiny_copywriter_config():
    from rerank.copy import copywriter

    return copywriter.CopywriterConfig(
        n_layer=1, n_embd=32, n_head=2, n_positions=320, vocab_size=400, corpus_size=400, epochs=3,
        batch_size=32, learning_rate=1e-2, warmup_steps=2, max_new_tokens=12, jit_compile=False,
        attempts=2)


@pytest.fixture(scope="session")
def tiny_cascade_run(tiny_run, tiny_data_dir, tiny_bert_dir, tmp_path_factory) -> pathlib.Path:
    """A copy of the tiny retrieval run with a tiny re-ranker and a tiny copywriter trained."""
    import shutil

    from rerank import cross_encoder
    from rerank.copy import copywriter

    run = tmp_path_factory.mktemp("tiny-cascade") / "run"
    shutil.copytree(tiny_run, run)
    cross_encoder.train_reranker(run, checkpoint=tiny_bert_dir, verbose=0,
                                 config=cross_encoder.RerankerConfig(**TINY_RERANKER))
    copywriter.train_copywriter(run, tiny_copywriter_config(), verbose=0)
    return run


@pytest.fixture(scope="session")
def tiny_cascade_export(tiny_cascade_run, tmp_path_factory) -> pathlib.Path:
    """Every model of the tiny cascade run (brute force), K = 20 candidates, N = 5 final items."""
    from serving import export

    base = tmp_path_factory.mktemp("cascade-models")
    export.export(tiny_cascade_run, base, index_kind="bruteforce", k=20, n=5)
    return base
