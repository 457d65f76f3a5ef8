"""``spam.classify`` and ``spam.classify_batch``: the task names in :mod:`producer.contract`."""

from __future__ import annotations

from producer.contract import (
    CLASSIFY,
    CLASSIFY_BATCH,
    LABEL_HAM,
    LABEL_SPAM,
    ClassificationFailed,
    InvalidInput,
    ModelUnavailable,
)
from tasks.validation import check_model, check_text, check_texts
from worker.celery import app, settings
from worker.registry import registry
from worker.stats import process_stats


@app.task(name=CLASSIFY, throws=(InvalidInput, ModelUnavailable, ClassificationFailed))
def classify(text: str, model: str = "auto") -> dict:
    """Classify one message. Invalid input fails the task with ``InvalidInput`` (not retried)."""
    with process_stats.task():
        text = check_text(text, settings.max_text_chars)
        name = registry.resolve(check_model(model))
        score = registry.get(name).score([text])[0]
        if score.error:
            raise ClassificationFailed(f"{name}: {score.error}")
        return _result(name, score)


@app.task(name=CLASSIFY_BATCH, throws=(InvalidInput, ModelUnavailable, ClassificationFailed))
def classify_batch(texts: list, model: str = "auto") -> list[dict]:
    """Classify many messages in input order; an invalid item gets ``{"error", "index"}``."""
    with process_stats.task() as record:
        texts = check_texts(texts, settings.max_batch_items)
        name = registry.resolve(check_model(model))
        results: list[dict | None] = [None] * len(texts)
        valid: list[tuple[int, str]] = []
        for i, text in enumerate(texts):
            try:
                valid.append((i, check_text(text, settings.max_text_chars)))
            except InvalidInput as exc:
                results[i] = {"error": str(exc), "index": i}
        record.batch_size = len(valid)
        if valid:
            scores = registry.get(name).score([t for _, t in valid])
            for (i, _), score in zip(valid, scores, strict=True):
                results[i] = {"error": score.error, "index": i} if score.error else _result(name, score)
        return results  # type: ignore[return-value]


def _result(model: str, score) -> dict:
    return {
        "label": LABEL_SPAM if score.spam_score >= settings.spam_threshold else LABEL_HAM,
        "spam_score": score.spam_score,
        "model": model,
        "truncated": score.truncated,
    }
