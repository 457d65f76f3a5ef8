"""The resumable batch job against a fake fleet: order, bounded window, state file, resume after a crash."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from producer.contract import ModelUnavailable
from producer.files import OUTPUT_COLUMNS
from producer.jobs import BatchJob, JobError, JobSpec, load_state, state_path


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the job's own error handling runs."""


def score(text: str, model: str, index: int) -> dict:
    if not text:
        return {"error": "text is empty", "index": index}
    return {"label": "spam" if "쿠폰" in text else "ham", "spam_score": len(text) / 100, "model": model,
            "truncated": False}


@dataclass
class Fleet:
    """Results by task id, like the result backend; outlives one client, as Redis outlives a CLI run."""

    results: dict[str, object] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    fail_chunk: int | None = None  # the n-th batch sent fails with ModelUnavailable


class FakeHandle:
    def __init__(self, client: FakeClient, task_id: str) -> None:
        self.client, self.id = client, task_id

    @property
    def state(self) -> str:
        value = self.client.fleet.results.get(self.id)
        return "PENDING" if value is None else "FAILURE" if isinstance(value, Exception) else "SUCCESS"

    def get(self, timeout: float) -> object:
        self.client.gets += 1
        if self.client.kill_at_get == self.client.gets:
            raise Killed
        self.client.outstanding.discard(self.id)
        value = self.client.fleet.results.get(self.id)
        if value is None:
            raise TimeoutError("The operation timed out.")
        if isinstance(value, Exception):
            raise value
        return value

    def forget(self) -> None:
        self.client.fleet.results.pop(self.id, None)


class FakeClient:
    """What the job uses of ``SpamClient``: ``submit_batch`` and ``app.AsyncResult``."""

    def __init__(self, fleet: Fleet, kill_at_get: int | None = None, kill_at_send: int | None = None) -> None:
        self.fleet, self.kill_at_get, self.kill_at_send = fleet, kill_at_get, kill_at_send
        self.gets = 0
        self.sent: list[str] = []
        self.outstanding: set[str] = set()
        self.max_outstanding = 0
        self.app = SimpleNamespace(AsyncResult=lambda task_id: FakeHandle(self, task_id),
                                   conf=SimpleNamespace(result_expires=timedelta(days=1)))

    def submit_batch(self, texts: list[str], model: str = "auto") -> FakeHandle:
        if self.kill_at_send == len(self.sent) + 1:
            raise Killed
        task_id = f"task-{len(self.fleet.sent)}"
        self.fleet.sent.append(task_id)
        self.sent.append(task_id)
        failing = self.fleet.fail_chunk == len(self.fleet.sent)
        self.fleet.results[task_id] = (ModelUnavailable(f"{model} is not loaded") if failing
                                       else [score(t, model, i) for i, t in enumerate(texts)])
        self.outstanding.add(task_id)
        self.max_outstanding = max(self.max_outstanding, len(self.outstanding))
        return FakeHandle(self, task_id)


TEXTS = [f"메시지 {i} {'무료 쿠폰' if i % 4 == 0 else '회의'}" if i % 13 != 5 else "" for i in range(50)]


def write_input(path: Path, fmt: str) -> Path:
    if fmt == "txt":
        path.write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    return path


def spec_for(tmp_path: Path, out_fmt: str = "jsonl", in_fmt: str = "txt", name: str = "out", **kw) -> JobSpec:
    source = tmp_path / f"in.{in_fmt}"
    if not source.exists():
        write_input(source, in_fmt)
    return JobSpec(source, tmp_path / f"{name}.{out_fmt}", in_fmt, out_fmt, **{"chunk_size": 4, **kw})


def run(client, spec: JobSpec, **kw):
    with BatchJob.open(client, spec, window=3, **kw) as job:
        return job.run()


@pytest.mark.parametrize("out_fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("kill", [{"kill_at_get": 1}, {"kill_at_get": 6}, {"kill_at_send": 7}],
                         ids=["first-get", "mid-get", "after-rows-before-state"])
def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tmp_path, out_fmt, kill):
    reference = spec_for(tmp_path, out_fmt, name="reference")
    assert run(FakeClient(Fleet()), reference).written == len(TEXTS)
    spec = spec_for(tmp_path, out_fmt)
    fleet = Fleet()
    first = FakeClient(fleet, **kill)
    with pytest.raises(Killed):
        run(first, spec)
    recorded = load_state(state_path(spec.out))
    assert recorded.in_flight and all(recorded.in_flight)
    with spec.out.open("a", encoding="utf-8") as fh:
        fh.write('{"index": 99, "lab')  # a row torn by the kill

    second = FakeClient(fleet)
    summary = run(second, spec, resume=True)
    assert spec.out.read_bytes() == reference.out.read_bytes()
    assert not state_path(spec.out).exists()
    # The chunks in flight at the kill are waited for, not sent again: each chunk was sent once.
    assert summary.reattached == len(recorded.in_flight) and summary.resent == 0
    assert len(fleet.sent) == len(set(fleet.sent)) == -(-len(TEXTS) // 4)
    assert summary.resumed_at == recorded.written and summary.written == len(TEXTS)
    assert summary.errors == sum(1 for t in TEXTS if not t)
    assert not fleet.results  # every result was forgotten once written


def test_rows_are_in_input_order_with_global_indices(tmp_path):
    spec = spec_for(tmp_path, "jsonl", in_fmt="jsonl")
    client = FakeClient(Fleet())
    run(client, spec)
    rows = [json.loads(line) for line in spec.out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(len(TEXTS)))
    assert [i for i, r in enumerate(rows) if "error" in r] == [i for i, t in enumerate(TEXTS) if not t]
    assert all(r["spam_score"] == len(TEXTS[r["index"]]) / 100 for r in rows if "error" not in r)
    assert client.max_outstanding <= 3


def test_a_failed_chunk_stops_the_job_and_is_sent_again_on_resume(tmp_path):
    reference = spec_for(tmp_path, name="reference")
    run(FakeClient(Fleet()), reference)
    spec = spec_for(tmp_path)
    fleet = Fleet(fail_chunk=4)
    with pytest.raises(JobError, match=r"records 12\.\.15 .*ModelUnavailable.*12 of 50 .*--resume"):
        run(FakeClient(fleet), spec)
    recorded = load_state(state_path(spec.out))
    assert recorded.written == 12 and recorded.in_flight[0] is None and all(recorded.in_flight[1:])
    summary = run(FakeClient(fleet), spec, resume=True)
    assert spec.out.read_bytes() == reference.out.read_bytes()
    assert summary.resent == 1 and summary.reattached == len(recorded.in_flight) - 1


def interrupted(tmp_path: Path, fleet: Fleet, name: str) -> tuple[JobSpec, Path]:
    spec = spec_for(tmp_path, name=name)
    with pytest.raises(Killed):
        run(FakeClient(fleet, kill_at_get=2), spec)
    return spec, state_path(spec.out)


def test_on_resume_a_failed_task_is_sent_again(tmp_path):
    fleet = Fleet()
    spec, path = interrupted(tmp_path, fleet, "out")
    state = load_state(path)
    fleet.results[state.in_flight[0]] = ModelUnavailable("gone")  # FAILURE in the backend
    summary = run(FakeClient(fleet), spec, resume=True)
    assert (summary.resent, summary.reattached) == (1, len(state.in_flight) - 1)


def test_on_resume_a_task_pending_longer_than_results_live_is_sent_again(tmp_path):
    fleet = Fleet()
    spec, path = interrupted(tmp_path, fleet, "out")
    state = load_state(path)
    del fleet.results[state.in_flight[0]]  # PENDING: its result expired
    data = json.loads(path.read_text())
    data["saved_at"] = time.time() - 2 * 86400  # the backend keeps results one day
    path.write_text(json.dumps(data))
    summary = run(FakeClient(fleet), spec, resume=True)
    assert (summary.resent, summary.reattached) == (1, len(state.in_flight) - 1)


def test_a_lost_task_times_out_then_is_sent_again_on_the_next_resume(tmp_path):
    reference = spec_for(tmp_path, name="reference")
    run(FakeClient(Fleet()), reference)
    fleet = Fleet()
    spec, path = interrupted(tmp_path, fleet, "out")
    lost = load_state(path).in_flight[0]
    del fleet.results[lost]  # PENDING and recent: waited for, in vain
    with pytest.raises(JobError, match=f"task {lost}.* TimeoutError"):
        run(FakeClient(fleet), spec, resume=True)
    assert load_state(path).in_flight[0] is None
    summary = run(FakeClient(fleet), spec, resume=True)
    assert summary.resent == 1
    assert spec.out.read_bytes() == reference.out.read_bytes()


def test_existing_outputs_are_never_replaced_silently(tmp_path):
    spec = spec_for(tmp_path)
    spec.out.write_text("earlier results\n")
    with pytest.raises(JobError, match="exists; pass --overwrite"):
        BatchJob.open(FakeClient(Fleet()), spec)
    with pytest.raises(JobError, match="no unfinished job to resume"):
        BatchJob.open(FakeClient(Fleet()), spec, resume=True)
    assert spec.out.read_text() == "earlier results\n"
    run(FakeClient(Fleet()), spec, overwrite=True)
    assert len(spec.out.read_text().splitlines()) == len(TEXTS)

    fresh = spec_for(tmp_path, name="new")
    assert run(FakeClient(Fleet()), fresh, resume=True).resumed_at is None  # nothing to resume: starts
    with pytest.raises(JobError, match="exclude each other"):
        BatchJob.open(FakeClient(Fleet()), fresh, resume=True, overwrite=True)


def test_an_unfinished_job_needs_resume_and_the_same_settings(tmp_path):
    spec = spec_for(tmp_path)
    with pytest.raises(Killed):
        run(FakeClient(Fleet(), kill_at_get=3), spec)
    with pytest.raises(JobError, match="unfinished job .* --resume, or start over with --overwrite"):
        BatchJob.open(FakeClient(Fleet()), spec)
    other = JobSpec(spec.input, spec.out, "txt", "jsonl", model="exaone", chunk_size=5)
    with pytest.raises(JobError, match="--model was 'auto', not 'exaone'; --chunk-size was 4, not 5"):
        BatchJob.open(FakeClient(Fleet()), other, resume=True)
    with BatchJob.open(FakeClient(Fleet()), spec, resume=True), pytest.raises(JobError, match="another batch job"):
        BatchJob.open(FakeClient(Fleet()), spec, resume=True)

    stat = spec.input.stat()
    os.utime(spec.input, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(JobError, match="the input file changed since the job started"):
        BatchJob.open(FakeClient(Fleet()), spec, resume=True)
    os.utime(spec.input, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with spec.out.open("r+b") as fh:
        fh.truncate(10)
    with pytest.raises(JobError, match=r"fewer than the \d+ the job wrote"):
        BatchJob.open(FakeClient(Fleet()), spec, resume=True)
    run(FakeClient(Fleet()), spec, overwrite=True)
    assert not state_path(spec.out).exists()


def test_a_bad_record_fails_before_anything_is_sent_or_written(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "가"}\n{"text": "나"\n', encoding="utf-8")
    client = FakeClient(Fleet())
    with pytest.raises(ValueError, match=r"in.jsonl:2: not JSON"):
        BatchJob.open(client, JobSpec(source, tmp_path / "out.jsonl", "jsonl", "jsonl"))
    assert not client.sent and not (tmp_path / "out.jsonl").exists()


def test_state_file_is_replaced_whole_and_checked_when_read(tmp_path):
    spec = spec_for(tmp_path)
    with BatchJob.open(FakeClient(Fleet()), spec) as job:
        path = state_path(spec.out)
        assert load_state(path).total == len(TEXTS)
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    path.write_text('{"version": 1, "input": ')
    with pytest.raises(JobError, match="unreadable job state"):
        BatchJob.open(FakeClient(Fleet()), spec, resume=True)
    assert job.state.written == 0


def test_an_empty_input_makes_an_empty_output(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("", encoding="utf-8")
    spec = JobSpec(source, tmp_path / "out.csv", "txt", "csv")
    assert run(FakeClient(Fleet()), spec).written == 0
    assert spec.out.read_text(encoding="utf-8").splitlines() == [",".join(OUTPUT_COLUMNS)]
