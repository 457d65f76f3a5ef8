"""Every CLI failure is one line on stderr and a documented exit code; no server needed here (the
ones against a live worker are in tests/integration/test_producer.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT
from tests.redis_process import free_port


def producer(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "CASCADE_", "SPAM_"))}
    return subprocess.run([sys.executable, "-m", "producer", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


@pytest.fixture
def labeled(tmp_path):
    path = tmp_path / "labeled.csv"
    path.write_text("text,label\n무료 쿠폰 당첨,spam\n내일 회의,ham\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["classify", "stats", "evaluate", "batch"])
def test_unreachable_broker_is_one_line_naming_the_url_without_its_password(command, labeled, tmp_path):
    port = free_port()  # nothing listens there
    env = {"CELERY_BROKER_URL": f"redis://:s3cret@127.0.0.1:{port}/0",
           "CELERY_RESULT_BACKEND": f"redis://:s3cret@127.0.0.1:{port}/1"}
    args = {"classify": ["classify", "무료 쿠폰"], "stats": ["stats"],
            "evaluate": ["evaluate", str(labeled), "--out", str(tmp_path / "r.json")],
            "batch": ["batch", str(labeled), "--out", str(tmp_path / "out.jsonl")]}[command]
    start = time.monotonic()
    run = producer(*args, env=env, timeout=30)
    assert time.monotonic() - start < 15
    assert run.returncode == 3
    line = one_line(run)
    assert line.startswith(f"producer {command}: cannot reach the broker at redis://:**@127.0.0.1:{port}/0")
    assert "s3cret" not in run.stderr + run.stdout
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "r.json").exists()


def test_a_server_that_never_answers_is_given_up_on_within_seconds():
    """Accepts the connection, then says nothing (a stalled Redis, or another service on the port)."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        try:
            while True:
                accepted.append(silent.accept()[0])
        except OSError:  # closed at the end of the test
            pass

    threading.Thread(target=accept_forever, daemon=True).start()
    port = silent.getsockname()[1]
    try:
        start = time.monotonic()
        run = producer("classify", "x", env={"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"}, timeout=60)
        assert time.monotonic() - start < 20  # CONNECT_TIMEOUT_S is 5
    finally:
        silent.close()
        for conn in accepted:
            conn.close()
    assert run.returncode == 3
    assert one_line(run).startswith(f"producer classify: cannot reach the broker at redis://127.0.0.1:{port}/0")


def test_evaluate_names_the_line_of_a_bad_label_before_connecting(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "spam"}\n{"text": "b", "label": " HAM "}\n'
                    '{"text": "c", "label": "maybe"}\n', encoding="utf-8")
    # the broker does not exist: the file is checked first, so the answer is about the label
    run = producer("evaluate", str(path), "--out", str(tmp_path / "r.json"),
                   env={"CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert run.returncode == 2
    assert one_line(run) == f"producer evaluate: {path}:3: label 'maybe' is not spam/ham, 스팸/정상, 1/0 or true/false"


@pytest.mark.parametrize("content, message", [
    ("text,label\n", "no records"),
    ("text\nabc\n", "no column 'label'"),
])
def test_evaluate_refuses_an_empty_or_unlabeled_file(tmp_path, content, message):
    path = tmp_path / "in.csv"
    path.write_text(content, encoding="utf-8")
    run = producer("evaluate", str(path), "--out", str(tmp_path / "r.json"))
    assert run.returncode == 2 and message in one_line(run)


@pytest.mark.parametrize("args, message", [
    (["classify"], "producer classify: the following arguments are required: text (see --help)"),
    (["classify", "x", "--model", "gpt"], "producer classify: argument --model: invalid choice"),
    (["evaluate", "x.csv"], "producer evaluate: the following arguments are required: --out"),
    (["nope"], "producer: argument command: invalid choice"),
])
def test_usage_errors_are_one_line(args, message):
    run = producer(*args)
    assert run.returncode == 2 and one_line(run).startswith(message)


def test_help_lists_the_exit_codes():
    run = producer("evaluate", "--help")
    assert run.returncode == 0
    for code in ("1    a task was refused", "2    invalid input", "3    the broker", "4    no result within"):
        assert code in run.stdout


def test_each_failure_has_its_exit_code():
    from celery.exceptions import TimeoutError as ResultTimeout
    from kombu.exceptions import OperationalError

    from producer.__main__ import describe, one_line
    from producer.contract import ClassificationFailed, InvalidInput, ModelUnavailable
    from producer.evaluate import MissingExtra

    assert describe(InvalidInput("text is empty"), 30) == (2, "text is empty")
    assert describe(ModelUnavailable("'exaone' is not loaded"), 30) == (1, "ModelUnavailable: 'exaone' is not loaded")
    assert describe(ClassificationFailed("out of memory"), 30) == (1, "ClassificationFailed: out of memory")
    assert describe(ResultTimeout("The operation timed out."), 2.5) == (4, "no result within 2.5 s (--timeout)")
    assert describe(OperationalError("Error 111"), 30)[0] == 3
    assert describe(MissingExtra("pip install '.[eval]'"), 30) == (2, "pip install '.[eval]'")
    assert describe(RuntimeError("boom"), 30) == (1, "RuntimeError: boom")
    assert one_line("first\n  second\n") == "first second"
