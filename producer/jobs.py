"""A resumable batch job: every record of a file classified through the fleet, written in input order.

``SpamClient.classify_many`` streams results, but a file of millions of messages takes hours and an
interrupted run should not redo what was done. So the job writes its output strictly in input order
(one row per record) and, after each chunk, saves a small state file next to it (``<out>.job.json``,
replaced atomically): how many records and output bytes are final, and the ids of the chunk tasks
sent but not yet written. Resuming truncates the output to that length (dropping a torn row), skips
the written records and re-attaches to the recorded tasks, whose results wait in the result backend
(or whose messages wait in the queue), so a chunk is not classified twice.

Memory stays bounded whatever the file size: records are read lazily, and the job holds one chunk
of texts or results plus at most ``window`` task handles.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from itertools import islice
from pathlib import Path
from typing import IO, Any

from producer.files import OUTPUT_COLUMNS, ResultWriter, count_records, read_texts

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, the state file still works
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

STATE_VERSION = 1
GONE = ("FAILURE", "REVOKED")
"""Task states whose chunk is sent again on resume rather than waited for."""


class JobError(Exception):
    """The job cannot start or go on; the message says why and what to run instead."""


@dataclass(frozen=True)
class JobSpec:
    """What a job classifies and how; a resumed job must match the one that was started."""

    input: Path
    out: Path
    input_format: str
    output_format: str
    field: str = "text"
    model: str = "auto"
    chunk_size: int = 64


@dataclass
class JobState:
    """The state file's content. ``in_flight[i]`` is the task of the chunk ``i`` chunks after the
    written records, or ``None`` for a chunk to send again (it failed or timed out)."""

    input: str
    input_size: int
    input_mtime_ns: int
    input_format: str
    output_format: str
    field: str
    model: str
    chunk_size: int
    total: int
    written: int = 0
    errors: int = 0
    out_bytes: int = 0
    in_flight: list[str | None] = field(default_factory=list)
    saved_at: float = 0.0
    version: int = STATE_VERSION


@dataclass(frozen=True)
class Summary:
    """What a run did; ``resumed_at`` is None for a job started from scratch."""

    total: int
    written: int
    errors: int
    resumed_at: int | None
    reattached: int
    resent: int


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".job.json")


def save_state(path: Path, state: JobState) -> None:
    """Write to a temporary file and rename it over the old one: a crash leaves the old or the new."""
    state.saved_at = time.time()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(asdict(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> JobState:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
        return JobState(**data)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise JobError(f"{path}: unreadable job state ({exc}); start over with --overwrite") from None


def new_state(spec: JobSpec) -> JobState:
    """The state of a job not started yet; reads the whole input once to count (and check) it."""
    stat = spec.input.stat()
    total = count_records(spec.input, spec.input_format, spec.field)
    return JobState(
        input=str(spec.input.resolve()), input_size=stat.st_size, input_mtime_ns=stat.st_mtime_ns,
        input_format=spec.input_format, output_format=spec.output_format, field=spec.field,
        model=spec.model, chunk_size=spec.chunk_size, total=total,
    )


def mismatches(state: JobState, spec: JobSpec) -> list[str]:
    """How ``spec`` differs from the job recorded in ``state``; a resumed job must not differ."""
    stat = spec.input.stat()
    found = []
    if str(spec.input.resolve()) != state.input:
        found.append(f"the input is {state.input}")
    elif (stat.st_size, stat.st_mtime_ns) != (state.input_size, state.input_mtime_ns):
        found.append("the input file changed since the job started")
    for name in ("input_format", "output_format", "field", "model", "chunk_size"):
        if getattr(spec, name) != getattr(state, name):
            found.append(f"--{name.replace('_', '-')} was {getattr(state, name)!r}, not {getattr(spec, name)!r}")
    return found


def chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(islice(it, size)):
        yield chunk


@dataclass
class _Chunk:
    """A sent chunk: its number of texts and its task (the texts are not kept)."""

    size: int
    handle: Any  # a Celery AsyncResult


class BatchJob:
    """One batch job writing ``spec.out``. Use :meth:`open`, then :meth:`run`, as a context manager."""

    def __init__(self, client: Any, spec: JobSpec, state: JobState, fh: IO[str], resumed: bool,
                 window: int, timeout: float, columns: tuple[str, ...] = OUTPUT_COLUMNS) -> None:
        self.client, self.spec, self.state, self.fh = client, spec, state, fh
        self.resumed_at = state.written if resumed else None
        self.window, self.timeout = window, timeout
        self.writer = ResultWriter(fh, state.output_format, header=False, columns=columns)
        self.reattached = self.resent = 0

    @classmethod
    def open(cls, client: Any, spec: JobSpec, *, resume: bool = False, overwrite: bool = False,
             window: int = 8, timeout: float = 300.0) -> BatchJob:
        """Start a job, or with ``resume`` continue the unfinished one writing ``spec.out``.

        An existing output is never replaced without ``overwrite``. ``resume`` with neither an
        output nor a state file starts the job, so a retry loop can always pass it.
        """
        path = state_path(spec.out)
        if resume and overwrite:
            raise JobError("--resume and --overwrite exclude each other")
        if path.exists() and not overwrite:
            if not resume:
                raise JobError(f"{spec.out} belongs to an unfinished job ({path}): continue it with --resume, "
                               "or start over with --overwrite")
            state = load_state(path)
            if problems := mismatches(state, spec):
                raise JobError(f"cannot resume {spec.out}: " + "; ".join(problems)
                               + " (run it as before, or start over with --overwrite)")
            if not spec.out.exists():
                raise JobError(f"cannot resume: {spec.out} is missing; start over with --overwrite")
        elif spec.out.exists() and not overwrite:
            hint = "it has no unfinished job to resume" if resume else "pass --overwrite to replace it"
            raise JobError(f"{spec.out} exists; {hint}")
        else:
            state = None
        fresh = state is None
        if fresh:
            state = new_state(spec)
        columns = OUTPUT_COLUMNS if fresh or state.output_format != "csv" else _csv_columns(spec.out)
        fh = _open_locked(spec.out)
        try:
            if fresh:
                fh.truncate(0)
                ResultWriter(fh, state.output_format)  # the CSV header, once
                state.out_bytes = _sync(fh)
                save_state(path, state)
            else:
                _cut(fh, spec.out, state.out_bytes)
        except BaseException:
            fh.close()
            raise
        return cls(client, spec, state, fh, not fresh, window, timeout, columns)

    def run(self, progress: Callable[[int], object] = lambda n: None) -> Summary:
        """Classify the rest of the input; returns counts. On an error the state file stays and a
        ``JobError`` says to resume; results of chunks already written are never lost."""
        st = self.state
        pending = chunks(islice(read_texts(self.spec.input, st.input_format, st.field), st.written, None),
                         st.chunk_size)
        inflight: deque[_Chunk] = deque(self._reattach(task_id, pending) for task_id in st.in_flight)
        self._fill(inflight, pending)
        self._save(inflight)
        while inflight:
            head = inflight[0]
            results = self._wait(head, inflight)
            for offset, result in enumerate(results):
                self.writer.write(st.written + offset, result)
                st.errors += "error" in result
            st.out_bytes = _sync(self.fh)
            st.written += len(results)
            inflight.popleft()
            self._fill(inflight, pending)
            self._save(inflight)
            self._forget(head)
            progress(len(results))
        if st.written != st.total:
            log.warning("%s: wrote %d records, counted %d at the start", self.spec.out, st.written, st.total)
        self.fh.close()
        state_path(self.spec.out).unlink()
        return Summary(st.total, st.written, st.errors, self.resumed_at, self.reattached, self.resent)

    def _reattach(self, task_id: str | None, pending: Iterator[list[str]]) -> _Chunk:
        texts = next(pending, None)
        if texts is None:
            raise JobError(f"{self.spec.input} has fewer records than the job recorded; start over with --overwrite")
        if task_id is not None:
            handle = self.client.app.AsyncResult(task_id)
            status = handle.state
            if status not in GONE and not (status == "PENDING" and self._expired()):
                self.reattached += 1
                return _Chunk(len(texts), handle)
            log.info("sending chunk %s again: its task is %s", task_id, status)
        self.resent += 1
        return _Chunk(len(texts), self.client.submit_batch(texts, self.state.model))

    def _expired(self) -> bool:
        """A task still PENDING after the backend's result lifetime has likely finished and been
        dropped (or was lost): waiting for it would only time out."""
        expires = self.client.app.conf.result_expires
        seconds = expires.total_seconds() if isinstance(expires, timedelta) else expires
        return bool(seconds) and time.time() - self.state.saved_at > seconds

    def _fill(self, inflight: deque[_Chunk], pending: Iterator[list[str]]) -> None:
        while len(inflight) < self.window and (texts := next(pending, None)) is not None:
            try:
                handle = self.client.submit_batch(texts, self.state.model)
            except Exception as exc:
                self._save(inflight)  # the chunks sent before it are re-attached on resume
                raise JobError(f"cannot send a chunk ({type(exc).__name__}: {exc}); {self._hint()}") from exc
            inflight.append(_Chunk(len(texts), handle))

    def _wait(self, head: _Chunk, inflight: deque[_Chunk]) -> list[dict]:
        first = self.state.written
        try:
            results = head.handle.get(timeout=self.timeout)
        except Exception as exc:
            self._save(inflight, resend_head=True)
            raise JobError(f"records {first}..{first + head.size - 1} (task {head.handle.id}) failed: "
                           f"{type(exc).__name__}: {exc}; {self._hint()}") from exc
        if not isinstance(results, list) or len(results) != head.size:
            self._save(inflight, resend_head=True)
            raise JobError(f"task {head.handle.id} returned {type(results).__name__} for {head.size} texts; "
                           + self._hint())
        return results

    def _forget(self, chunk: _Chunk) -> None:
        """Drop a written chunk's result from the backend; only now, since until the state moved past
        it a resume needs it. A failure only leaves it to expire."""
        try:
            chunk.handle.forget()
        except Exception:
            log.warning("could not forget the result of task %s", chunk.handle.id, exc_info=True)

    def _save(self, inflight: deque[_Chunk], resend_head: bool = False) -> None:
        ids: list[str | None] = [c.handle.id for c in inflight]
        if resend_head:
            ids[0] = None
        self.state.in_flight = ids
        save_state(state_path(self.spec.out), self.state)

    def _hint(self) -> str:
        return f"{self.state.written} of {self.state.total} records are written; run again with --resume to go on"

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> BatchJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _csv_columns(out: Path) -> tuple[str, ...]:
    """The columns of a CSV output being resumed: a job that an older producer started keeps the
    header it wrote, so the rows added now line up with it."""
    with out.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header or "index" not in header:
        raise JobError(f"cannot resume: {out} has no CSV header; start over with --overwrite")
    if tuple(header) != OUTPUT_COLUMNS:
        log.info("%s: continuing with the columns it was started with: %s", out, ",".join(header))
    return tuple(header)


def _open_locked(out: Path) -> IO[str]:
    """Open for writing without truncating, and lock: two processes must not write one job."""
    fh = open(os.open(out, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="utf-8", newline="")
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise JobError(f"another batch job is writing {out}") from None
    return fh


def _cut(fh: IO[str], out: Path, length: int) -> None:
    """Drop what was written after the last saved state (a torn row, or rows of an unsaved chunk)."""
    size = os.fstat(fh.fileno()).st_size
    if size < length:
        raise JobError(f"cannot resume: {out} has {size} bytes, fewer than the {length} the job wrote; "
                       "start over with --overwrite")
    if size > length:
        log.info("%s: dropping %d bytes written after the last saved state", out, size - length)
        fh.truncate(length)
    fh.seek(length)


def _sync(fh: IO[str]) -> int:
    """Flush and fsync the output, so the state never records bytes the disk may not have; its length."""
    fh.flush()
    os.fsync(fh.fileno())
    return os.fstat(fh.fileno()).st_size
