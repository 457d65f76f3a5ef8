"""Read texts from text, CSV or JSONL files and write results as JSONL or CSV, streaming both."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

INPUT_FORMATS = ("txt", "csv", "jsonl")
OUTPUT_FORMATS = ("jsonl", "csv")
OUTPUT_COLUMNS = ("index", "label", "spam_score", "model", "truncated", "error")


def detect_format(path: Path, allowed: tuple[str, ...], given: str | None = None) -> str:
    fmt = (given or path.suffix.lstrip(".") or "txt").lower()
    fmt = {"json": "jsonl", "ndjson": "jsonl", "text": "txt", "tsv": "csv"}.get(fmt, fmt)
    if fmt not in allowed:
        raise ValueError(f"{path}: format {fmt!r} is not one of {', '.join(allowed)}")
    return fmt


def read_texts(path: Path, fmt: str, field: str = "text") -> Iterator[str]:
    """Yield one text per record; a record without the field is an error naming its line."""
    with path.open(encoding="utf-8", newline="") as fh:
        if fmt == "txt":
            for line in fh:
                yield line.rstrip("\r\n")
        elif fmt == "csv":
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or field not in reader.fieldnames:
                raise ValueError(f"{path}: no column {field!r} (columns: {reader.fieldnames})")
            for row in reader:
                yield row[field]
        else:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}:{number}: no field {field!r}")
                yield record[field]


def count_records(path: Path, fmt: str) -> int:
    with path.open("rb") as fh:
        lines = sum(1 for line in fh if fmt != "jsonl" or line.strip())
    return lines - 1 if fmt == "csv" else lines


class ResultWriter:
    """Writes result rows in the chosen format; one row per input record, in input order."""

    def __init__(self, fh: IO[str], fmt: str) -> None:
        self.fh = fh
        self.fmt = fmt
        self.csv = csv.DictWriter(fh, fieldnames=OUTPUT_COLUMNS, extrasaction="ignore") if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, index: int, result: dict) -> None:
        row = {"index": index, **result}
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
