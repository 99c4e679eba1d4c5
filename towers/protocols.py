"""Evaluation protocols: how a dataset that is not pre-split becomes train and test rows.

- `random`: the TFRS-tutorial split, a seeded `tf.data` shuffle of the rows, the first
  (1 - test_share) train. On MovieLens-100K (100,000 rows, share 0.2, seed 42) this is the
  benchmark split of docs/evaluation.md, bit for bit.
- `temporal`: a global time cut: rows sorted by timestamp (ties in file order), the newest share
  is test. Most test users may have no training row at all.
- `user-temporal`: each user's newest round(share x n_u) rows are test, at most n_u - 1 (every
  user keeps a training row; a user with one row has no test row).
- `cold-items`: a seeded round(share x items) of the items that occur in interactions is held
  out with all their interactions: test items never occur in training.

Train rows keep file order except under `random` (shuffled order), `temporal` (time order) and
`cold-items` (grouped by item, in a seeded order), so the last training rows, which `--holdout`
takes for validation, are a random sample (`random`), the newest (`temporal`), the last in file
order (`user-temporal`), or whole items (`cold-items`, the last item possibly in part), the
validation counterpart of each protocol's test rows.
`write_split` writes any split as RecBole pre-split files, so other tools score the same rows.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from towers import files

PROTOCOLS = ("random", "temporal", "user-temporal", "cold-items")


def split_rows(rows, protocol: str, test_share: float = 0.2,
               seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(training row indices, test row indices) of `rows` (`data.Interactions`) under `protocol`;
    `Dataset.split` builds the `Split` (and refuses the time protocols without a timestamp)."""
    if protocol not in PROTOCOLS:
        raise files.DataError(f"unknown split protocol {protocol!r}; expected one of "
                              f"{', '.join(PROTOCOLS)}")
    if not 0.0 < test_share < 1.0:
        raise files.DataError(f"--test-share must be between 0 and 1, got {test_share}")
    order = {"random": random_order, "temporal": temporal_order,
             "user-temporal": user_temporal_order, "cold-items": cold_items_order}[protocol]
    train, test = order(rows, test_share, seed)
    if not len(train) or not len(test):
        raise files.DataError(f"--split {protocol} --test-share {test_share} leaves "
                              f"{len(train)} training and {len(test)} test rows; both must be "
                              "non-empty")
    return train, test


def half_up(value: float) -> int:
    """Rounds halves up (0.5 -> 1, 2.5 -> 3), the rule of every protocol's counts."""
    return int(np.floor(value + 0.5))


def random_order(rows, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`Dataset.range(n).shuffle(n, seed, reshuffle_each_iteration=False)`, the first part train.

    `Dataset.shuffle` permutes positions independently of the element values, so shuffling row
    indices gives exactly the order that shuffling the rows would. It runs in a fresh graph: its
    seed pair also depends on TensorFlow's global seed, and the protocol is defined with none set,
    so a `tf.random.set_seed` elsewhere in the process (Keras training does one) must not move it.
    With a buffer of at least n the shuffle is uniform, and 100,000 (the tutorial's) equals n on
    MovieLens-100K.
    """
    import tensorflow as tf  # only this protocol pays for TensorFlow

    n = len(rows)
    with tf.Graph().as_default():
        shuffled = tf.data.Dataset.range(n).shuffle(max(n, 100_000), seed=seed,
                                                    reshuffle_each_iteration=False)
        everything = shuffled.batch(n).get_single_element()
        with tf.compat.v1.Session() as session:
            order = session.run(everything)
    cut = n - half_up(n * test_share)
    return order[:cut], order[cut:]


def temporal_order(rows, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(rows.timestamp, kind="stable")
    cut = len(rows) - half_up(len(rows) * test_share)
    return order[:cut], order[cut:]


def user_temporal_order(rows, test_share: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Sort by (user, time, file position); each user's block ends with their newest rows.
    users, inverse = np.unique(rows.user_id, return_inverse=True)
    order = np.lexsort((np.arange(len(rows)), rows.timestamp, inverse))
    counts = np.bincount(inverse, minlength=len(users))
    held = np.minimum(np.floor(counts * test_share + 0.5).astype(np.int64), counts - 1)
    ends = np.cumsum(counts)
    position = np.arange(len(rows)) - np.repeat(ends - counts, counts)  # rank within the user
    is_test_sorted = position >= np.repeat(counts - held, counts)
    is_test = np.zeros(len(rows), bool)
    is_test[order] = is_test_sorted
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def cold_items_order(rows, test_share: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    items = np.array(sorted(set(rows.item_id), key=files.id_key))
    order = np.random.default_rng(seed).permutation(len(items))
    held = half_up(len(items) * test_share)
    # Training rows grouped by item in the permutation's order (each item's rows in file order),
    # so the last training rows, which `--holdout` takes, are whole items as well: new to a
    # model trained without them, as the test items are.
    rank = np.empty(len(items), np.int64)
    rank[order] = np.arange(len(items))
    item_rank = rank[_positions(items, rows.item_id)]
    is_test = item_rank < held
    train = np.flatnonzero(~is_test)
    return train[np.argsort(item_rank[train], kind="stable")], np.flatnonzero(is_test)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The position of each of `ids` in `sorted_ids` (ordered by `files.id_key`, every ID there)."""
    distinct, inverse = np.unique(ids, return_inverse=True)
    lookup = {value: position for position, value in enumerate(sorted_ids.tolist())}
    return np.array([lookup[value] for value in distinct.tolist()], np.int64)[inverse.ravel()]


def write_split(dataset, split, out: str | os.PathLike) -> pathlib.Path:
    """Writes `<name>.train.inter` and `<name>.test.inter` (plus the item/user files and card) to
    `out`: the source's own lines and header, so any RecBole-format tool reads the same rows
    (from a Parquet source, `<name>.train.inter.parquet` and `.test.inter.parquet`, its rows).
    Each file is written to a temporary name and renamed into place."""
    if split.train_index is None or dataset.lines is None:
        raise files.DataError(f"{dataset.path}: already pre-split; nothing to write")
    out = pathlib.Path(out)
    if out.resolve() == dataset.path.resolve():
        raise files.DataError(f"{out}: write the split to another folder than the dataset's own")
    parts = (("train", split.train_index), ("test", split.test_index))
    source = dataset.path / f"{dataset.name}.inter.parquet"
    if source.exists():  # Parquet in, Parquet out: the source's rows, every column as it was
        import pyarrow.parquet as pq

        table = pq.read_table(source)
        out.mkdir(parents=True, exist_ok=True)
        for part, index in parts:
            target = out / f"{dataset.name}.{part}.inter.parquet"
            staging = target.with_name(f".{target.name}.tmp")
            pq.write_table(table.take(dataset.lines[index] - 1), staging)  # lines: 1-based rows
            os.replace(staging, target)
    else:  # the source's bytes, line by line, streamed: no Python string per row held
        raw = (dataset.path / f"{dataset.name}.inter").read_bytes()
        breaks = np.flatnonzero(np.frombuffer(raw, np.uint8) == ord("\n"))
        starts, stops = np.concatenate([[0], breaks + 1]), np.concatenate([breaks, [len(raw)]])
        line = lambda number: raw[starts[number - 1]:stops[number - 1]].rstrip(b"\r") + b"\n"

        def chunks(index: np.ndarray, block: int = 65_536):
            yield line(1)  # the header
            for at in range(0, len(index), block):
                yield b"".join(map(line, dataset.lines[index[at:at + block]].tolist()))

        for part, index in parts:
            files.write_atomic(out / f"{dataset.name}.{part}.inter", chunks(index))
    # The side files and the card the dataset was loaded with (a `--card` from elsewhere too).
    copies = [dataset.path / f"{dataset.name}{suffix}" for suffix in (".item", ".user")]
    copies += [dataset.card.source] if dataset.card.source is not None else []
    for path in copies:
        if path.exists():
            files.write_atomic(out / f"{dataset.name}{path.suffix}", path.read_bytes())
    return out
