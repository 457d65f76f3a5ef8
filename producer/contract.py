"""The message contract between apps that enqueue and the workers: names, arguments, results.

Torch-free and worker-free on purpose: any Celery client can enqueue with ``send_task`` and these
names, and ``tasks/`` imports them so the two sides cannot drift.
"""

from __future__ import annotations

CLASSIFY = "spam.classify"
"""``spam.classify(text: str, model: str = "auto") -> Result``."""
CLASSIFY_BATCH = "spam.classify_batch"
"""``spam.classify_batch(texts: list[str], model: str = "auto") -> list[Result | ItemError]``, in input order."""

MODELS = ("auto", "koelectra", "exaone")
"""``auto`` is the cascade: KoELECTRA decides, and a score inside the worker's uncertainty band
(``CASCADE_BAND``) escalates the message to EXAONE. A worker with EXAONE only uses EXAONE."""

ESCALATE = "spam.escalate"
ESCALATE_BATCH = "spam.escalate_batch"
JOIN_CHUNKS = "spam.join_chunks"
CLASSIFY_CHUNK = "spam.classify_chunk"
"""Internal tasks the workers send each other (escalation, the chunks of a large batch)."""

DEFAULT_QUEUE = "celery"
"""Every worker serves it, so a client that knows only the task names is always served."""

DEAD_LETTER_LIST = "spam.dead_letter"
"""A Redis list on the broker: the messages the workers gave up on (one that never finished, e.g.
killing its worker process each time; one too big; an escalation no worker took), newest first,
each a JSON record with ``task_id``, ``task``, ``reason``, ``at`` and the kombu ``message`` (its
body left out when too big), which ``LPUSH``ed back to ``queue`` would send it again."""


def queue_for(model: object) -> str:
    """The queue a task for ``model`` goes to: ``spam.koelectra``/``spam.exaone``, or the default
    queue for ``auto`` (and anything invalid, which the worker then refuses with a clear error)."""
    if isinstance(model, str) and model.lower() in MODELS[1:]:
        return f"spam.{model.lower()}"
    return DEFAULT_QUEUE


def route(name: str, args: object, kwargs: object, options: object, task: object = None, **_: object) -> dict | None:
    """Celery router (``task_routes``): send each classification to its model's queue."""
    if name not in (CLASSIFY, CLASSIFY_BATCH):
        return None
    model = (kwargs or {}).get("model") if isinstance(kwargs, dict) else None
    if model is None and isinstance(args, list | tuple) and len(args) > 1:
        model = args[1]
    return {"queue": queue_for(model if model is not None else "auto")}

LABEL_SPAM = "spam"
LABEL_HAM = "ham"

# A result: ``label`` ("spam"/"ham"), ``spam_score`` (0..1), ``model`` (which one decided),
# ``escalated`` (``auto`` sent it from KoELECTRA to EXAONE; ``koelectra_score`` is then KoELECTRA's
# score), ``truncated`` (the text was longer than the model's window). A batch item that failed validation
# is ``{"error": "...", "index": i}`` instead.


class InvalidInput(ValueError):
    """The task's arguments are unusable (wrong type, empty, too long, unknown model). Never retried."""


class ModelUnavailable(LookupError):
    """The worker that took the task has not loaded the requested model."""


class ClassificationFailed(RuntimeError):
    """The worker could not score the text (out of memory even alone). Never retried."""


class TaskDeadLettered(RuntimeError):
    """The workers gave up on the task's message: it was delivered ``MAX_TASK_ATTEMPTS`` times and
    never finished (its worker process died each time). The message is in ``DEAD_LETTER_LIST``."""
