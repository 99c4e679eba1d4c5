"""Candidate sources merged into the top K the re-ranker sees (docs/design.md, "Retrieval").

Three sources fill the K slots of each user's candidate list, seen items left out, no item twice:

- `two_tower`: the retrieval model's best `two_tower` items (query . candidate);
- `item_item`: the next `item_item` items by the item-to-item score, the sum of the sparse
  EASE weights (`peers.ItemNeighbours`, k per item) from the user's training items to the item;
- `new_item`: the next `new_items` items among those with at most `new_item_max_count` training
  interactions, by the two-tower score (their candidate embedding comes from their content
  features: categories, text, numbers), so items the ID-based sources cannot rank get a place.

Slots a source cannot fill (a user with no history has no item-to-item score) take the next items
by the two-tower score.
The merged list is ordered by the two-tower score, so retrieval's top 10 is the two-tower's own
whenever `two_tower` >= 10, and each candidate's source is kept for analysis. The same merge runs
in numpy here (evaluation, re-ranker training) and in TensorFlow in the exported `retrieval` and
`cascade` graphs (`serving.export.RetrievalModule`); a test holds the two to the same lists.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse

from towers import metrics, peers

SOURCES = ("two_tower", "item_item", "new_item")  # source codes 0, 1, 2
# Item-to-item scores are ranked at this resolution (ties to the lower item row), so float sums in a
# different order (numpy here, TensorFlow in the graph) give the same candidates.
RESOLUTION = 1e6


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Slots per source; the merged list has `two_tower + item_item + new_items` candidates."""

    two_tower: int = 100
    item_item: int = 0
    new_items: int = 0
    new_item_max_count: int = 0  # items with at most this many training interactions are "new"

    @property
    def k(self) -> int:
        return self.two_tower + self.item_item + self.new_items

    def __post_init__(self):
        if self.two_tower < 1 or self.item_item < 0 or self.new_items < 0:
            raise ValueError(f"candidate slots must be two_tower >= 1, item_item >= 0, "
                             f"new_items >= 0; got {self}")


def merged(logits: np.ndarray, seen: np.ndarray, item_item: np.ndarray, is_new: np.ndarray,
           config: SourceConfig) -> tuple[np.ndarray, np.ndarray]:
    """(item rows int32 [B, K], source codes int8 [B, K]) for a batch of users: `logits` [B, I]
    two-tower scores, `seen` bool [B, I], `item_item` [B, I] item-to-item scores, `is_new` bool
    [I]. The graph's algorithm step by step (`serving.export.RetrievalModule`):

    1. the two-tower's top K unseen items, T (ties to the lower item row); its first `two_tower`
       are taken;
    2. the `item_item` best untaken items with a positive item-to-item score;
    3. the `new_items` best untaken new items by the two-tower score;
    4. slots 2 and 3 left empty take the next untaken items of T, in order.

    The K items are then ordered by the two-tower score (ties to the lower item row)."""
    logits = np.asarray(logits, np.float32)
    seen = np.asarray(seen, bool)
    batch = np.arange(logits.shape[0])[:, None]
    ranked = _top(np.where(seen, -np.inf, logits), config.k)  # T [B, K]
    taken = seen.copy()
    taken[batch, ranked[:, :config.two_tower]] = True
    parts = [(ranked[:, :config.two_tower], np.ones((len(batch), config.two_tower), bool), 0)]
    item_item = np.round(np.asarray(item_item, np.float32) * np.float32(RESOLUTION))
    for code, slots, key in ((1, config.item_item, np.where(item_item > 0, item_item, -np.inf)),
                             (2, config.new_items, np.where(is_new[None, :], logits, -np.inf))):
        if slots == 0:
            continue
        key = np.where(taken, -np.inf, key)
        top = _top(key, slots)
        valid = np.isfinite(np.take_along_axis(key, top, axis=1))
        taken[np.broadcast_to(batch, top.shape)[valid], top[valid]] = True
        parts.append((top, valid, code))
    rest = ranked[:, config.two_tower:]
    parts.append((rest, ~taken[batch, rest], 0))
    rows = np.concatenate([p[0] for p in parts], axis=1)
    valid = np.concatenate([p[1] for p in parts], axis=1)
    codes = np.concatenate([np.full(p[0].shape, p[2], np.int8) for p in parts], axis=1)
    first = np.argsort(~valid, axis=1, kind="stable")[:, :config.k]  # the first K valid slots
    rows, codes = np.take_along_axis(rows, first, 1), np.take_along_axis(codes, first, 1)
    order = _order(np.take_along_axis(logits, rows, axis=1), rows)
    return (np.take_along_axis(rows, order, axis=1).astype(np.int32),
            np.take_along_axis(codes, order, axis=1))


def batched(logits, seen, neighbours: peers.ItemNeighbours | None, item_count: np.ndarray,
            config: SourceConfig, users: np.ndarray | None = None, batch: int = 512
            ) -> tuple[np.ndarray, np.ndarray]:
    """`merged` for user rows `users` (default: every row) of `logits` [U, I] (an array or
    `metrics.Scores`) and `seen` [U, I] (dense or sparse), in batches of users: memory batch x I
    beyond the inputs. `neighbours` None only when `config.item_item` is 0."""
    if config.item_item and neighbours is None:
        raise ValueError("item_item slots need the item neighbours (peers.ease_neighbours)")
    is_new = np.asarray(item_count) <= config.new_item_max_count
    users = np.arange(logits.shape[0]) if users is None else np.asarray(users)
    rows, codes = [], []
    for start in range(0, len(users), batch):
        part = users[start:start + batch]
        block_seen = metrics.seen_block(seen, part)
        ii = (neighbours.scores(scipy.sparse.csr_matrix(block_seen, dtype=np.float32))
              if config.item_item else np.zeros(block_seen.shape, np.float32))
        r, c = merged(logits[part], block_seen, ii, is_new, config)
        rows.append(r)
        codes.append(c)
    return np.concatenate(rows), np.concatenate(codes)


def hit_rate(candidates: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray,
             users: np.ndarray | None = None) -> float:
    """Share of test pairs (user_rows[j], item_rows[j]) whose item is in that user's candidate
    rows; `candidates` [U', K] is indexed by `users` (the user row of each candidate row; all
    users in order when None)."""
    if users is not None:
        where = np.full(int(max(users.max(), user_rows.max())) + 1, -1)
        where[users] = np.arange(len(users))
        user_rows = where[user_rows]
    return float((candidates[user_rows] == np.asarray(item_rows)[:, None]).any(axis=1).mean())


def _top(key: np.ndarray, k: int) -> np.ndarray:
    """[B, k] columns of the k largest keys per row, best first, ties to the lower column (as
    `tf.math.top_k`; a stable sort, since a partition would pick among ties at the k-th place)."""
    return metrics.top_items(key, k)


def _order(score: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Column order per row: score descending, then item row ascending."""
    return np.lexsort((rows, -score), axis=-1)
