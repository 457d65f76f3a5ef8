"""Property-based payloads against a live worker: a clear error or a valid result, and the worker stays up."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.contract import CLASSIFY, CLASSIFY_BATCH, MODELS, InvalidInput
from tests.integration.helpers import bare_app

pytestmark = pytest.mark.integration

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=8)
texts = st.one_of(st.text(max_size=300), st.text(alphabet="가나다라마바사 스팸광고쿠폰\n\t", max_size=100),
                  json_values)
models = st.one_of(st.sampled_from(MODELS), st.sampled_from([m.upper() for m in MODELS]), json_scalars)


@pytest.fixture(scope="module")
def app(served):
    return bare_app(served[0])


def _valid(result: dict) -> bool:
    return (set(result) == {"label", "spam_score", "model", "model_version", "escalated", "truncated"}
            and result["label"] in ("spam", "ham")
            and 0.0 <= result["spam_score"] <= 1.0 and math.isfinite(result["spam_score"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, model=models)
def test_classify_payloads(app, prefork_worker, text, model):
    handle = app.send_task(CLASSIFY, args=[text], kwargs={"model": model})
    try:
        assert _valid(handle.get(timeout=30))
    except Exception as exc:  # noqa: BLE001 - the failure must be the clear, named kind
        assert type(exc).__name__ == InvalidInput.__name__, repr(exc)
        assert str(exc)
    assert prefork_worker.process.poll() is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(texts, max_size=12) | json_scalars)
def test_batch_payloads(app, prefork_worker, items):
    handle = app.send_task(CLASSIFY_BATCH, args=[items])
    try:
        results = handle.get(timeout=30)
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == InvalidInput.__name__, repr(exc)
        assert not isinstance(items, list) or not items
        return
    assert isinstance(items, list) and len(results) == len(items)
    for i, result in enumerate(results):
        assert _valid(result) or (set(result) == {"error", "index"} and result["index"] == i), result
    assert prefork_worker.process.poll() is None
