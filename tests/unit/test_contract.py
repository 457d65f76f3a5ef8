"""Routing: each model's tasks go to its queue; anything else to the default queue all workers serve."""

from __future__ import annotations

from producer.contract import CLASSIFY, CLASSIFY_BATCH, DEFAULT_QUEUE, queue_for, route


def test_explicit_models_have_their_own_queues_and_auto_uses_the_default():
    assert route(CLASSIFY, ["hi"], {"model": "exaone"}, {}) == {"queue": "spam.exaone"}
    assert route(CLASSIFY_BATCH, [["a"], "KoELECTRA"], {}, {}) == {"queue": "spam.koelectra"}
    assert route(CLASSIFY, ["hi"], {}, {}) == {"queue": DEFAULT_QUEUE}
    assert route(CLASSIFY, ["hi"], {"model": "gpt"}, {}) == {"queue": DEFAULT_QUEUE}  # refused by the worker
    assert route("other.task", [], {}, {}) is None
    assert queue_for(None) == DEFAULT_QUEUE
