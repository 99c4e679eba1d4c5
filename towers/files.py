"""Files: RecBole atomic files read with their types checked, the data layer's error, ID order,
and writing a file by a temporary name and one rename (so a reader never sees half a file).

Every other module of the data layer (`data`, `protocols`, `features`, `fetch`) builds on these.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable

import numpy as np

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


class DataError(ValueError):
    """A data file or card is missing or malformed; the message names the file, the line, the
    field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: str  # one of FIELD_TYPES


@dataclasses.dataclass(frozen=True)
class AtomicFile:
    """One atomic file's columns: token -> str [N], token_seq -> object [N] of tuple[str],
    float -> float64 [N] (NaN where empty), float_seq -> object [N] of float64 arrays."""

    path: pathlib.Path
    fields: tuple[Field, ...]
    columns: dict[str, np.ndarray]
    lines: np.ndarray  # int64 [N], the file line of each row (for error messages)

    def __len__(self) -> int:
        return len(self.lines)

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


def read_header(path: pathlib.Path) -> tuple[Field, ...]:
    """The `field:type` header of an atomic file."""
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\r\n")
    return _parse_header(header, path)


def _parse_header(header: str, path: pathlib.Path) -> tuple[Field, ...]:
    fields = []
    for column, entry in enumerate(header.split("\t"), start=1):
        name, colon, kind = entry.rpartition(":")
        if not colon or not name:
            raise DataError(f"{path}:1: column {column} header {entry!r} must be `field:type` "
                            f"with type one of {', '.join(FIELD_TYPES)}")
        if kind not in FIELD_TYPES:
            raise DataError(f"{path}:1: field {name!r} has unknown type {kind!r}; expected one of "
                            f"{', '.join(FIELD_TYPES)}")
        fields.append(Field(name, kind))
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise DataError(f"{path}:1: repeated field name in header {names}")
    return tuple(fields)


def read_atomic(path: str | os.PathLike, seq_separator: str = " ") -> AtomicFile:
    """Reads a tab-separated atomic file; every value is checked against its field's type.
    Columns of token and float fields are parsed whole by Arrow's CSV reader (no Python object
    per value but the token strings); a file it cannot take that way (a bad row, a value that is
    not a number, blank lines that would shift line numbers) is read line by line, which names
    the file, line and field of the problem."""
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fast = _read_atomic_arrow(path)
    if fast is not None:
        return fast
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            fields = _parse_header(handle.readline().rstrip("\r\n"), path)
            raw: list[list[str]] = [[] for _ in fields]
            lines = []
            for number, line in enumerate(handle, start=2):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) != len(fields):
                    raise DataError(
                        f"{path}:{number}: expected {len(fields)} tab-separated fields "
                        f"({', '.join(f.name for f in fields)}), got {len(parts)}: {line[:80]!r}")
                for column, value in zip(raw, parts):
                    column.append(value)
                lines.append(number)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error})") from None
    lines = np.array(lines, np.int64)
    columns = {f.name: _typed(values, f, path, lines, seq_separator) for f, values in zip(fields, raw)}
    return AtomicFile(path, fields, columns, lines)


def _read_atomic_arrow(path: pathlib.Path) -> AtomicFile | None:
    """The atomic file through `pyarrow.csv` when every field is token or float and the file is
    clean (None otherwise: the caller reads it line by line)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pv

    try:
        with open(path, encoding="utf-8", newline="") as handle:
            fields = _parse_header(handle.readline().rstrip("\r\n"), path)
    except UnicodeDecodeError:
        return None
    if any(f.type not in ("token", "float") for f in fields):
        return None
    try:
        table = pv.read_csv(
            path, read_options=pv.ReadOptions(column_names=[f.name for f in fields], skip_rows=1,
                                              block_size=1 << 26),
            parse_options=pv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                          newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pv.ConvertOptions(
                column_types={f.name: pa.string() for f in fields}, strings_can_be_null=False,
                quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError):
        return None
    columns = {}
    for field in fields:
        column = table.column(field.name)
        if field.type == "token":
            columns[field.name] = column.to_numpy(zero_copy_only=False).astype(object)
            continue
        try:  # "" is missing (NaN), as parse_number reads it
            blank = pc.equal(column, "")
            numbers = pc.if_else(blank, pa.scalar(None, pa.string()), column).cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None  # a value that is not a number: named by the line reader
        columns[field.name] = numbers.to_numpy(zero_copy_only=False)
    lines = np.arange(2, table.num_rows + 2, dtype=np.int64)
    if table.num_rows and (np.any(columns[fields[0].name] == "") if fields[0].type == "token"
                           else False):
        return None  # blank lines (or an empty first field): the line reader skips or names them
    return AtomicFile(path, fields, columns, lines)


def read_parquet(path: str | os.PathLike) -> AtomicFile:
    """Reads a Parquet file as an atomic file: each column's type comes from its Parquet type
    (strings and integers -> token, floating point -> float, lists of those -> token_seq /
    float_seq). Columns are converted whole by Arrow, never a Python object per value except
    the token strings themselves. `lines` holds row numbers (1 = the first row), so errors name
    `file:row`. Nulls read as empty: "" for a token (which an ID field refuses), NaN for a float."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    fields, columns = [], {}
    for name, column in zip(table.column_names, table.columns):
        kind = _parquet_kind(column.type)
        if kind is None:
            raise DataError(f"{path}: column {name!r} has Parquet type {column.type}; expected "
                            "strings or integers (token), floating point (float), or lists of "
                            "those (token_seq, float_seq)")
        fields.append(Field(name, kind))
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if kind == "token":
            columns[name] = np.array(column.cast(pa.string()).fill_null("").to_pylist(), dtype=object)
        elif kind == "float":
            columns[name] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        else:
            values = column.to_pylist()
            out = np.empty(len(values), dtype=object)
            if kind == "token_seq":
                out[:] = [tuple(str(v) for v in row) if row else () for row in values]
            else:
                out[:] = [np.array([math.nan if v is None else v for v in row], np.float64)
                          if row else np.zeros(0) for row in values]
            columns[name] = out
    return AtomicFile(path, tuple(fields), columns, np.arange(1, table.num_rows + 1, dtype=np.int64))


def _parquet_kind(arrow_type) -> str | None:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) \
            or pa.types.is_integer(arrow_type):
        return "token"
    if pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "float"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = _parquet_kind(arrow_type.value_type)
        return {"token": "token_seq", "float": "float_seq"}.get(inner)
    return None


def _typed(values: list[str], field: Field, path: pathlib.Path, lines: np.ndarray,
           separator: str) -> np.ndarray:
    if field.type == "token":
        return np.array(values, dtype=object)
    if field.type == "token_seq":
        column = np.empty(len(values), dtype=object)
        column[:] = [tuple(v.split(separator)) if v else () for v in values]
        return column
    if field.type == "float":
        out = np.empty(len(values), np.float64)
        for row, value in enumerate(values):
            out[row] = parse_number(value, path, lines[row], field)
        return out
    column = np.empty(len(values), dtype=object)
    column[:] = [np.array([parse_number(v, path, lines[row], field) for v in value.split(separator)]
                          if value else [], np.float64) for row, value in enumerate(values)]
    return column


def parse_number(text: str, path: pathlib.Path, line: int, field: Field) -> float:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}:{line}: field {field.name!r} is {field.type}, got {text!r}, "
                        "not a number") from None


def id_key(identifier: str) -> tuple[int, str]:
    """Numeric IDs in numeric order, anything else after them in string order."""
    return (int(identifier), "") if identifier.isdigit() else (1 << 62, identifier)



def write_atomic(path: pathlib.Path, payload: bytes | Iterable[bytes]) -> None:
    """Writes `payload` (bytes, or chunks of bytes written as they come) to a temporary file beside
    `path`, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for chunk in (payload,) if isinstance(payload, (bytes, bytearray)) else payload:
                handle.write(chunk)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files owner-only; keep the usual mode
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def replace_folder(out: pathlib.Path, staging: pathlib.Path) -> None:
    """Swaps a finished staging folder in for `out`: a rerun replaces the output whole, and a
    failed run (whose staging folder is never swapped in) leaves the previous output as it was."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
