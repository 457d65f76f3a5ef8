"""The Celery application: ``celery -A worker worker`` runs it, ``celery -A worker flower`` watches it."""

from __future__ import annotations

import sys

from celery import Celery

from worker.celeryconfig import celery_config
from worker.errors import SettingsError
from worker.settings import Settings

try:
    settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"worker: invalid setting {exc}")

app = Celery("spam", include=["tasks.spam"])
app.conf.update(celery_config(settings))

from worker import startup  # noqa: E402  (registers the start-up hooks on this app)

startup.install(app, settings)
