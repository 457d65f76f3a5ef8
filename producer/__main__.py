"""``python -m producer``: classify one text, or a whole file, through the worker fleet.

    python -m producer classify "무료 쿠폰 당첨! 지금 클릭"
    python -m producer batch messages.csv --out results.jsonl
    python -m producer batch messages.csv --out results.jsonl --resume    # after an interruption
    python -m producer evaluate labeled.csv --out report.json --plot report.png --model all
    python -m producer stats
    python -m producer reload --model exaone    # after pointing EXAONE_ADAPTER_DIR at a retrained adapter

Every error is one line on stderr, ``producer <command>: <what went wrong>``, and an exit code:

    0    done
    1    a task was refused or failed (ModelUnavailable, ClassificationFailed, ...), a batch job stopped, or
         evaluate had more records fail than --max-errors (its report is written all the same)
    2    invalid input or usage: a text the workers refuse (InvalidInput), a bad option, file, label or setting
    3    the broker or the result backend cannot be reached (checked first, within a few seconds)
    4    no result within --timeout
    130  interrupted (Ctrl-C)

``reload`` keeps the exit codes of the rollout it reports: 0 every worker switched, was unchanged or
was skipped (it does not load that model), 1 a worker refused the new version (every process keeps
serving the old one) or no worker loads the model, 2 a worker did not answer within --timeout (or none
answered); 3 as above.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from producer import connection
from producer.client import SpamClient
from producer.contract import MODELS, InvalidInput
from producer.files import INPUT_FORMATS, LABEL_HINT, OUTPUT_FORMATS, detect_format
from producer.jobs import BatchJob, JobError, JobSpec
from producer.settings import ProducerSettingsError

log = logging.getLogger("producer")

EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
CONNECT_TIMEOUT_S = 5.0
"""How long the up-front check may try to reach the broker and the result backend."""


class CliError(Exception):
    """A failure reported as one line with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``producer batch: the following arguments are required: --out``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_INVALID, f"{self.prog.removeprefix('python -m ')}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + __doc__.split("an exit code:\n\n", 1)[1]
    parser = _Parser(prog="python -m producer", description=__doc__.splitlines()[0], epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a result")
    sub = parser.add_subparsers(dest="command", required=True)
    common = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}

    one = sub.add_parser("classify", help="classify one text and print the result as JSON", **common)
    one.add_argument("text")
    one.add_argument("--model", choices=MODELS, default="auto")

    many = sub.add_parser("batch", help="classify every record of a file", **common)
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

    ev = sub.add_parser("evaluate", help="score a labeled .csv/.jsonl file and write a metrics report (JSON)",
                        **common)
    ev.add_argument("input", type=Path, help=f"records with a text and a {LABEL_HINT} label")
    ev.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    ev.add_argument("--plot", type=Path, help="also draw score histograms, PR curves and the cascade (PNG)")
    ev.add_argument("--model", choices=("auto", "koelectra", "exaone", "all"), default="auto",
                    help="all: both models score every message, and the report adds the cascade band grid")
    ev.add_argument("--field", default="text", help="CSV column or JSONL field holding the text")
    ev.add_argument("--label-field", default="label", help="CSV column or JSONL field holding the label")
    ev.add_argument("--band", help="low,high: the cascade band to mark and derive auto from (default: "
                    "CASCADE_BAND from the environment or .env, else 0.2,0.8; empty: no escalation)")
    ev.add_argument("--chunk-size", type=_positive, default=64, help="texts per batch task")
    ev.add_argument("--window", type=_positive, default=8, help="batch tasks in flight at once")
    ev.add_argument("--max-errors", type=_non_negative, default=0,
                    help="records the workers may fail to score before the command exits 1 (default 0)")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("stats", help="print every worker's models, load figures and memory, and the dead-lettered "
                   "messages", **common)

    rl = sub.add_parser("reload", help="roll the workers onto the model files their settings name now", **common)
    rl.add_argument("--model", choices=("all", "koelectra", "exaone"), default="all")
    rl.add_argument("--destination", nargs="+", metavar="WORKER", help="only these workers (e.g. celery@host)")
    rl.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                    help="seconds to wait for every worker to switch (default 300)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: any failure is one line and an exit code
        log.debug("failure", exc_info=True)
        code, message = describe(exc, args.timeout)
    print(f"producer {args.command}: {one_line(message)}", file=sys.stderr)
    return code


def describe(exc: BaseException, timeout: float) -> tuple[int, str]:
    """The exit code and message for a failure: see the module docstring."""
    from celery.exceptions import TimeoutError as ResultTimeout

    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, ProducerSettingsError):
        return EXIT_INVALID, f"invalid setting {exc}"
    if isinstance(exc, InvalidInput):
        return EXIT_INVALID, str(exc)
    if isinstance(exc, ResultTimeout):
        return EXIT_TIMEOUT, f"no result within {timeout:g} s (--timeout)"
    if connection.lost_connection(exc):
        return EXIT_UNREACHABLE, f"lost the connection to Redis: {exc}"
    from producer.evaluate import EvaluationError, MissingExtra

    if isinstance(exc, EvaluationError | MissingExtra | OSError):  # OSError: e.g. the report cannot be written
        return EXIT_INVALID, str(exc)
    return EXIT_FAILED, f"{type(exc).__name__}: {exc}"  # any other task failure, e.g. ModelUnavailable


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "failed"


def check_reachable(client: SpamClient, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within a few times ``timeout``, naming the URL without its password, when the broker or the
    result backend does not answer (refused, unreachable, or a server that never replies): otherwise
    sending would retry, and waiting block, for minutes."""
    from kombu.utils.url import maybe_sanitize_url

    app = client.app
    options = {"socket_connect_timeout": timeout, "socket_timeout": timeout, "retry_on_timeout": False}
    with app.connection_for_write(transport_options=options, connect_timeout=timeout) as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.5, interval_max=1.0,
                                   timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported as one line with the URL
            url = maybe_sanitize_url(str(app.conf.broker_url))
            raise CliError(f"cannot reach the broker at {url}: {exc}", EXIT_UNREACHABLE) from exc
    backend = app.backend
    if not hasattr(backend, "connparams"):  # not a Redis result backend: nothing to ping
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # A pool of its own, with timeouts, for one PING: the backend's own client keeps its settings.
    params = {**backend.connparams, "socket_connect_timeout": timeout, "socket_timeout": timeout,
              "retry": Retry(NoBackoff(), 0)}
    pool = backend.redis.ConnectionPool(**params)
    try:
        backend.redis.Redis(connection_pool=pool).ping()
    except Exception as exc:  # noqa: BLE001 - reported as one line with the URL
        url = maybe_sanitize_url(str(app.conf.result_backend))
        raise CliError(f"cannot reach the result backend at {url}: {exc}", EXIT_UNREACHABLE) from exc
    finally:
        pool.disconnect()


def _run(args: argparse.Namespace) -> int:
    prepared = None
    if args.command == "evaluate":  # check the extra and the whole file before anything is sent
        from producer.evaluate import require_extra, scan, settings_from_env

        require_extra(args.plot is not None)
        threshold, band, band_source = settings_from_env(args.band)
        for path in filter(None, (args.out, args.plot)):
            if not path.parent.is_dir():
                raise CliError(f"{path}: folder {path.parent} does not exist", EXIT_INVALID)
        try:
            labeled = scan(args.input, args.field, args.label_field)
        except ValueError as exc:  # an unreadable record or label, named by its line
            raise CliError(str(exc), EXIT_INVALID) from None
        prepared = (labeled, threshold, band, band_source)
    with SpamClient(timeout=args.timeout) as client:
        check_reachable(client)
        try:
            return _serve(client, args, prepared)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - described as one line below
            log.debug("failure", exc_info=True)
            code, message = (EXIT_INTERRUPTED, "interrupted") if isinstance(exc, KeyboardInterrupt) else \
                describe(exc, args.timeout)
    raise CliError(message, code)


def _serve(client: SpamClient, args: argparse.Namespace, prepared: tuple | None) -> int:
    """Run the command; ``prepared`` is evaluate's checked input, threshold, band and its source."""
    if args.command == "stats":
        from producer.stats_table import read_dead_letters, render, render_dead_letters

        print(render(client.app.control.inspect(timeout=min(args.timeout, 2.0)).stats() or {}))
        print(render_dead_letters(*read_dead_letters(client.app)))
        return 0
    if args.command == "classify":
        handle = client.submit(args.text, args.model)
        try:
            result = handle.get(timeout=args.timeout)
        finally:  # stop listening for it while connected: at exit, its __del__ would find the backend closed
            handle.forget()
        print(json.dumps(result, ensure_ascii=False))
        return 0
    if args.command == "reload":
        from producer.reload import exit_code, reload_fleet

        outcomes = reload_fleet(client.app, args.model, args.destination, args.timeout)
        for outcome in outcomes:
            print(f"{outcome.worker}: {outcome.line}")
        if not outcomes:
            raise CliError("no worker answered (is one running, on this broker?)", exit_code(outcomes))
        return exit_code(outcomes)
    if args.command == "evaluate":
        from producer.evaluate import evaluate
        from producer.metrics_report import summary

        report = evaluate(client, args, *prepared)
        print(summary(report), file=sys.stderr)
        print(f"report -> {args.out}" + (f", figure -> {args.plot}" if args.plot else ""), file=sys.stderr)
        failed = report["failed_records"]
        if failed > args.max_errors:
            raise CliError(f"{failed} of {report['records']} records could not be scored, more than --max-errors "
                           f"({args.max_errors}); their errors are counted in {args.out}", EXIT_FAILED)
        return 0
    return _batch(client, args)


def _batch(client: SpamClient, args: argparse.Namespace) -> int:
    """Run (or resume) a batch job; exit 2 when it cannot start, 1 when it stops (4 when on a timeout,
    3 when on a lost connection), 130 on Ctrl-C."""
    from tqdm import tqdm

    try:
        spec = JobSpec(args.input, args.out, detect_format(args.input, INPUT_FORMATS, args.input_format),
                       detect_format(args.out, OUTPUT_FORMATS, args.output_format), args.field, args.model,
                       args.chunk_size)
        job = BatchJob.open(client, spec, resume=args.resume, overwrite=args.overwrite, window=args.window,
                            timeout=args.timeout)
    except (JobError, ValueError, OSError) as exc:
        print(f"producer batch: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_INVALID
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
            print(f"producer batch: {one_line(str(exc))}", file=sys.stderr)
            cause = exc.__cause__
            code = describe(cause, args.timeout)[0] if isinstance(cause, Exception) else EXIT_FAILED
            return code if code in (EXIT_TIMEOUT, EXIT_UNREACHABLE) else EXIT_FAILED
        except KeyboardInterrupt:
            bar.close()
            print(f"producer batch: interrupted; {state.written} of {state.total} records are written; "
                  "run again with --resume to go on", file=sys.stderr)
            return EXIT_INTERRUPTED
    resumed = "" if summary.resumed_at is None else (
        f" (resumed at {summary.resumed_at}: {summary.reattached} chunks re-attached, {summary.resent} sent again)")
    print(f"{summary.written} records, {summary.errors} errors -> {args.out}{resumed}", file=sys.stderr)
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number of 0 or more")
    return number


if __name__ == "__main__":
    sys.exit(main())
