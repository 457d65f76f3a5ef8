"""``python -m producer``: classify one text, or a whole file, through the worker fleet.

    python -m producer classify "무료 쿠폰 당첨! 지금 클릭"
    python -m producer batch messages.csv --out results.jsonl
    python -m producer batch messages.csv --out results.jsonl --resume    # after an interruption
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
from producer.files import INPUT_FORMATS, OUTPUT_FORMATS, detect_format
from producer.jobs import BatchJob, JobError, JobSpec


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
    many.add_argument("--chunk-size", type=_positive, default=64, help="texts per batch task")
    many.add_argument("--window", type=_positive, default=8, help="batch tasks in flight at once")
    again = many.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the unfinished job writing --out (or start it if there is none)")
    again.add_argument("--overwrite", action="store_true", help="replace --out, dropping any unfinished job")
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
    """Run (or resume) a batch job; exit 2 when it cannot start, 1 when it stops, 130 on Ctrl-C."""
    from tqdm import tqdm

    try:
        spec = JobSpec(args.input, args.out, detect_format(args.input, INPUT_FORMATS, args.input_format),
                       detect_format(args.out, OUTPUT_FORMATS, args.output_format), args.field, args.model,
                       args.chunk_size)
        job = BatchJob.open(client, spec, resume=args.resume, overwrite=args.overwrite, window=args.window,
                            timeout=args.timeout)
    except (JobError, ValueError, OSError) as exc:
        print(f"batch: {exc}", file=sys.stderr)
        return 2
    state = job.state
    if job.resumed_at is not None:
        print(f"resuming {args.out} at record {state.written} of {state.total} "
              f"({len(state.in_flight)} chunks in flight)", file=sys.stderr)
    with job, tqdm(total=state.total, initial=state.written, unit="msg", disable=args.no_progress,
                   file=sys.stderr) as bar:
        try:
            summary = job.run(bar.update)
        except (JobError, ValueError, OSError) as exc:
            bar.close()
            print(f"batch: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            bar.close()
            print(f"batch: interrupted; {state.written} of {state.total} records are written; "
                  "run again with --resume to go on", file=sys.stderr)
            return 130
    resumed = "" if summary.resumed_at is None else (
        f" (resumed at {summary.resumed_at}: {summary.reattached} chunks re-attached, {summary.resent} sent again)")
    print(f"{summary.written} records, {summary.errors} errors -> {args.out}{resumed}", file=sys.stderr)
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


if __name__ == "__main__":
    sys.exit(main())
