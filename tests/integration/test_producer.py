"""The producer side: no torch needed to enqueue, and the batch CLI over files end to end."""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from producer.jobs import state_path
from tests.conftest import ROOT
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = pytest.mark.integration

BLOCK_HEAVY_IMPORTS = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "peft", "safetensors", "worker", "tasks"}:
                raise ImportError(f"{name} is not available to producers")

    sys.meta_path.insert(0, Block())
""")


def test_producer_enqueues_with_torch_unavailable(redis_server):
    broker, backend = redis_server.fresh_pair()
    script = BLOCK_HEAVY_IMPORTS + textwrap.dedent(f"""
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        from producer import SpamClient, make_app
        from producer.settings import ProducerSettings
        client = SpamClient(make_app(ProducerSettings({broker!r}, {backend!r})))
        print(client.submit("무료 쿠폰 당첨", model="exaone").id)
        print(client.submit_batch(["a", "b"]).id)
        assert not any(m.split(".")[0] in {{"torch", "worker", "tasks"}} for m in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    single_id, batch_id = out.stdout.split()
    queues = redis.Redis.from_url(broker)
    by_id = {json.loads(m)["headers"]["id"]: json.loads(m) for m in queues.lrange("spam.exaone", 0, -1)}
    assert single_id in by_id  # an explicit model goes to its own queue, "auto" to the default one
    by_id.update({json.loads(m)["headers"]["id"]: json.loads(m) for m in queues.lrange("celery", 0, -1)})
    assert by_id[single_id]["headers"]["task"] == "spam.classify"
    assert by_id[single_id]["content-type"] == "application/json"
    args, kwargs, _ = json.loads(base64.b64decode(by_id[single_id]["body"]))
    assert args == ["무료 쿠폰 당첨"] and kwargs == {"model": "exaone"}
    assert by_id[batch_id]["headers"]["task"] == "spam.classify_batch"


def test_batch_cli_classifies_a_csv_file_in_order(prefork_worker, tmp_path):
    client = client_for(prefork_worker)
    wait_until_serving(prefork_worker, client)
    texts = [f"메시지 {i}: {'무료 쿠폰 당첨' if i % 3 == 0 else '내일 회의 확인'}" for i in range(45)]
    texts[7] = ""
    source = tmp_path / "in.csv"
    with source.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows([i, t] for i, t in enumerate(texts))
    out = tmp_path / "out.jsonl"
    env = {"CELERY_BROKER_URL": prefork_worker.broker_url, "CELERY_RESULT_BACKEND": prefork_worker.backend_url,
           "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "producer", "batch", str(source), "--out", str(out), "--chunk-size", "8",
         "--model", "koelectra"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "45 records, 1 errors" in run.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(45))
    assert rows[7]["error"] == "text is empty"
    expected = client.submit_batch([t for t in texts if t], "koelectra").get(timeout=60)
    got = [r for r in rows if "error" not in r]
    assert [r["spam_score"] for r in got] == pytest.approx([e["spam_score"] for e in expected], abs=1e-6)
    client.close()


def test_classify_cli_prints_json(prefork_worker):
    env = {"CELERY_BROKER_URL": prefork_worker.broker_url, "CELERY_RESULT_BACKEND": prefork_worker.backend_url}
    cmd = [sys.executable, "-m", "producer", "classify", "무료 쿠폰 당첨! 지금 클릭", "--model", "exaone"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["model"] == "exaone" and result["label"] in ("spam", "ham")


@pytest.mark.timeout(900)  # the shared worker may start here; three CLI runs on a loaded machine
def test_batch_cli_resumes_a_killed_job_with_one_row_per_line(served, tmp_path):
    """SIGKILL a batch job part-way, tear its last row, resume: the output is what an uninterrupted
    run writes, one row per input line, in order, with no second CSV header."""
    worker, _ = served
    lines = 400
    texts = [f"{i}번: {'무료 쿠폰 당첨! 지금 클릭' if i % 3 == 0 else '내일 회의는 3시입니다'}" for i in range(lines)]
    texts[13] = ""  # an error row; its index within its batch task is 5
    source = tmp_path / "in.txt"
    source.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    env = {"CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url,
           "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}

    def batch(out, *extra: str) -> list[str]:
        return [sys.executable, "-m", "producer", "--timeout", "240", "batch", str(source), "--out", str(out),
                "--chunk-size", "8", "--window", "2", "--model", "koelectra", "--no-progress", *extra]

    def read(out) -> list[dict]:
        with out.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    reference = tmp_path / "reference.csv"
    done = subprocess.run(batch(reference), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "out.csv"
    with (tmp_path / "killed.log").open("w") as log:
        job = subprocess.Popen(batch(out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not out.exists() or out.read_bytes().count(b"\n") - 1 < 3 * 8:  # lines after the header
                assert job.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no rows after 300 s"
                time.sleep(0.01)
        finally:
            job.kill()
            job.wait(timeout=30)
    assert state_path(out).exists(), "the job ended before it could be killed; make the input longer"
    state = json.loads(state_path(out).read_text())
    assert 0 < state["written"] < lines
    with out.open("a", encoding="utf-8") as fh:
        fh.write("399,spam,0.9")  # a row torn by the kill

    resumed = subprocess.run(batch(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at record {state['written']} of {lines}" in resumed.stderr
    assert f"{lines} records, 1 errors" in resumed.stderr
    assert f"{len(state['in_flight'])} chunks re-attached, 0 sent again" in resumed.stderr
    assert not state_path(out).exists()
    rows, expected = read(out), read(reference)
    assert [r["index"] for r in rows] == [str(i) for i in range(lines)]
    assert rows[13]["error"] == "text is empty"
    assert [r["label"] for r in rows] == [r["label"] for r in expected]
    scores = [float(r["spam_score"]) for r in rows if r["spam_score"]]
    assert len(scores) == lines - 1
    assert scores == pytest.approx([float(r["spam_score"]) for r in expected if r["spam_score"]], abs=1e-6)


# --- every CLI error is one line and an exit code (the ones needing no server: tests/unit/test_cli_errors.py)


def _one_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def _producer(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=timeout)


def test_classify_cli_refused_text_is_one_line(served):
    worker, _ = served
    env = {"CELERY_BROKER_URL": worker.broker_url, "CELERY_RESULT_BACKEND": worker.backend_url}
    run = _producer(env, "classify", "")
    assert run.returncode == 2
    assert _one_line(run) == "producer classify: text is empty"
    run = _producer(env, "classify", "x" * 20001, "--model", "koelectra")
    assert run.returncode == 2 and "the limit is 20000 (MAX_TEXT_CHARS)" in _one_line(run)


def test_cli_timeout_is_one_line(redis_server):
    broker, backend = redis_server.fresh_pair()  # a live broker that no worker serves
    env = {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": backend}
    start = time.monotonic()
    run = _producer(env, "--timeout", "1", "classify", "무료 쿠폰")
    assert time.monotonic() - start < 30
    assert run.returncode == 4
    assert _one_line(run) == "producer classify: no result within 1 s (--timeout)"


def test_cli_unreachable_result_backend_is_one_line(redis_server):
    from tests.redis_process import free_port

    broker, _ = redis_server.fresh_pair()
    port = free_port()
    run = _producer({"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": f"redis://:pw@127.0.0.1:{port}/1"},
                    "classify", "x", timeout=30)
    assert run.returncode == 3
    assert _one_line(run).startswith(f"producer classify: cannot reach the result backend at "
                                     f"redis://:**@127.0.0.1:{port}/1")
