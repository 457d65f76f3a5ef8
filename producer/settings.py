"""Where the producer finds the broker: the same variables as the worker, read from env or ``.env``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dotenv import load_dotenv


@dataclass(frozen=True)
class ProducerSettings:
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str = "redis://localhost:6379/1"

    @classmethod
    def from_env(cls) -> ProducerSettings:
        load_dotenv(Path.cwd() / ".env", override=False)
        return cls(
            broker_url=os.environ.get("CELERY_BROKER_URL", cls.broker_url),
            result_backend=os.environ.get("CELERY_RESULT_BACKEND", cls.result_backend),
        )
