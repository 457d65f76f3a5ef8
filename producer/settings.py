"""Where the producer finds the broker and how it connects: the same variables as the worker, read
from the environment or ``.env``, checked the way the worker checks them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import load_dotenv

from producer.connection import tls_problem

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ProducerSettingsError(ValueError):
    """A variable the producer reads has a value it cannot use; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class ProducerSettings:
    broker_url: str = "redis://localhost:6379/0"
    result_backend: str = "redis://localhost:6379/1"
    redis_socket_timeout_s: float = 5.0
    """No Redis command waits longer (``REDIS_SOCKET_TIMEOUT_S``, as on the worker)."""
    redis_health_check_interval_s: int = 25
    """A connection idle this long is PINGed before use (``REDIS_HEALTH_CHECK_INTERVAL_S``)."""
    redis_tls_insecure: bool = False
    """Accept ``ssl_cert_reqs=none`` in a ``rediss://`` URL (``REDIS_TLS_INSECURE``), warned about."""

    def __post_init__(self) -> None:
        for variable, url in (("CELERY_BROKER_URL", self.broker_url), ("CELERY_RESULT_BACKEND", self.result_backend)):
            if problem := tls_problem(url, self.redis_tls_insecure):
                raise ProducerSettingsError(variable, problem)
        if self.redis_socket_timeout_s < 1:
            raise ProducerSettingsError("REDIS_SOCKET_TIMEOUT_S", "must be at least 1 second")
        if self.redis_health_check_interval_s < 0:
            raise ProducerSettingsError("REDIS_HEALTH_CHECK_INTERVAL_S", "must be 0 (off) or a number of seconds")

    @classmethod
    def from_env(cls) -> ProducerSettings:
        load_dotenv(Path.cwd() / ".env", override=False)
        env = os.environ
        return cls(
            broker_url=env.get("CELERY_BROKER_URL", cls.broker_url),
            result_backend=env.get("CELERY_RESULT_BACKEND", cls.result_backend),
            redis_socket_timeout_s=_number(env, "REDIS_SOCKET_TIMEOUT_S", cls.redis_socket_timeout_s, float),
            redis_health_check_interval_s=_number(env, "REDIS_HEALTH_CHECK_INTERVAL_S",
                                                  cls.redis_health_check_interval_s, int),
            redis_tls_insecure=_flag(env, "REDIS_TLS_INSECURE"),
        )


def _number(env: Mapping[str, str], variable: str, default: float, kind: type) -> float:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ProducerSettingsError(variable, f"{raw!r} is not a {'whole ' if kind is int else ''}number") from None


def _flag(env: Mapping[str, str], variable: str) -> bool:
    raw = env.get(variable, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ProducerSettingsError(variable, f"{raw!r} is not a boolean (use true or false)")
