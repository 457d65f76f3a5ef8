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


def get_loader(settings: Settings) -> BaseLoader:
    try:
        return LOADERS[settings.model_loader](settings)
    except KeyError:
        raise ValueError(f"MODEL_LOADER {settings.model_loader!r} is not one of {', '.join(LOADERS)}") from None


__all__ = ["LOADERS", "BaseLoader", "LoadedModel", "get_loader"]
