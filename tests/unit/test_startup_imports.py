"""The start-up import of the heavy libraries: garbage collection paused, then the imports frozen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_IMPORT = """
import gc, json, sys
from worker.settings import Settings
if sys.argv[1] == "disabled":
    gc.disable()
from worker.lifecycle.startup import import_libraries
import_libraries(Settings.from_env({"PRELOAD_MODELS": "koelectra", "KOELECTRA_MODEL": sys.argv[2]}, dotenv=False))
print(json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                  "modeling": "transformers.models.electra.modeling_electra" in sys.modules}))
"""


def _run(models, gc_state: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _IMPORT, gc_state, str(models.koelectra)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[2])
    return json.loads(out.stdout.splitlines()[-1])


def test_collector_is_back_on_and_the_imports_frozen(models):
    state = _run(models, "enabled")
    assert state["enabled"] and state["modeling"]
    assert state["frozen"] > 100_000  # torch + transformers: hundreds of thousands of objects


def test_a_caller_that_disabled_the_collector_keeps_it_disabled(models):
    assert _run(models, "disabled") == {"enabled": False, "frozen": 0, "modeling": True}
