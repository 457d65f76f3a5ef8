"""``python -m producer``: classify one text, or a whole file, through the worker fleet.

    python -m producer classify "무료 쿠폰 당첨! 지금 클릭"
    python -m producer batch messages.csv --out results.jsonl
    python -m producer stats
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from producer.client import SpamClient
from producer.contract import MODELS
from producer.files import INPUT_FORMATS, OUTPUT_FORMATS, ResultWriter, count_records, detect_format, read_texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a result")
    sub = parser.add_subparsers(dest="command", required=True)

    one = sub.add_parser("classify", help="classify one text and print the result as JSON")
    one.add_argument("text")
    one.add_argument("--model", choices=MODELS, default="auto")

    many = sub.add_parser("batch", help="classify every record of a file")
    many.add_argument("input", type=Path)
    many.add_argument("--out", type=Path, required=True)
    many.add_argument("--model", choices=MODELS, default="auto")
    many.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from the file extension")
    many.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: from the file extension")
    many.add_argument("--field", default="text", help="CSV column or JSONL field holding the text")
    many.add_argument("--chunk-size", type=int, default=64, help="texts per batch task")
    many.add_argument("--no-progress", action="store_true")

    sub.add_parser("stats", help="print every worker's models, load figures and memory")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with SpamClient(timeout=args.timeout) as client:
        if args.command == "stats":
            from producer.stats_table import render

            print(render(client.app.control.inspect(timeout=min(args.timeout, 2.0)).stats() or {}))
            return 0
        if args.command == "classify":
            print(json.dumps(client.classify(args.text, args.model), ensure_ascii=False))
            return 0
        return _batch(client, args)


def _batch(client: SpamClient, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    in_fmt = detect_format(args.input, INPUT_FORMATS, args.input_format)
    out_fmt = detect_format(args.out, OUTPUT_FORMATS, args.output_format)
    total = count_records(args.input, in_fmt)
    texts = read_texts(args.input, in_fmt, args.field)
    errors = 0
    with args.out.open("w", encoding="utf-8", newline="") as fh, \
            tqdm(total=total, unit="msg", disable=args.no_progress, file=sys.stderr) as bar:
        writer = ResultWriter(fh, out_fmt)
        for index, result in enumerate(client.classify_many(texts, args.model, chunk_size=args.chunk_size)):
            writer.write(index, result)
            errors += "error" in result
            bar.update()
    print(f"{total} records, {errors} errors -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
