"""``python -m producer stats``: every worker's models, load figures and memory, as a table.

The figures come from ``celery inspect stats`` (the same the workers give Flower), so this needs
only the broker. Keys look like ``child0.pid123.exaone.load_s`` and ``child0.pid123.rss_mb``.
"""

from __future__ import annotations

from typing import Any

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
