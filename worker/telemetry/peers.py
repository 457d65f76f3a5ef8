"""VISIBILITY_TIMEOUT_S, which every worker on a broker must share, compared with the peers' values.

kombu's restore sweep runs in every worker and requeues any unacknowledged message of the broker's
database older than *that worker's* visibility timeout: the ``unacked`` hash is one per database,
not per queue or worker. A worker with a shorter value than its peers so requeues their tasks
while they still run, and they run twice; a longer one only delays its own recovery. Celery never
compares the values (mingle exchanges revoked ids and clocks, and fleets often turn it off), so each
worker announces its own in a small Redis key with a TTL on the broker, reads its peers', and warns
while any differs. Flower and ``inspect stats`` show each worker's value and the differing peers.
"""

from __future__ import annotations

import logging
import threading

from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

KEY_PREFIX = "spam-workers:visibility-timeout:"
"""``<prefix><node name>`` holds a worker's value in seconds, on the broker's database."""
REFRESH_S = 30.0
TTL_S = 90
"""A stopped worker's key is deleted; a killed one's lapses three refreshes later."""


class Peers:
    """Announces this worker's value and compares it with the other workers', every ``REFRESH_S``."""

    def __init__(self, app, node: str, value: float, refresh_s: float = REFRESH_S) -> None:
        self.app, self.node, self.value, self.refresh_s = app, node, float(value), refresh_s
        self.differing: dict[str, float] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="visibility-peers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop announcing and take this worker's key away, so its peers stop comparing with it."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self.app.connection_for_write() as conn:
                _client(conn).delete(KEY_PREFIX + self.node)
        except Exception as exc:  # noqa: BLE001 - the key lapses by itself
            log.debug("could not remove %s%s: %s", KEY_PREFIX, self.node, exc)

    def figures(self) -> dict[str, object]:
        """Keys for ``inspect stats``: this worker's value, and the peers that differ (``node=s, ...``)."""
        figures: dict[str, object] = {"visibility_timeout_s": self.value}
        if self.differing:
            figures["visibility_timeout_differs"] = ", ".join(f"{n}={v:g}" for n, v in sorted(self.differing.items()))
        return figures

    def check(self) -> dict[str, float]:
        """Announce this worker's value and read the peers'; the ones that differ (and warn of them)."""
        with self.app.connection_for_write() as conn:
            client = _client(conn)
            client.set(KEY_PREFIX + self.node, repr(self.value), ex=TTL_S)
            keys = [k for k in client.scan_iter(match=KEY_PREFIX + "*", count=500)
                    if bytes_to_str(k) != KEY_PREFIX + self.node]
            values = client.mget(keys) if keys else []
        peers = {bytes_to_str(k).removeprefix(KEY_PREFIX): float(v)
                 for k, v in zip(keys, values, strict=True) if v is not None}
        differing = {node: v for node, v in peers.items() if v != self.value}
        if differing and differing != self.differing:
            log.warning("VISIBILITY_TIMEOUT_S is %g s here but %s: every worker requeues any unacknowledged "
                        "message older than its own value, so the shortest one redelivers the others' running "
                        "tasks; set one value on every worker", self.value,
                        ", ".join(f"{v:g} s on {n}" for n, v in sorted(differing.items())))
        self.differing = differing
        return differing

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next round tries again
                log.debug("visibility timeout check failed: %s", exc)
            self._stopped.wait(self.refresh_s)


def _client(conn):
    """The broker's own Redis client (its URL, TLS and socket options), connected at once or failing:
    a stopping worker must not wait on a Redis that is away."""
    conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    return conn.default_channel.client


_peers: Peers | None = None


def start(app, node: str, value: float) -> None:
    global _peers
    _peers = Peers(app, node, value)
    _peers.start()


def stop() -> None:
    if _peers is not None:
        _peers.stop()


def figures() -> dict[str, object]:
    return _peers.figures() if _peers is not None else {}
