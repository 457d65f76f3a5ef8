"""``python -m producer stats``: every worker's models, load figures and memory, as a table, then
the messages the workers gave up on.

The figures come from ``celery inspect stats`` (the same the workers give Flower), so this needs
only the broker. Keys look like ``child0.pid123.exaone.load_s`` and ``child0.pid123.rss_mb``. The
dead-letter list is a Redis list on the broker (:data:`producer.contract.DEAD_LETTER_LIST`).
"""

from __future__ import annotations

import json
from typing import Any

from producer.contract import DEAD_LETTER_LIST

MODEL_COLUMNS = [
    ("model", "model"), ("version", "version"), ("load_s", "load s"), ("source", "source"),
    ("bytes_read_mb", "MB read"), ("read_gbps", "GB/s"), ("device", "device"), ("dtype", "dtype"),
    ("quantization", "quant"), ("precision", "precision"),
]
PROCESS_COLUMNS = [
    ("rss_mb", "RSS MB"), ("pss_mb", "PSS MB"), ("tasks_done", "done"), ("tasks_failed", "failed"),
    ("latency_p50_ms", "p50 ms"), ("latency_p95_ms", "p95 ms"), ("batch_mean", "batch"),
    ("reload_outcome", "reload"), ("reload_at", "reloaded at"), ("reload_s", "reload s"),
]


def rows(stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (worker, process, model) from ``inspect().stats()``."""
    out: list[dict[str, Any]] = []
    for worker in sorted(stats):
        processes: dict[str, dict[str, Any]] = {}
        for key, value in stats[worker].items():
            parts = key.split(".")
            if len(parts) < 3 or not parts[1].startswith("pid"):
                continue
            process = processes.setdefault(f"{parts[0]} {parts[1]}", {"models": {}})
            if len(parts) == 3:
                process[parts[2]] = value
            else:
                process["models"].setdefault(parts[2], {})[parts[3]] = value
        for name in sorted(processes):
            process = processes[name]
            for model in sorted(process["models"]) or [""]:
                row = {"worker": worker, "process": name, "model": model, **process["models"].get(model, {})}
                row.update({k: v for k, v in process.items() if k != "models"})
                out.append(row)
    return out


def render(stats: dict[str, dict[str, Any]]) -> str:
    table = rows(stats)
    if not table:
        return "no worker answered (is one running, on this broker?)"
    columns = [("worker", "worker"), ("process", "process"), *MODEL_COLUMNS, *PROCESS_COLUMNS]
    cells = [[header for _, header in columns]]
    cells += [[_fmt(row.get(key, "")) for key, _ in columns] for row in table]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def read_dead_letters(app, limit: int = 10) -> tuple[int, list[dict[str, Any]]]:
    """How many messages the dead-letter list holds, and the newest ``limit`` of them."""
    with app.connection_for_read() as connection:
        with connection.default_channel.conn_or_acquire() as client:
            with client.pipeline() as pipe:
                pipe.llen(DEAD_LETTER_LIST)
                pipe.lrange(DEAD_LETTER_LIST, 0, limit - 1)
                total, raw = pipe.execute()
    records = []
    for item in raw:
        try:
            records.append(json.loads(item))
        except ValueError:
            records.append({"reason": "(unreadable record)"})
    return total, records


def render_dead_letters(total: int, records: list[dict[str, Any]]) -> str:
    """One line per dead-lettered message, newest first."""
    if not total:
        return f"dead-lettered messages: none ({DEAD_LETTER_LIST})"
    lines = [f"dead-lettered messages: {total} in the Redis list {DEAD_LETTER_LIST}"
             + (f", the newest {len(records)}:" if total > len(records) else ":")]
    for r in records:
        lines.append(f"  {r.get('at', '?')}  {r.get('task_id', '?')}  {r.get('task', '?')}  "
                     f"from {r.get('queue') or '?'} on {r.get('worker') or '?'}: {r.get('reason', '?')}")
    return "\n".join(lines)
