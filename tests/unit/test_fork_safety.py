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
from worker.telemetry import folders

reload_outcome = None
if len(sys.argv) > 1:  # then a reload onto the adapter in argv[1], up to the children's switch
    import importlib
    import time
    from worker.lifecycle import reload
    from worker.lifecycle.fleet import fleet

    importlib.import_module("worker.settings")._process_env["EXAONE_ADAPTER_DIR"] = sys.argv[1]
    fleet.live_pids = lambda: set()
    reload._wait = lambda check, timeout, what: "the replay stops before the children switch"
    reload_id = reload.reload_models(None, "exaone")["reload"]
    while not reload._reloads[reload_id]["done"]:
        time.sleep(0.1)
    reload_outcome = reload._reloads[reload_id]["models"]["exaone"]
folders.remove(startup._Shared.stats_folder)  # what the worker's shutdown would do
print(json.dumps({"reload": reload_outcome, "calls": calls,
                  "nvml": __import__("os").environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
                  "imported": sorted(m for m in ("bitsandbytes", "peft", "transformers", "worker.serving.classifiers")
                                     if m in sys.modules)}))
"""


def _replay(models, tmp_path, *argv: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "KOELECTRA_", "EXAONE_", "PYTORCH_"))}
    # The start-up most tempted to touch CUDA: DEVICE=auto, both models, EXAONE quantized (bitsandbytes).
    env.update(models.env(DEVICE="auto", USE_QUANTIZATION="true", TORCH_DTYPE="auto", PREFETCH_WEIGHTS="true",
                          SNAPSHOT_DIR=str(tmp_path / "snapshots"), CELERY_BROKER_URL="redis://127.0.0.1:1/0",
                          CELERY_RESULT_BACKEND="redis://127.0.0.1:1/1"))
    out = subprocess.run([sys.executable, "-c", _REPLAY, *argv], capture_output=True, text=True, env=env, timeout=400,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_prefork_main_process_makes_no_cuda_call(models, tmp_path):
    state = _replay(models, tmp_path)
    assert state["calls"] == [], f"CUDA touched before the fork: {state['calls']}"
    assert state["imported"] == ["transformers"], "bitsandbytes and PEFT must not be imported before the fork"
    assert state["nvml"] == "1"


def test_a_reload_onto_a_quantized_dora_adapter_leaves_the_main_process_clean(models, tmp_path):
    """The reload's check (build, quantize, load, warm up) runs in a builder process: the main process,
    which forks every later child, still makes no CUDA call and imports neither PEFT nor bitsandbytes."""
    from tests import factories

    dora = factories.build_exaone_adapter(tmp_path / "dora", models.exaone, dora=True)
    state = _replay(models, tmp_path, str(dora))
    assert state["reload"].get("prepare_s") is not None and state["reload"]["new"], state["reload"]
    assert state["calls"] == [], f"CUDA touched in the main process: {state['calls']}"
    assert state["imported"] == ["transformers"], "bitsandbytes and PEFT must not be imported in the main process"
