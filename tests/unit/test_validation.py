"""Payload validation for the tasks, without a worker."""

from __future__ import annotations

import pytest

from producer.contract import InvalidInput
from tasks.validation import check_model, check_text, check_texts


def test_valid_payloads_pass():
    assert check_text("안녕하세요", 100) == "안녕하세요"
    assert check_model("EXAONE") == "exaone"
    assert check_texts(["a"], 10) == ["a"]


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
])
def test_invalid_payloads_are_named(call, message):
    with pytest.raises(InvalidInput, match=message):
        call()
