"""``python -m worker.lifecycle.builder``: build what a model version is served from, in a process of its own.

A snapshot build (converting the base, merging an adapter, quantizing) is model work. Done here, in a
fresh process started for it:

- a prefork worker's main process never loads a model, imports PEFT or bitsandbytes, or touches CUDA
  while it can fork (a child forked meanwhile would inherit a held lock or a poisoned CUDA state);
- the build runs on the CPU, never beside the served copy on the GPU (a snapshot is a file: one built
  on the CPU loads on CUDA, quantized ones included), and its memory goes back to the OS when it exits;
- it outlives the serving process that wanted it (a child recycled by ``max_tasks_per_child`` or
  killed), since the worker's main process owns it.

It reads one JSON request on stdin, ``{"model": name, "env": {...}, "unmerged": bool}`` (``env``: the
worker's settings as variables, :meth:`Settings.to_env`, with the model paths pinned; ``unmerged``:
only what a plain LoRA adapter is served over at first, the converted base, with the adapter checked
against it), and writes one JSON line on stdout: ``{"ok": true, "version": ...}`` or ``{"ok": false,
"error": line}``. Its log goes to the worker's (stderr).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import replace


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
        version = run(request["model"], request["env"], request.get("unmerged", False))
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


def run(name: str, env: dict[str, str], unmerged: bool = False) -> str:
    """Build what a load of ``name`` with these settings reads, and check it as far as it can be
    checked without serving (the plan, adapter, tokenizer, the prompt's answers); its ``model_version``."""
    from worker.settings import Settings

    settings = replace(Settings.from_env(env, dotenv=False), device="cpu")
    from worker.lifecycle.startup import import_libraries

    import_libraries(settings)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # leave cores to the serving processes
    from worker.loading import get_loader

    return get_loader(settings, serve_unmerged=unmerged).prepare(settings.source(name))


if __name__ == "__main__":
    sys.exit(main())
