"""How both sides talk to Redis: certificate checks on ``rediss://`` URLs, and the socket options that
bound a dead or half-open connection. Torch-free; the worker's Celery settings use it too, so the
producer and the workers cannot drift.

- kombu turns certificate checks off, with one warning, for a ``rediss://`` broker URL that does not
  name ``ssl_cert_reqs``, while Celery's Redis result backend refuses the same URL: an operator who
  fixes the backend URL leaves the broker, which carries every message and the password, open to a
  man in the middle. So both sides refuse such URLs (:func:`tls_problem`); ``ssl_cert_reqs=none``
  is accepted only with ``REDIS_TLS_INSECURE=true``, and then warned about at every start.
- kombu's broker connection waits forever by default (``socket_timeout`` None) and the result
  backend 120 s per command: a Redis that vanished without closing the TCP connection (failover,
  NAT or firewall timeout) blocks a publish or an ack until the kernel gives up, which takes many
  minutes. :func:`broker_transport_options` and :func:`backend_options` set a socket timeout, TCP
  keepalive and Redis health checks on both connections.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

VERIFYING = ("required", "CERT_REQUIRED", "optional", "CERT_OPTIONAL")
"""``ssl_cert_reqs`` values that check the server's certificate (a client's ``optional`` checks it
as ``required`` does: Python's ``ssl`` module)."""
NOT_VERIFYING = ("none", "CERT_NONE")

KEEPALIVE_IDLE_S = 30
KEEPALIVE_INTERVAL_S = 10
KEEPALIVE_PROBES = 3
"""An idle broker connection whose peer is gone is found dead after about 30 + 3 x 10 = 60 s,
instead of the kernel's default two hours."""


def tls_problem(url: str, insecure_allowed: bool) -> str | None:
    """Why ``url`` must be refused, in one line naming ``ssl_cert_reqs``; None when it is fine.

    A ``rediss://`` URL must say ``ssl_cert_reqs=required`` (or ``optional``); ``none`` only with
    ``REDIS_TLS_INSECURE=true``. The URL is never quoted back: it may hold the password.
    Several broker URLs (``;``-separated failover) are checked one by one.
    """
    for value in _cert_reqs(url):
        if value is None:
            return ("a rediss:// URL must say ssl_cert_reqs=required (and ssl_ca_certs=/path/ca.crt for a "
                    "private CA); without it kombu connects without checking the server's certificate")
        if value in NOT_VERIFYING:
            if not insecure_allowed:
                return (f"ssl_cert_reqs={value} turns certificate checks off; use ssl_cert_reqs=required, or "
                        "set REDIS_TLS_INSECURE=true to accept a connection anyone in between can read")
        elif value not in VERIFYING:
            return f"ssl_cert_reqs={value!r} is not one of required, optional, none"
    return None


def unverified(url: str) -> bool:
    """``url`` (or one of its failover URLs) is ``rediss://`` with certificate checks off."""
    return any(value in NOT_VERIFYING for value in _cert_reqs(url))


def _cert_reqs(url: str) -> Iterator[str | None]:
    """The ``ssl_cert_reqs`` of each ``rediss://`` URL in ``url`` (``;``-separated failover), None where absent."""
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme == "rediss":
            yield dict(parse_qsl(parts.query)).get("ssl_cert_reqs")


def lost_connection(exc: BaseException) -> bool:
    """``exc`` says Redis is unreachable (refused, dropped or timed out), whichever client raised it."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, OperationalError | RedisConnectionError | RedisTimeout | ConnectionError)


def insecure_warnings(broker_url: str, result_backend: str) -> list[str]:
    """One line per URL that connects without checking the certificate (``REDIS_TLS_INSECURE``)."""
    return [f"{variable} connects with ssl_cert_reqs=none (REDIS_TLS_INSECURE=true): the server's certificate "
            "is not checked, so anyone in between can read the messages and the password"
            for variable, url in (("CELERY_BROKER_URL", broker_url), ("CELERY_RESULT_BACKEND", result_backend))
            if unverified(url)]


def keepalive_options() -> dict[int, int]:
    """TCP keepalive timers for the broker's sockets, where this platform has them (Linux does)."""
    wanted = {"TCP_KEEPIDLE": KEEPALIVE_IDLE_S, "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_S, "TCP_KEEPCNT": KEEPALIVE_PROBES}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def broker_transport_options(socket_timeout_s: float, health_check_interval_s: int) -> dict:
    """kombu Redis transport options: no command waits longer than ``socket_timeout_s`` (the publish
    or ack then fails over to a new connection, within its retry policy), idle sockets are probed,
    and a connection idle longer than ``health_check_interval_s`` is PINGed before it is used."""
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": health_check_interval_s,
    }


def backend_options(socket_timeout_s: float, health_check_interval_s: int) -> dict:
    """Celery settings for the Redis result backend, the same bounds as the broker's. Celery has no
    setting for the keepalive timers here: the result backend's sockets use the kernel's
    (``net.ipv4.tcp_keepalive_time``), and its socket timeout is what bounds a command."""
    return {
        "redis_socket_timeout": socket_timeout_s,
        "redis_socket_connect_timeout": socket_timeout_s,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": health_check_interval_s,
    }
