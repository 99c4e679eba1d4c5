"""`cascade data split --runner beam`: the `user-temporal` split as an Apache Beam pipeline.

    <name>.inter ──► (offset, line) ──► ParseRow ──► by user ──► SplitUser ──► <name>.train.inter
                                           │                          └─────► <name>.test.inter
                                           └─► rejected ──► the first one, named file:line

The output is what `protocols.write_split` writes for `user-temporal` (`<name>.train.inter` and
`<name>.test.inter` with the source's header and its own lines, CR stripped; copies of `.item`,
`.user` and the card), except that the order of lines within each file may differ: files hold the
same lines as multisets, and `data.load` reads them as the same pre-split dataset up to row order.
Lines are read in byte ranges, grouped by user and written through one writer per file (the
loader wants one `<name>.train.inter`, so there are no shards): on a distributed runner no step
holds more than one user's rows, while the DirectRunner keeps its shuffle in memory.

Each line passes the loader's checks (`data.load`, `files.read_atomic`): blank lines are skipped,
a wrong field count, a value that is not a number, an empty ID, rating or timestamp reject the
row, and rows under the card's `positive_threshold` are dropped (float32, as the loader compares).
A rejected row fails the split after the pipeline with the loader's message and the row's line.
The `.item` / `.user` files and the card's feature and text keys are copied, not checked:
`data.load` of the output checks them as it would the source's. Output goes to a staging folder
beside `out` and replaces `out` whole only on success, so paths must be on a local or shared file
system that every worker sees (the launcher reads the header and renames the folder itself).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import uuid

import apache_beam as beam
import numpy as np
from apache_beam import coders
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from towers import card as cards
from towers import data, files, protocols

log = logging.getLogger(__name__)

PROTOCOLS = ("user-temporal",)  # the protocols `--runner beam` writes
BOOKKEEPING = "_pipeline"  # counts and the first rejected row, removed before the swap


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each role sits in a `.inter` line (column indices), from its header and the card."""

    fields: tuple[files.Field, ...]
    user: int
    item: int
    timestamp: int
    rating: int | None  # None: implicit feedback, no threshold applies
    positive_threshold: float | None
    seq_separator: str

    def read(self, text: str) -> tuple[str, int, bool]:
        """(user, timestamp, kept) of one non-blank line; `files.DataError` with the loader's
        reason (no file or line: the caller names them) when the loader would refuse it."""
        parts = text.split("\t")
        if len(parts) != len(self.fields):
            raise files.DataError(
                f"expected {len(self.fields)} tab-separated fields "
                f"({', '.join(f.name for f in self.fields)}), got {len(parts)}: {text[:80]!r}")
        for field, value in zip(self.fields, parts):  # every column typed, as read_atomic does
            if field.type == "float":
                _number(value, field)
            elif field.type == "float_seq" and value:
                for entry in value.split(self.seq_separator):
                    _number(entry, field)
        for column in (self.user, self.item):
            if parts[column] == "":
                raise files.DataError(f"field {self.fields[column].name!r} is empty")
        timestamp = _required(parts[self.timestamp], self.fields[self.timestamp])
        kept = True
        if self.rating is not None:
            rating = _required(parts[self.rating], self.fields[self.rating])
            if self.positive_threshold is not None:
                kept = bool(np.float32(rating) >= np.float32(self.positive_threshold))
        # float64 -> int64 truncates, as the loader's `astype(np.int64)`: 10.2 and 10.9 tie.
        return parts[self.user], int(np.float64(timestamp).astype(np.int64)), kept


def _number(text: str, field: files.Field) -> float:
    """`files.parse_number` without the file and line, which only the launcher knows."""
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise files.DataError(f"field {field.name!r} is {field.type}, got {text!r}, "
                              "not a number") from None


def _required(text: str, field: files.Field) -> float:
    value = _number(text, field)
    if math.isnan(value):
        raise files.DataError(f"field {field.name!r} is empty; expected a number")
    return value


class OffsetLines(filebasedsource.FileBasedSource):
    """The lines of a text file after its header, each as (byte offset, bytes with the newline).

    `ReadFromText` splits a file into byte ranges the same way but drops each line's position,
    and the split breaks ties in time by file position. A range owns the lines that start in it.
    """

    def __init__(self, path: str):
        super().__init__(path, compression_type=CompressionTypes.UNCOMPRESSED)

    def default_output_coder(self):
        return coders.TupleCoder([coders.VarIntCoder(), coders.BytesCoder()])

    def read_records(self, file_name, range_tracker):
        with self.open_file(file_name) as handle:
            header = len(handle.readline())
            position = max(range_tracker.start_position(), header)
            if position > header:  # the line holding the byte before the range is the last one's
                handle.seek(position - 1)
                position += len(handle.readline()) - 1
            while range_tracker.try_claim(position):
                line = handle.readline()
                if not line:
                    return
                yield position, line
                position += len(line)


class ParseRow(beam.DoFn):
    """(offset, line) -> (user, (timestamp, offset, line as written)) for each row the loader
    keeps; (offset, reason) to the `rejected` output for each row it would refuse."""

    REJECTED = "rejected"

    def __init__(self, layout: Layout):
        self._layout = layout

    def process(self, element):
        offset, raw = element
        line = raw.removesuffix(b"\n").rstrip(b"\r")  # `write_split` writes each line so
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
            if not text:  # a blank line: the loader skips it
                return
            user, timestamp, kept = self._layout.read(text)
        except UnicodeDecodeError as error:
            yield beam.pvalue.TaggedOutput(self.REJECTED, (offset, f"not UTF-8 text ({error})"))
            return
        except files.DataError as error:
            yield beam.pvalue.TaggedOutput(self.REJECTED, (offset, str(error)))
            return
        if kept:
            yield user, (timestamp, offset, line)


class SplitUser(beam.DoFn):
    """One user's rows -> the oldest to the main output (train), the newest
    min(round-half-up(share x n), n - 1) to `test`: `protocols.user_temporal_order`, with ties in
    time broken by file position."""

    TEST = "test"

    def __init__(self, test_share: float):
        self._test_share = test_share

    def process(self, element):
        _, rows = element
        rows = sorted(rows)  # (timestamp, offset, line): offsets are unique, lines never compared
        cut = len(rows) - min(protocols.half_up(len(rows) * self._test_share), len(rows) - 1)
        for _, _, line in rows[:cut]:
            yield line
        for _, _, line in rows[cut:]:
            yield beam.pvalue.TaggedOutput(self.TEST, line)


def write_split(data_dir: str | os.PathLike, out: str | os.PathLike,
                card: str | os.PathLike | None = None, test_share: float = 0.2,
                beam_args: list[str] | None = None) -> tuple[pathlib.Path, int, int]:
    """Writes the user-temporal split of the dataset in `data_dir` to `out` on a Beam runner
    (`beam_args`, DirectRunner by default); returns (out, training rows, test rows). `card`
    overrides the folder's own, as in `data.load`."""
    path = pathlib.Path(data_dir)
    name = data.dataset_name(path)
    source = _source(path, name)
    card = data.find_card(path, name, card)
    header, layout = read_layout(source, card)
    if not 0.0 < test_share < 1.0:
        raise files.DataError(f"--test-share must be between 0 and 1, got {test_share}")
    out = pathlib.Path(out).resolve()
    if out == path.resolve() or out in path.resolve().parents:
        raise files.DataError(f"{out}: write the split to another folder than the dataset's own "
                              "(the output replaces that folder whole)")
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        with beam.Pipeline(options=PipelineOptions(beam_args or [])) as pipeline:
            _pipeline(pipeline, source, staging, name, header, layout, test_share)
        train, test = _checked_counts(staging / BOOKKEEPING, source, test_share)
        shutil.rmtree(staging / BOOKKEEPING)
        copies = [path / f"{name}{suffix}" for suffix in (".item", ".user")]
        copies += [card.source] if card.source is not None else []
        for copy in copies:  # as `protocols.write_split`: the side files and the card used
            if copy.exists():
                shutil.copyfile(copy, staging / f"{name}{copy.suffix}")
        files.replace_folder(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: %d training and %d test rows (user-temporal, Beam)", out, train, test)
    return out, train, test


def _pipeline(pipeline: beam.Pipeline, source: pathlib.Path, staging: pathlib.Path, name: str,
              header: str, layout: Layout, test_share: float) -> None:
    rows = (pipeline | "Read" >> beam.io.Read(OffsetLines(str(source)))
            | "Parse" >> beam.ParDo(ParseRow(layout)).with_outputs(ParseRow.REJECTED, main="kept"))
    parts = (rows.kept | "By user" >> beam.GroupByKey()
             | "Split" >> beam.ParDo(SplitUser(test_share)).with_outputs(SplitUser.TEST,
                                                                         main="train"))
    for part in ("train", SplitUser.TEST):
        parts[part] | f"Write {part}" >> beam.io.WriteToText(
            str(staging / f"{name}.{part}.inter"), shard_name_template="", header=header)
    rejected = rows[ParseRow.REJECTED]
    bookkeeping = staging / BOOKKEEPING
    counts = [collection | f"Count {what}" >> beam.combiners.Count.Globally()
              | f"Name {what}" >> beam.Map(lambda n, what=what: json.dumps([what, n]))
              for what, collection in (("train", parts.train), ("test", parts[SplitUser.TEST]),
                                       ("rejected", rejected))]
    (counts | "Counts" >> beam.Flatten()
     | "Write counts" >> beam.io.WriteToText(str(bookkeeping / "counts"), shard_name_template=""))
    (rejected | "First rejected" >> beam.combiners.Top.Smallest(1)
     | "Rejected lines" >> beam.FlatMap(lambda first: [json.dumps(row) for row in first])
     | "Write rejected" >> beam.io.WriteToText(str(bookkeeping / "rejected"),
                                               shard_name_template=""))


def _checked_counts(bookkeeping: pathlib.Path, source: pathlib.Path,
                    test_share: float) -> tuple[int, int]:
    """(training rows, test rows); the loader's error for the first rejected row, or
    `protocols.split_rows`' when a part is empty."""
    counts = dict(json.loads(line) for line in (bookkeeping / "counts").read_text().splitlines())
    if counts["rejected"]:
        offset, reason = json.loads((bookkeeping / "rejected").read_text())
        more = counts["rejected"] - 1
        raise files.DataError(f"{source}:{line_number(source, offset)}: {reason}"
                              + (f" ({more} more rows rejected)" if more else ""))
    train, test = counts["train"], counts["test"]
    if not train + test:
        raise files.DataError(f"{source.parent}: no interactions")
    if not train or not test:
        raise files.DataError(f"--split user-temporal --test-share {test_share} leaves {train} "
                              f"training and {test} test rows; both must be non-empty")
    return train, test


def line_number(path: pathlib.Path, offset: int) -> int:
    """The 1-based line of the byte at `offset` (read only when an error names it)."""
    newlines, block = 0, 1 << 24
    with open(path, "rb") as handle:
        while offset > 0:
            chunk = handle.read(min(block, offset))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset -= len(chunk)
    return newlines + 1


def read_layout(source: pathlib.Path, card: cards.Card) -> tuple[str, Layout]:
    """(the header line as written, the Layout) of a `.inter` file: the checks `data.load` makes
    of the header, with its messages, and the timestamp the time protocols need."""
    fields = files.read_header(source)
    with open(source, "rb") as handle:
        header = handle.readline().removesuffix(b"\n").rstrip(b"\r").decode("utf-8")
    names = [f.name for f in fields]
    column = {f.name: at for at, f in enumerate(fields)}
    for role in ("user_id", "item_id"):
        field = getattr(card, role)
        if field not in column:
            raise files.DataError(f"{source}:1: no {role} field {field!r}; the file has "
                                  f"{', '.join(names)}" + ("" if card.source else
                                  f" (a card, {card.name}.yaml, can rename it)"))
        if fields[column[field]].type != "token":
            raise files.DataError(f"{source}:1: field {field!r} ({role}) must be token, is "
                                  f"{fields[column[field]].type}")
    for role in ("rating", "timestamp"):
        if role in card.declared and getattr(card, role) not in column:
            raise files.DataError(f"{source}:1: the card names {role} field "
                                  f"{getattr(card, role)!r}, which the file does not have; its "
                                  f"fields are {', '.join(names)}")
    if card.timestamp is None or card.timestamp not in column:
        raise files.DataError(f"{source.parent}: --split user-temporal needs a timestamp field; "
                              f"{source.name} has none (a card's fields.timestamp can name it)")
    rating = column.get(card.rating) if card.rating is not None else None
    for at in (column[card.timestamp], rating):
        if at is not None and fields[at].type not in ("token", "float"):
            raise files.DataError(f"{source}:1: field {fields[at].name!r} must be float, is "
                                  f"{fields[at].type}")
    return header, Layout(fields, column[card.user_id], column[card.item_id],
                          column[card.timestamp], rating, card.positive_threshold,
                          card.seq_separator)


def _source(path: pathlib.Path, name: str) -> pathlib.Path:
    if any((path / f"{name}.train.inter{end}").exists() for end in ("", ".parquet")):
        raise files.DataError(f"{path}: already pre-split; nothing to write")
    if (path / f"{name}.inter.parquet").exists():
        raise files.DataError(f"{path}: {name}.inter.parquet: --runner beam reads the text "
                              f"`{name}.inter`; split Parquet without --runner beam")
    return path / f"{name}.inter"
