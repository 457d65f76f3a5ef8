"""``spam.classify`` and ``spam.classify_batch`` (the contract in :mod:`producer.contract`), and the
internal tasks the workers send each other.

Where work runs:
- A task for a model this worker did not load is forwarded to that model's queue with
  ``Task.replace``: the new task keeps the task id, so the caller's result handle still works.
- ``auto`` is the cascade: KoELECTRA scores; a score inside ``CASCADE_BAND`` escalates the message
  to EXAONE, here when this worker has it, else as ``spam.escalate`` on the ``spam.exaone`` queue.
- A batch over ``BATCH_CHUNK_ITEMS`` texts becomes a chord of ``spam.classify_chunk`` tasks, so
  several workers share it, joined in input order by ``spam.join_chunks`` on the chunks' queue
  (which their workers consume), which then deletes the chunks' own results.

Every task checks its arguments, the internal ones too: a message is a message, whoever sent it.
What a task publishes is retried while the broker is away (``PUBLISH_RETRY_S``, in
``worker.celeryconfig``); past that, the task's own message goes back to its queue to run again.
Escalations and forwards expire after ``ESCALATION_TIMEOUT_S`` with a clear error when no worker of
their model takes them (:mod:`worker.delivery.expiry`).
"""

from __future__ import annotations

import logging
from uuid import uuid4

from celery import Signature, chord
from celery.exceptions import Reject, SoftTimeLimitExceeded

from producer import connection
from producer.contract import (
    CLASSIFY,
    CLASSIFY_BATCH,
    CLASSIFY_CHUNK,
    ESCALATE,
    ESCALATE_BATCH,
    JOIN_CHUNKS,
    LABEL_HAM,
    LABEL_SPAM,
    ClassificationFailed,
    InvalidInput,
    ModelUnavailable,
    queue_for,
)
from tasks.validation import (
    check_chunks,
    check_escalation,
    check_model,
    check_offset,
    check_score,
    check_text,
    check_texts,
)
from worker.celery import app, settings
from worker.lifecycle.registry import registry
from worker.serving.score import Score
from worker.telemetry.stats import TaskRecord, process_stats

log = logging.getLogger(__name__)

_ERRORS = (InvalidInput, ModelUnavailable, ClassificationFailed, SoftTimeLimitExceeded)
_MAX_FORWARDS = 3  # a task bounced between workers more often than this has nowhere to go


@app.task(bind=True, name=CLASSIFY, throws=_ERRORS)
def classify(self, text: str, model: str = "auto") -> dict:
    """Classify one message. Invalid input fails the task with ``InvalidInput`` (not retried)."""
    with process_stats.task():
        text = check_text(text, settings.max_text_chars)
        model = check_model(model)
        outcome = _classify_one(self.request, text, model)
    return _replace(self, outcome)


@app.task(bind=True, name=CLASSIFY_BATCH, throws=_ERRORS)
def classify_batch(self, texts: list, model: str = "auto") -> list[dict]:
    """Classify many messages in input order; an invalid item gets ``{"error", "index"}``."""
    with process_stats.task() as record:
        texts = check_texts(texts, settings.max_batch_items)
        model = check_model(model)
        if model != "auto" and not registry.has(model):
            outcome = _forward(self.request, model, classify_batch.si(texts, model))
        elif len(texts) > settings.batch_chunk_items:
            outcome = _split(texts, model)
        else:
            outcome = _classify_items(texts, model, 0, record)
    return _replace(self, outcome)


@app.task(bind=True, name=CLASSIFY_CHUNK, throws=_ERRORS)
def classify_chunk(self, texts: list, model: str, offset: int) -> list[dict]:
    """One chunk of a split batch; item indices count from ``offset`` in the whole batch."""
    with process_stats.task() as record:
        texts = check_texts(texts, settings.max_batch_items)
        model = check_model(model)
        offset = check_offset(offset, settings.max_batch_items)
        if model != "auto" and not registry.has(model):
            outcome = _forward(self.request, model, classify_chunk.si(texts, model, offset))
        else:
            outcome = _classify_items(texts, model, offset, record)
    return _replace(self, outcome)


@app.task(name=JOIN_CHUNKS, throws=_ERRORS)
def join_chunks(chunks: list[list[dict]], chunk_ids: list[str] = ()) -> list[dict]:
    """The chord body of a split batch: the chunks' results, already in input order. The chunks'
    own results (``chunk_ids``) are deleted: the batch's result holds them all."""
    chunks = check_chunks(chunks, chunk_ids, settings.max_batch_items)
    _forget(chunk_ids)
    return [item for chunk in chunks for item in chunk]


@app.task(name=ESCALATE, throws=_ERRORS)
def escalate(text: str, koelectra_score: float, koelectra_version: str = "", koelectra_precision: str = "") -> dict:
    """EXAONE's decision on a message KoELECTRA was unsure about (sent by a KoELECTRA-only worker)."""
    with process_stats.task():
        text = check_text(text, settings.max_text_chars)
        score, version, precision = check_score(koelectra_score, koelectra_version, koelectra_precision)
        return _result("exaone", _score_one("exaone", text), Score(score, False, version=version, precision=precision))


@app.task(name=ESCALATE_BATCH, throws=_ERRORS)
def escalate_batch(results: list, items: list, offset: int) -> list[dict]:
    """Fill in EXAONE's decisions for the ``[index, text, koelectra_score, koelectra_version,
    koelectra_precision]`` items of ``results`` (a worker of an older release sends no version or no
    precision). A text the checks refuse gets ``{"error", "index"}`` like any batch item."""
    with process_stats.task() as record:
        checked = check_escalation(results, items, settings.max_batch_items)
        offset = check_offset(offset, settings.max_batch_items)
        unsure = []
        for index, text, score, version, precision in checked:
            try:
                text = check_text(text, settings.max_text_chars)
                unsure.append((index, text, Score(score, False, version=version, precision=precision)))
            except InvalidInput as exc:
                results[index] = {"error": str(exc), "index": offset + index}
        record.batch_size = len(unsure)
        _escalate_items(results, unsure, offset)
        return results


def _classify_one(request, text: str, model: str) -> dict | Signature:
    if model != "auto":
        if not registry.has(model):
            return _forward(request, model, classify.si(text, model))
        return _result(model, _score_one(model, text))
    if not registry.has("koelectra"):
        return _result("exaone", _score_one("exaone", text))
    first = _score_one("koelectra", text)
    if not _uncertain(first):
        return _result("koelectra", first)
    if registry.has("exaone"):
        return _result("exaone", _score_one("exaone", text), first)
    return escalate.si(text, first.spam_score, first.version, first.precision).set(
        queue=queue_for("exaone"), expires=settings.escalation_timeout_s)


def _classify_items(texts: list, model: str, offset: int, record: TaskRecord) -> list[dict] | Signature:
    results: list = [None] * len(texts)
    valid: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        try:
            valid.append((i, check_text(text, settings.max_text_chars)))
        except InvalidInput as exc:
            results[i] = {"error": str(exc), "index": offset + i}
    record.batch_size = len(valid)
    if not valid:
        return results
    name = model if model != "auto" else "koelectra" if registry.has("koelectra") else "exaone"
    unsure: list[tuple[int, str, Score]] = []
    for (i, text), score in zip(valid, registry.score(name, [t for _, t in valid]), strict=True):
        if score.error:
            results[i] = {"error": score.error, "index": offset + i}
        elif model == "auto" and name == "koelectra" and _uncertain(score):
            unsure.append((i, text, score))
        else:
            results[i] = _result(name, score)
    if unsure and not registry.has("exaone"):
        items = [[i, text, first.spam_score, first.version, first.precision] for i, text, first in unsure]
        return escalate_batch.si(results, items, offset).set(queue=queue_for("exaone"),
                                                              expires=settings.escalation_timeout_s)
    _escalate_items(results, unsure, offset)
    return results


def _escalate_items(results: list, unsure: list[tuple[int, str, Score]], offset: int) -> None:
    if not unsure:
        return
    scores = registry.score("exaone", [text for _, text, _ in unsure])
    for (i, _, first), score in zip(unsure, scores, strict=True):
        results[i] = {"error": score.error, "index": offset + i} if score.error else \
            _result("exaone", score, first)


def _split(texts: list, model: str) -> Signature:
    """A chord of chunks on one model's queue, joined on that queue too: a worker that takes the
    chunks takes their join (a GPU worker serving only ``spam.exaone`` included)."""
    size = settings.batch_chunk_items
    # The chunks of an ``auto`` batch take the path this worker would: the cascade if it has KoELECTRA.
    queue = queue_for(model if model != "auto" else "koelectra" if registry.has("koelectra") else "exaone")
    chunks = [classify_chunk.si(texts[i:i + size], model, i).set(queue=queue, task_id=str(uuid4()))
              for i in range(0, len(texts), size)]
    chunk_ids = [c.options["task_id"] for c in chunks]
    return chord(chunks, join_chunks.s(chunk_ids=chunk_ids).set(queue=queue))


def _replace(task, outcome: dict | list | Signature) -> dict | list:
    """Return ``outcome``, or send the task on as the signature ``outcome`` under the same task id.
    When the broker stays unreachable past ``PUBLISH_RETRY_S``, the task's message goes back to
    its queue (to run again once Redis is back) rather than the task failing."""
    if not isinstance(outcome, Signature):
        return outcome
    try:
        return task.replace(outcome)
    except Exception as exc:
        if not _unreachable(exc):
            raise
        log.warning("task %s: could not publish %s within PUBLISH_RETRY_S (%.0f s): %s; its message goes back "
                    "to its queue", task.request.id, outcome.get("task"), settings.publish_retry_s, exc)
        raise Reject(f"broker unreachable for PUBLISH_RETRY_S ({settings.publish_retry_s:g} s)", requeue=True) \
            from None


def _unreachable(exc: BaseException | None) -> bool:
    """Whether Redis being away caused ``exc``: a connection error, or one raised from it (e.g. the
    result store's "Retry limit exceeded while trying to reconnect", when freezing a chord subscribed
    to its chunks' results)."""
    while exc is not None:
        if connection.lost_connection(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _forget(task_ids: list[str]) -> None:
    """Delete these tasks' results (they expire after a day anyway: a failure here is only logged)."""
    if not task_ids:
        return
    backend = app.backend
    try:
        backend.ensure(backend.client.delete, tuple(backend.get_key_for_task(i) for i in task_ids))
    except Exception as exc:  # noqa: BLE001 - a result left to expire is no reason to fail the batch
        log.warning("could not delete %d chunk results (they expire after a day): %s", len(task_ids), exc)


def _forward(request, model: str, signature: Signature) -> Signature:
    """Send the task to ``model``'s queue, unless it came from there (a worker told to serve a
    queue without loading its model) or has bounced too often."""
    queue = queue_for(model)
    came_from = (request.delivery_info or {}).get("routing_key")
    if came_from == queue or (request.replaced_task_nesting or 0) >= _MAX_FORWARDS:
        raise ModelUnavailable(f"model {model!r} is not loaded in this worker, which serves queue {came_from!r}")
    return signature.set(queue=queue, expires=settings.escalation_timeout_s)


def _score_one(model: str, text: str) -> Score:
    score = registry.score(model, [text])[0]
    if score.error:
        raise ClassificationFailed(f"{model}: {score.error}")
    return score


def _uncertain(score: Score) -> bool:
    band = settings.cascade_band
    return band is not None and band[0] <= score.spam_score <= band[1]


def _result(model: str, score: Score, first: Score | None = None) -> dict:
    """The result of ``model``'s ``score``; ``first`` is KoELECTRA's when the cascade escalated. The
    version and precision say which weights decided, and in what."""
    result = {
        "label": LABEL_SPAM if score.spam_score >= settings.spam_threshold else LABEL_HAM,
        "spam_score": score.spam_score,
        "model": model,
        "model_version": score.version,
        "precision": score.precision,
        "escalated": first is not None,
        "truncated": score.truncated,
    }
    if first is not None:
        result["koelectra_score"] = first.spam_score
        result["koelectra_version"] = first.version
        result["koelectra_precision"] = first.precision
    return result
