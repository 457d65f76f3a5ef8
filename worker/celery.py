"""The Celery application: ``celery -A worker worker`` runs it, ``celery -A worker flower`` watches it."""

from __future__ import annotations

import os
import sys

# torch.cuda.is_available() then asks NVML instead of initialising the CUDA driver, which would
# leave every later fork unable to use CUDA; set before anything imports torch.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from celery import Celery

from worker.celeryconfig import celery_config
from worker.delivery import results
from worker.errors import SettingsError
from worker.settings import Settings

try:
    settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"worker: invalid setting {exc}")

app = Celery("spam", include=["tasks.spam"])
app.conf.update(celery_config(settings))
# The result backend by class and URL (worker.delivery.results): the CELERY_RESULT_BACKEND variable would
# override a ``result_backend`` setting naming the class.
app.backend_cls = results.backend_url(settings.celery_result_backend)

from worker.lifecycle import startup  # noqa: E402  (registers the start-up hooks on this app)

startup.install(app, settings)
