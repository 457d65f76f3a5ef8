"""Model loading strategies, chosen by ``MODEL_LOADER``. Each is a :class:`BaseLoader` subclass."""

from __future__ import annotations

from worker.loading.base import BaseLoader, LoadedModel
from worker.loading.snapshot_loader import SnapshotLoader
from worker.loading.transformers_loader import TransformersLoader
from worker.settings import Settings

LOADERS: dict[str, type[BaseLoader]] = {
    "snapshot": SnapshotLoader,
    "transformers": TransformersLoader,
}


def get_loader(settings: Settings, **options: object) -> BaseLoader:
    """The ``MODEL_LOADER`` strategy; ``options`` are its own (a strategy refuses those it lacks)."""
    try:
        cls = LOADERS[settings.model_loader]
    except KeyError:
        raise ValueError(f"MODEL_LOADER {settings.model_loader!r} is not one of {', '.join(LOADERS)}") from None
    return cls(settings, **options)


__all__ = ["LOADERS", "BaseLoader", "LoadedModel", "get_loader"]
