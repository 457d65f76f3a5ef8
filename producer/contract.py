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
"""``auto`` uses KoELECTRA when the worker has it loaded, else EXAONE."""

LABEL_SPAM = "spam"
LABEL_HAM = "ham"

# A result: ``label`` ("spam"/"ham"), ``spam_score`` (0..1), ``model`` (which one decided),
# ``truncated`` (the text was longer than the model's window). A batch item that failed validation
# is ``{"error": "...", "index": i}`` instead.


class InvalidInput(ValueError):
    """The task's arguments are unusable (wrong type, empty, too long, unknown model). Never retried."""


class ModelUnavailable(LookupError):
    """The worker that took the task has not loaded the requested model."""


class ClassificationFailed(RuntimeError):
    """The worker could not score the text (out of memory even alone). Never retried."""
