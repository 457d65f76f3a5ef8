"""Read texts from text, CSV or JSONL files and write results as JSONL or CSV, streaming both.

Files are read as people save them: a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, and
CRLF line ends are fine; labels may be spam/ham, 스팸/정상, 1/0 or true/false in any case.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

ENCODING = "utf-8-sig"
"""UTF-8, with or without the byte-order mark Excel writes first."""
INPUT_FORMATS = ("txt", "csv", "jsonl")
OUTPUT_FORMATS = ("jsonl", "csv")
OUTPUT_COLUMNS = ("index", "label", "spam_score", "model", "model_version", "precision", "escalated", "koelectra_score",
                  "koelectra_version", "koelectra_precision", "truncated", "error")
"""CSV columns: what decided each row (``model_version``, ``precision``; KoELECTRA's too when it escalated),
so a job that spans a rollout can be attributed. A field a result lacks is an empty cell."""


def detect_format(path: Path, allowed: tuple[str, ...], given: str | None = None) -> str:
    fmt = (given or path.suffix.lstrip(".") or "txt").lower()
    fmt = {"json": "jsonl", "ndjson": "jsonl", "text": "txt", "tsv": "csv"}.get(fmt, fmt)
    if fmt not in allowed:
        raise ValueError(f"{path}: format {fmt!r} is not one of {', '.join(allowed)}")
    return fmt


def read_texts(path: Path, fmt: str, field: str = "text") -> Iterator[str]:
    """Yield one text per record; a record that cannot be read is an error naming its line."""
    try:
        with path.open(encoding=ENCODING, newline="") as fh:
            if fmt == "txt":
                for line in fh:
                    yield line.rstrip("\r\n")
            else:
                yield from (values[0] for _, values in _records(path, fh, fmt, (field,)))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _records(path: Path, fh: IO[str], fmt: str, fields: tuple[str, ...]) -> Iterator[tuple[int, list]]:
    """``(line number, [value of each field])`` per CSV row or JSONL record; a record that cannot be
    read, or lacks a field, is an error naming its line."""
    if fmt == "csv":
        reader = csv.DictReader(fh)
        try:
            for column in fields:
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise ValueError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
            for row in reader:
                # line_num is the line the record ends on: its own line unless a quoted field spans lines
                yield reader.reader.line_num, [row[f] for f in fields]
        except csv.Error as exc:
            raise ValueError(f"{path}:{reader.reader.line_num}: {exc}") from None
        return
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        for name in fields:
            if not isinstance(record, dict) or name not in record:
                raise ValueError(f"{path}:{number}: no field {name!r}")
        yield number, [record[f] for f in fields]


def count_records(path: Path, fmt: str, field: str = "text") -> int:
    """Records in the file, read the way :func:`read_texts` reads them: a CSV field holding a line
    break counts once, and a bad record fails here, before any of the file is sent."""
    return sum(1 for _ in read_texts(path, fmt, field))


class ResultWriter:
    """Writes result rows in the chosen format; one row per input record, in input order.

    ``index`` is the record's place in the whole input: it replaces the ``index`` of a batch item
    error, which counts within its batch task. ``header=False`` continues a CSV file that has one
    (``columns``: that file's).
    """

    def __init__(self, fh: IO[str], fmt: str, header: bool = True, columns: tuple[str, ...] = OUTPUT_COLUMNS) -> None:
        self.fh = fh
        self.fmt = fmt
        self.csv = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore") if fmt == "csv" else None
        if self.csv is not None and header:
            self.csv.writeheader()

    def write(self, index: int, result: dict) -> None:
        row = {"index": index, **{k: v for k, v in result.items() if k != "index"}}
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")


LABEL_WORDS = {"spam": True, "스팸": True, "1": True, "true": True,
               "ham": False, "정상": False, "0": False, "false": False}
"""Accepted labels (case-insensitive, surrounding whitespace ignored): spam is the positive class."""
LABEL_HINT = "spam/ham, 스팸/정상, 1/0 or true/false"


def parse_label(raw: object) -> bool:
    """``True`` for spam, ``False`` for ham; a ``ValueError`` for anything else. JSON booleans and the
    integers 0/1 are accepted as well as their spellings."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        raw = str(raw)
    if isinstance(raw, str):
        found = LABEL_WORDS.get(raw.strip().lower())
        if found is not None:
            return found
    raise ValueError(f"label {raw!r} is not {LABEL_HINT}")


def read_labeled(path: Path, fmt: str, field: str = "text", label_field: str = "label") -> Iterator[tuple[str, bool]]:
    """Yield ``(text, is_spam)`` per record of a labeled CSV or JSONL file; a record that cannot be
    read or whose label is not one of :data:`LABEL_WORDS` is an error naming its line."""
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"{path}: a labeled file is .csv or .jsonl, not {fmt!r}")
    try:
        with path.open(encoding=ENCODING, newline="") as fh:
            for number, (text, raw) in _records(path, fh, fmt, (field, label_field)):
                try:
                    yield text, parse_label(raw)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
