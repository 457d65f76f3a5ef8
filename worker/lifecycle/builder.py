"""``python -m worker.lifecycle.builder``: build or check one model version in a process of its own.

A snapshot build (converting the base, merging an adapter, quantizing) and a reload's check (load the
new version and run a warm-up pass, as a serving process will) are model work. Done here, in a fresh
process started for it:

- a prefork worker's main process never loads a model, imports PEFT or bitsandbytes, or touches CUDA
  while it can fork (a child forked meanwhile would inherit a held lock or a poisoned CUDA state);
- the build runs on the CPU, never beside the served copy on the GPU (a snapshot is a file: one built
  on the CPU loads on CUDA, quantized ones included), and its memory goes back to the OS when it exits;
- it outlives the serving process that wanted it (a child recycled by ``max_tasks_per_child`` or
  killed), since the worker's main process owns it.

It reads one JSON request on stdin, ``{"action": "build" | "check", "model": name, "env": {...}}``
(``env``: the worker's settings as variables, :meth:`Settings.to_env`, with the model paths pinned),
and writes one JSON line on stdout: ``{"ok": true, "version": ...}`` or ``{"ok": false, "error": line}``.
Its log goes to the worker's (stderr).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace

ACTIONS = ("build", "check")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[%(asctime)s: %(levelname)s/builder-{os.getpid()}] %(message)s")
    # Terminated by a newer version: unwind, so the build's temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    request = json.loads(sys.stdin.read())
    # The answer gets stdout to itself: whatever the libraries print goes to the log.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    start = time.perf_counter()
    try:
        version = run(request["action"], request["model"], request["env"])
    except Exception as exc:  # noqa: BLE001 - one line for the worker, whatever failed
        from worker.errors import ModelLoadError, first_line

        line = str(exc) if isinstance(exc, ModelLoadError) else \
            f"cannot load model {request.get('model')!r}: {type(exc).__name__}: {first_line(exc)}"
        logging.getLogger(__name__).error("%s", line)
        print(json.dumps({"ok": False, "error": line}), file=answer, flush=True)
        return 1
    print(json.dumps({"ok": True, "version": version, "seconds": round(time.perf_counter() - start, 3)}),
          file=answer, flush=True)
    return 0


def run(action: str, name: str, env: dict[str, str]) -> str:
    """``build``: whatever a later load of ``name`` reads (its snapshot); ``check``: also load it as a
    serving process will and run the warm-up pass. Returns the ``model_version``."""
    from worker.settings import Settings

    if action not in ACTIONS:
        raise ValueError(f"unknown builder action {action!r}")
    settings = replace(Settings.from_env(env, dotenv=False), device="cpu")
    from worker.lifecycle.startup import import_libraries

    import_libraries(settings)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # leave cores to the serving processes
    from worker.lifecycle.registry import load_classifier
    from worker.loading import get_loader

    if action == "build":
        return get_loader(settings).prepare(settings.source(name))
    version = get_loader(settings, serve_unmerged=True).prepare(settings.source(name))
    checked = load_classifier(name, settings, serve_unmerged=True).version
    if checked != version:
        raise RuntimeError(f"the files changed while they were checked ({version} then {checked})")
    return version


if __name__ == "__main__":
    sys.exit(main())
