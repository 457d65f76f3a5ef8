"""Fork safety of the prefork main process: nothing there may touch CUDA, since the first driver
call (``torch.cuda.is_available()`` without NVML, which bitsandbytes makes at import) leaves every
later fork unable to use CUDA. The test replays the main process's start-up, the real Celery
worker built with the prefork pool up to the fork, with ``torch.cuda``'s functions patched to
record their calls, and asserts none was made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_REPLAY = """
import json, sys
import torch

calls = []
def recording(owner, name):
    original = getattr(owner, name, None)
    if original is None:
        return
    def record(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    setattr(owner, name, record)

for name in ("is_available", "device_count", "current_device", "init", "_lazy_init", "set_device",
             "get_device_name", "get_device_properties", "get_device_capability", "synchronize", "empty_cache",
             "mem_get_info", "memory_allocated", "memory_reserved", "manual_seed_all"):
    recording(torch.cuda, name)
for name in ("_cuda_getDeviceCount", "_cuda_init"):
    recording(torch._C, name)

from worker.celery import app
# The worker a `celery -A worker worker --pool=prefork` start builds: every bootstep up to the fork,
# our Preload step included (weights prefetch, the libraries' and the models' code imports).
worker = app.WorkController(pool_cls="prefork", concurrency=2, without_mingle=True, without_gossip=True,
                            hostname="replay@test", loglevel="WARNING")
from worker.lifecycle import startup
from worker.telemetry import stats
stats.remove_folder(startup._Shared.stats_folder)  # what the worker's shutdown would do
print(json.dumps({"calls": calls, "nvml": __import__("os").environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
                  "imported": sorted(m for m in ("bitsandbytes", "peft", "transformers", "worker.serving.classifiers")
                                     if m in sys.modules)}))
"""


def test_the_prefork_main_process_makes_no_cuda_call(models, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "KOELECTRA_", "EXAONE_", "PYTORCH_"))}
    # The start-up most tempted to touch CUDA: DEVICE=auto, both models, EXAONE quantized (bitsandbytes).
    env.update(models.env(DEVICE="auto", USE_QUANTIZATION="true", TORCH_DTYPE="auto", PREFETCH_WEIGHTS="true",
                          SNAPSHOT_DIR=str(tmp_path / "snapshots"), CELERY_BROKER_URL="redis://127.0.0.1:1/0",
                          CELERY_RESULT_BACKEND="redis://127.0.0.1:1/1"))
    out = subprocess.run([sys.executable, "-c", _REPLAY], capture_output=True, text=True, env=env, timeout=240,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["calls"] == [], f"CUDA touched before the fork: {state['calls']}"
    assert state["imported"] == ["transformers"], "bitsandbytes and PEFT must not be imported before the fork"
    assert state["nvml"] == "1"
