"""The worker app with a scorer that does no model work, for bench/throughput.py mode (e).

    celery -A bench.null_model worker --pool=threads --concurrency=32

Everything else is the real worker: the same tasks, settings, start-up, batcher, events, results
and acks; only each model's forward pass is replaced by a constant score. What such a worker
spends per message is Celery's own cost (receive, events, result, ack), the part of the CPU the
model cannot have.
"""

from __future__ import annotations

from types import SimpleNamespace

from worker.celery import app
from worker.lifecycle.registry import ModelRegistry
from worker.serving.score import Score
from worker.settings import Settings


class NullScorer:
    """Scores every text 0.5 at once; has what the registry and the batcher read of a classifier."""

    version = "null"
    loaded = SimpleNamespace(finish=None)  # nothing left to build after start-up (worker.lifecycle.finish)

    def __init__(self, name: str, batch_size: int) -> None:
        self.name = name
        self.batch_size = batch_size
        self.device = SimpleNamespace(type="cpu")

    def score(self, texts: list[str]) -> list[Score]:
        return [Score(0.5, False, version=self.version) for _ in texts]


def _preload(self: ModelRegistry, settings: Settings) -> None:
    for name in settings.preload_models:
        self._models[name] = NullScorer(name, settings.batch_size)


ModelRegistry.preload = _preload  # type: ignore[method-assign]

__all__ = ["app"]
