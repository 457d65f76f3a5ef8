"""Payload validation for the tasks, without a worker."""

from __future__ import annotations

import pytest

from producer.contract import InvalidInput
from tasks.validation import (
    check_chunks,
    check_escalation,
    check_model,
    check_offset,
    check_score,
    check_text,
    check_texts,
)


def test_valid_payloads_pass():
    assert check_text("안녕하세요", 100) == "안녕하세요"
    assert check_model("EXAONE") == "exaone"
    assert check_texts(["a"], 10) == ["a"]
    assert check_offset(250, 1000) == 250
    assert check_score(1, "abc") == (1.0, "abc", "")
    assert check_score(0.25, "abc", "float32") == (0.25, "abc", "float32")
    # a text is left to the task, which reports it as that item's error
    assert check_escalation([{"label": "ham"}, None, None, None],
                            [[1, "a", 0.4, "v", "bfloat16"], [2, "b", 0.5, "v"], [3, 5, 0.6]], 10) == \
        [(1, "a", 0.4, "v", "bfloat16"), (2, "b", 0.5, "v", ""), (3, 5, 0.6, "", "")]
    assert check_chunks([[{"label": "ham"}], []], ["id-1", "id-2"], 10) == [[{"label": "ham"}], []]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_text(None, 10), "must be a string, not NoneType"),
    (lambda: check_text(b"bytes", 10), "must be a string, not bytes"),
    (lambda: check_text(" \n\t", 10), "text is empty"),
    (lambda: check_text("x" * 11, 10), "11 characters; the limit is 10"),
    (lambda: check_text("\udcff", 10), "not valid Unicode"),
    (lambda: check_model("bert"), "model must be one of auto, koelectra, exaone"),
    (lambda: check_model(3), "model must be one of"),
    (lambda: check_texts("one text", 10), "must be a list of strings, not str"),
    (lambda: check_texts([], 10), "texts is empty"),
    (lambda: check_texts(["a"] * 11, 10), "11 texts; the limit is 10"),
    (lambda: check_offset(-1, 10), "offset must be a whole number from 0 to 9"),
    (lambda: check_offset(True, 10), "offset must be a whole number"),
    (lambda: check_offset("3", 10), "offset must be a whole number"),
    (lambda: check_score(float("nan")), "koelectra_score must be a number from 0 to 1"),
    (lambda: check_score(False), "koelectra_score must be a number"),
    (lambda: check_score(0.5, "v" * 65), "koelectra_version must be a string of at most 64"),
    (lambda: check_score(0.5, "v", 32), "koelectra_precision must be a string of at most 32"),
    (lambda: check_escalation({}, [[0, "a", 0.5]], 10), "results must be a list of 1 to 10"),
    (lambda: check_escalation([None] * 11, [[0, "a", 0.5]], 10), "results must be a list of 1 to 10"),
    (lambda: check_escalation(["x"], [[0, "a", 0.5]], 10), "results must hold result objects"),
    (lambda: check_escalation([None], [], 10), "items must be a non-empty list"),
    (lambda: check_escalation([None], [[0, "a"]], 10), "an escalated item must be"),
    (lambda: check_escalation([{}], [[0, "a", 0.5]], 10), "index 0 does not name an open slot"),
    (lambda: check_escalation([None, None], [[0, "a", 0.5], [0, "b", 0.5]], 10), "two escalated items name the same"),
    (lambda: check_chunks([[{}]], "ids", 10), "chunk_ids must be a list of task ids"),
    (lambda: check_chunks([{}], [], 10), "chunks must be a list of result lists"),
    (lambda: check_chunks([[{}] * 6, [{}] * 5], [], 10), "more than 10 results"),
])
def test_invalid_payloads_are_named(call, message):
    with pytest.raises(InvalidInput, match=message):
        call()
