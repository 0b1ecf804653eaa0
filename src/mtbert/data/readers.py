"""Readers for the task data files: delimited text (TSV/CSV) and JSON lines.

Columns are found by header name (in a file without a header, by the names given to its
fields in order), malformed rows are skipped (and logged) unless reading strictly, and any
file content, however broken, either reads or raises :class:`DataError`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 20
# Bytes that are not valid UTF-8 decode (with "surrogateescape") to lone surrogates.
_NOT_UTF8 = re.compile("[\ud800-\udfff]")
# Large enough for any realistic field, small enough for a C long on every platform.
_FIELD_SIZE_LIMIT = 2**31 - 1
_FORMATS = ("tsv", "csv", "jsonl")
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}  # a quote is text under "none"
_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}
STDIN = Path("<stdin>")  # the path `iter_examples` gives standard input (by identity)


class DataError(ValueError):
    """Data cannot be used; the message names the file and line (or the input) at fault."""


@dataclass(frozen=True, slots=True)
class Example:
    """One task example: its id, one or two stripped texts, and the label if labelled."""

    id: str
    texts: tuple[str, ...]
    label: float | None


@dataclass
class ReadReport:
    """What reading a file produced: the examples and the (line, reason) of skipped rows.

    `listed` bounds the skipped rows kept in `skipped` (None: all of them), so a stream over
    a large file holds a constant amount; `skipped_count` counts them all."""

    path: Path
    examples: list[Example]
    skipped: list[tuple[int, str]]
    listed: int | None = None
    skipped_count: int = 0


class _MalformedRow(Exception):
    """A row that cannot be read; skipped, or fatal when reading strictly."""


class _InvalidLabel(Exception):
    """A numeric label outside the declared classes or range; always fatal."""


@dataclass(frozen=True)
class _Schema:
    """Which columns to read and which labels are valid."""

    text_columns: tuple[str, ...]
    label_column: str | None
    id_column: str
    num_classes: int | None
    label_range: tuple[float, float] | None
    id_required: bool = False
    label_names: tuple[str, ...] = ()  # a label equal to one of these reads as its index

    def __post_init__(self) -> None:
        if not self.text_columns:
            raise ValueError("text_columns must name at least one column")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.label_range is not None:
            low, high = self.label_range
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(
                    f"label_range must be finite with lo <= hi, got {self.label_range}"
                )

    @property
    def required_columns(self) -> tuple[str, ...]:
        label = () if self.label_column is None else (self.label_column,)
        named_id = (self.id_column,) if self.id_required else ()
        return self.text_columns + label + named_id

    def check_label(self, label: float) -> None:
        """Raise _InvalidLabel if the label is not one of the declared classes or in range."""
        if self.num_classes is not None and not (
            label.is_integer() and 0 <= label < self.num_classes
        ):
            raise _InvalidLabel(f"label {label:g} is not a class in 0..{self.num_classes - 1}")
        if self.label_range is not None:
            low, high = self.label_range
            if not low <= label <= high:
                raise _InvalidLabel(f"label {label:g} is outside [{low:g}, {high:g}]")


def read_examples(path: str | Path, text_columns: Sequence[str], label_column: str | None,
                  **options: Any) -> ReadReport:
    """The examples of a file, in a list, as `stream_examples(path, ...)` reads them."""
    report = ReadReport(path=Path(path), examples=[], skipped=[])
    report.examples.extend(stream_examples(path, text_columns, label_column, report=report,
                                           **options))
    return report


def stream_examples(
    path: str | Path,
    text_columns: Sequence[str],
    label_column: str | None,
    *,
    id_column: str = "id",
    num_classes: int | None = None,
    label_range: tuple[float, float] | None = None,
    strict: bool = False,
    file_format: str | None = None,
    max_skipped_share: float | None = None,
    quoting: str = "minimal",
    columns: Sequence[str] | None = None,
    label_names: Sequence[str] = (),
    report: ReadReport | None = None,
) -> Iterator[Example]:
    """Read the examples of a TSV, CSV or JSON-lines file one at a time (memory does not grow
    with the file), selecting columns by name.

    ``label_column=None`` reads an unlabelled file (labels are None). If the file has no
    ``id_column``, ids are the 0-based data row index. ``num_classes`` or
    ``label_range`` declare the valid labels; a numeric label outside them raises
    DataError. Malformed rows are skipped and logged, or raise DataError if ``strict``.
    ``file_format`` is "tsv", "csv" or "jsonl"; by default it follows the suffix, and a
    file that is neither .jsonl/.json nor .tsv is JSON lines if its first line is a JSON
    object, else tab-separated if its header line has a tab, else comma-separated. Text is
    decoded as UTF-8 (a BOM is allowed); NUL bytes are dropped; a file that looks UTF-16 is
    an error. Delimited files hold one record per line (quotes may wrap a field but not run
    past its line). ``max_skipped_share`` makes it an error when more than that share of the
    data rows is malformed: checked, like the summary logged, after the last example, so a
    reader of the stream must reach its end before trusting what it read. ``quoting="none"``
    reads every quote as text (GLUE's files). ``columns`` names the fields of a file without
    a header line, in order (its first line is data). A label equal to one of
    ``label_names`` reads as that name's index. Skipped rows go to ``report`` when given.
    """
    schema = _schema(text_columns, label_column, id_column, num_classes, label_range,
                     label_names=label_names)
    path = Path(path)
    report = report or ReadReport(path=path, examples=[], skipped=[])
    read = 0
    for example in _stream(path, schema, file_format, strict, report, quoting, columns):
        read += 1
        yield example
    _log_outcome(report, read)
    if max_skipped_share is not None:
        check_skipped_share(report, read, max_skipped_share)


def check_skipped_share(report: ReadReport, read: int, max_share: float) -> None:
    """Raise DataError when more than `max_share` of the rows (`read` examples plus the
    skipped ones), or all of them, were malformed."""
    skipped = report.skipped_count
    rows = read + skipped
    if skipped and (not read or skipped > max_share * rows):
        first_line, reason = report.skipped[0]
        share = "all of them" if not read else f"more than {max_share:.0%}"
        raise DataError(f"{report.path}: {skipped} of {rows} rows are malformed "
                        f"({share}); first at line {first_line}: {reason}")


def iter_examples(
    path: str | Path,
    text_columns: Sequence[str],
    label_column: str | None = None,
    *,
    id_column: str = "id",
    strict: bool = False,
    file_format: str | None = None,
    report: ReadReport | None = None,
    id_required: bool = False,
    quoting: str = "minimal",
    columns: Sequence[str] | None = None,
) -> Iterator[Example]:
    """The examples of a file one at a time, as `read_examples` reads them, in constant
    memory; `path` "-" reads standard input. Skipped rows are logged with file:line and
    appended to `report.skipped` when a report is given. `id_required`: a file without
    `id_column` is an error (a row without it, malformed) instead of numbered rows."""
    schema = _schema(text_columns, label_column, id_column, None, None, id_required)
    path = STDIN if str(path) == "-" else Path(path)
    yield from _stream(path, schema, file_format, strict,
                       report or ReadReport(path=path, examples=[], skipped=[]), quoting,
                       columns)


def _schema(text_columns: Sequence[str], label_column: str | None, id_column: str,
            num_classes: int | None, label_range: tuple[float, float] | None,
            id_required: bool = False, label_names: Sequence[str] = ()) -> _Schema:
    if isinstance(text_columns, str):
        raise ValueError("text_columns must be a sequence of column names, not a str")
    return _Schema(tuple(text_columns), label_column, id_column, num_classes, label_range,
                   id_required, tuple(label_names))


def _stream(path: Path, schema: _Schema, file_format: str | None, strict: bool,
            report: ReadReport, quoting: str = "minimal",
            columns: Sequence[str] | None = None) -> Iterator[Example]:
    if quoting not in QUOTING:
        raise ValueError(f"quoting must be one of {tuple(QUOTING)}, got {quoting!r}")
    resolved_format = _resolve_format(path, file_format)
    newline = "\n" if resolved_format == "jsonl" else ""
    with _open_text(path, newline) as stream:
        lines = _without_nul(stream)
        if resolved_format is None:
            first = next(lines, "")
            lines = itertools.chain([first], lines)
            resolved_format = "jsonl" if first.lstrip().startswith("{") else None
        if resolved_format == "jsonl":
            records, extract = _jsonl_records(lines), _json_object
        else:
            records, extract = _delimited_source(lines, path, resolved_format, schema,
                                                 QUOTING[quoting], columns)
        yield from _examples(path, records, extract, schema, strict, report)


def _resolve_format(path: Path, file_format: str | None) -> str | None:
    """The file format, or None when the delimiter is to be sniffed from the header."""
    if file_format is None:
        return _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if file_format not in _FORMATS:
        raise ValueError(f"file_format must be one of {_FORMATS}, got {file_format!r}")
    return file_format


@contextlib.contextmanager
def _open_text(path: Path, newline: str) -> Iterator[TextIO]:
    if path is STDIN:
        stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig",
                                  errors="surrogateescape", newline=newline)
        try:
            yield stream
        finally:
            stream.detach()  # leave sys.stdin open
        return
    try:
        with open(path, "rb") as raw:
            head = raw.read(4096)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head.count(0) > len(head) // 10:
            raise DataError(f"{path}: looks UTF-16 encoded (byte-order mark or NUL bytes); "
                            "save it as UTF-8")
        stream = open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: cannot open: it is a folder, not a data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot open: {error.strerror or error}") from None
    with stream:
        yield stream


def _without_nul(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        yield line.replace("\0", "")


def _delimited_source(
    lines: Iterator[str], path: Path, file_format: str | None, schema: _Schema,
    quoting: int = csv.QUOTE_MINIMAL, columns: Sequence[str] | None = None,
) -> tuple[Iterator[tuple[int, list[str]]], partial[dict[str, str]]]:
    """Records after the header (all of them when `columns` names the fields of a file
    without one), and a function mapping a record to its values by name."""
    header_line = next(lines, "")
    delimiter = _pick_delimiter(file_format, header_line)
    records = _csv_records(itertools.chain([header_line], lines), delimiter, path, quoting)
    if columns is not None:
        names = list(columns)
    else:
        header = next(records, None)
        if header is None:
            raise DataError(f"{path}: file is empty")
        if isinstance(header[1], _MalformedRow):
            raise DataError(f"{path}:{header[0]}: header: {header[1]}")
        names = header[1]
    positions = _column_positions(names, schema, path)
    return records, partial(_fields_by_name, positions=positions, width=len(names))


def _pick_delimiter(file_format: str | None, header_line: str) -> str:
    if file_format == "tsv":
        return "\t"
    if file_format == "csv":
        return ","
    return "\t" if "\t" in header_line else ","


def _csv_records(
    lines: Iterable[str], delimiter: str, path: Path, quoting: int = csv.QUOTE_MINIMAL
) -> Iterator[tuple[int, list[str] | _MalformedRow]]:
    """Yield (line number, fields) for each non-blank line: one record per line.

    Quotes may wrap a field, but a quoted field never runs past its line: in these corpora a
    stray quote is text, and letting the CSV parser follow it would swallow the rest of the
    file into one field. A line whose quoting does not parse is yielded as a malformed row.
    Under `csv.QUOTE_NONE` every quote is text.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_SIZE_LIMIT))
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\r\n")
        if not text:
            continue
        try:
            yield number, next(csv.reader([text], delimiter=delimiter, strict=True,
                                          quoting=quoting))
        except csv.Error as error:
            yield number, _MalformedRow(f"quoting does not parse on this line ({error})")


def _column_positions(header: list[str], schema: _Schema, path: Path) -> dict[str, int]:
    """Map each wanted column name to its field index; the id column is optional."""
    names = [name.strip() for name in header]
    missing = [column for column in schema.required_columns if column not in names]
    if missing:
        raise DataError(
            f"{path}: header lacks column(s) {', '.join(map(repr, missing))}; "
            f"columns found: {names!r}"
        )
    wanted = [*schema.required_columns, schema.id_column]
    repeated = sorted({column for column in wanted if names.count(column) > 1})
    if repeated:
        raise DataError(f"{path}: header repeats column(s) {', '.join(map(repr, repeated))}")
    return {column: names.index(column) for column in wanted if column in names}


def _fields_by_name(
    fields: list[str] | _MalformedRow, positions: Mapping[str, int], width: int
) -> dict[str, str]:
    if isinstance(fields, _MalformedRow):
        raise fields
    needed = max(positions.values()) + 1
    if len(fields) < needed:
        raise _MalformedRow(f"row has {len(fields)} fields, needs at least {needed}")
    if len(fields) > width:  # e.g. an unquoted comma in a text: its fields would shift
        raise _MalformedRow(f"row has {len(fields)} fields, the header {width} (a delimiter "
                            "inside an unquoted text?)")
    return {column: fields[index] for column, index in positions.items()}


def _jsonl_records(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) for each non-blank line."""
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield number, line


def _json_object(line: str) -> dict[str, object]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        raise _MalformedRow("line is not valid JSON") from None
    if not isinstance(value, dict):
        raise _MalformedRow("line is not a JSON object")
    return value


def _examples(
    path: Path,
    records: Iterable[tuple[int, Any]],
    extract: Callable[[Any], Mapping[str, object]],
    schema: _Schema,
    strict: bool,
    report: ReadReport,
) -> Iterator[Example]:
    """Turn records into examples, skipping (or, if strict, rejecting) malformed ones."""
    count = 0
    for row_index, (line, record) in enumerate(records):
        try:
            example = _build_example(extract(record), schema, row_index)
        except _InvalidLabel as error:
            raise DataError(f"{path}:{line}: {error}") from None
        except _MalformedRow as error:
            if strict:
                raise DataError(f"{path}:{line}: malformed row: {error}") from None
            _record_skip(report, line, str(error))
            continue
        count += 1
        yield example
    if not count and not report.skipped_count:
        raise DataError(f"{path}: no data rows")


def _build_example(values: Mapping[str, object], schema: _Schema, row_index: int) -> Example:
    example = Example(
        id=_read_id(values, schema.id_column, row_index, schema.id_required),
        texts=tuple(_read_text(values, column) for column in schema.text_columns),
        label=None if schema.label_column is None
        else _read_label(values, schema.label_column, schema.label_names),
    )
    if example.label is not None:
        schema.check_label(example.label)
    return example


def _read_id(values: Mapping[str, object], column: str, row_index: int,
             required: bool = False) -> str:
    if column not in values and not required:
        return str(row_index)
    value = values[column]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _read_text(values, column)


def _read_text(values: Mapping[str, object], column: str) -> str:
    if column not in values:
        raise _MalformedRow(f"missing {column!r}")
    value = values[column]
    if not isinstance(value, str):
        raise _MalformedRow(f"{column!r} is not a string")
    text = value.strip()
    if not text:
        raise _MalformedRow(f"empty {column!r}")
    if _NOT_UTF8.search(text):
        raise _MalformedRow(f"{column!r} holds bytes that are not valid UTF-8")
    return text


def _read_label(values: Mapping[str, object], column: str,
                label_names: tuple[str, ...] = ()) -> float:
    if column not in values:
        raise _MalformedRow(f"missing {column!r}")
    value = values[column]
    if isinstance(value, str) and not value.strip():
        raise _MalformedRow(f"empty {column!r}")
    if isinstance(value, str) and value.strip() in label_names:
        return float(label_names.index(value.strip()))
    label = _as_number(value)
    if label is None:
        names = f" nor one of the label names {list(label_names)}" if label_names else ""
        raise _MalformedRow(f"{column!r} value {value!r} is not a number{names}")
    if not math.isfinite(label):
        raise _MalformedRow(f"{column!r} value {value!r} is not finite")
    return label


def _as_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _record_skip(report: ReadReport, line: int, reason: str) -> None:
    report.skipped_count += 1
    if report.listed is None or len(report.skipped) < report.listed:
        report.skipped.append((line, reason))
    if report.skipped_count <= _MAX_LOGGED_SKIPS:
        logger.warning("%s:%d: skipped row: %s", report.path, line, reason)


def _log_outcome(report: ReadReport, read: int) -> None:
    unlogged = report.skipped_count - _MAX_LOGGED_SKIPS
    if unlogged > 0:
        logger.warning(
            "%s: %d more malformed rows skipped, not logged individually", report.path, unlogged
        )
    logger.log(
        logging.WARNING if report.skipped_count else logging.INFO,
        "%s: read %d examples, skipped %d malformed rows",
        report.path,
        read,
        report.skipped_count,
    )
