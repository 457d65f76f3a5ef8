"""Pin a model version to the files behind its settings, resolved once.

A setting may name a symlink (``EXAONE_ADAPTER_DIR=/srv/adapters/exaone-current``) that an operator
flips to roll out a new adapter, or a Hub id whose local cache moves to a newer revision. A load that
read the config through the link at one moment and the weights a moment later could mix two
versions, and a process started later would load whatever the link names then, even a version a
reload refused. So every load, and the version a worker accepts, names real paths: the model folder
(a Hub id's cached snapshot folder when it is cached), the adapter folder and the prompt file,
resolved once with ``realpath``. A process forked later loads exactly what the worker serves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from worker.settings import Settings

log = logging.getLogger(__name__)


def pin(settings: Settings, names: tuple[str, ...] | None = None) -> Settings:
    """``settings`` with the model, adapter folder and prompt file of each of ``names`` (default: the
    preloaded models) resolved to real paths. What does not exist is left as it is: the load then
    fails on it with its usual message (or downloads a Hub id not cached yet)."""
    return replace(settings, **pinned_fields(settings, tuple(names if names is not None else settings.preload_models)))


def pinned_fields(settings: Settings, names: tuple[str, ...]) -> dict[str, str]:
    """The model fields of ``names`` as ``pin`` leaves them (what a reload compares and publishes)."""
    return {f: _real_field(f, getattr(settings, f)) for f in model_fields(names)}


def model_fields(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The settings fields that say where ``names`` come from (``exaone_model``, ``exaone_adapter_dir``...)."""
    from worker.settings import MODEL_FIELDS

    return tuple(f for f in MODEL_FIELDS if any(f.startswith(f"{n}_") for n in names))


def describe(configured: Settings, fields: list[str]) -> str:
    """``EXAONE_ADAPTER_DIR=/srv/exaone-current (-> /srv/exaone-v7)``: what the settings name now in
    ``fields``, and where each link leads."""
    parts = []
    for field in fields:
        value = getattr(configured, field, "")
        real = _real_field(field, value)
        parts.append(f"{field.upper()}={value}" + (f" (-> {real})" if real != value else ""))
    return ", ".join(parts)


def _real_field(field: str, value: str) -> str:
    """A model's real folder (or cached Hub snapshot); an adapter or prompt file's real path; empty stays."""
    if field.endswith("_model"):
        return _real_model(value)
    return _real(value) if value else value


def _real(value: str) -> str:
    path = Path(value).expanduser()
    return os.path.realpath(path) if path.exists() else value


def _real_model(value: str) -> str:
    """A local folder's real path; a Hub id's cached snapshot folder when it is cached."""
    path = Path(value).expanduser()
    if path.exists():
        return os.path.realpath(path)
    if value.startswith(("/", ".", "~")):
        return value
    from worker.lifecycle.versions import local_folder

    folder = local_folder(value)  # not cached (or not a Hub id): the load downloads or refuses it
    return os.path.realpath(folder) if folder is not None else value
