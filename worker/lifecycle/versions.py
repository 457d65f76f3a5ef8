"""``model_version``: a short id of the weights (and, for a prompt head, the prompt) that decided.

The same files give the same id in every process, on every host and across restarts; it changes
when the base checkpoint, the adapter's weights or config, the classification labels or the prompt
contract change. Adapter files and the prompt are hashed whole (megabytes). The base checkpoint is
gigabytes that a start from a snapshot never reads, so it is identified by its config, each weight
file's name and size, its safetensors header (every tensor's name, dtype, shape and offsets) and
64 KiB samples at 64 evenly spaced offsets (a file of up to 4 MiB is hashed whole): a different or
retrained base changes these, at a cost of a few megabytes read per start. Neither dtype nor
quantization enters the id: the same trained model on a CPU and on a GPU host has one version
(the stats say how each process holds it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.loading.plan import LoadPlan

_SAMPLES = 64
_SAMPLE_BYTES = 64 * 1024
_HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB
LENGTH = 12


def model_version(plan: LoadPlan, use_safetensors: bool) -> str:
    """The version of ``plan``'s model, from its base checkpoint's weight files, adapter and prompt."""
    from worker.loading.plan import weight_files

    base_files = weight_files(plan.model_id, use_safetensors)
    h = hashlib.sha256()
    config = Path(plan.model_id) / "config.json"
    h.update(config.read_bytes() if config.is_file() else plan.model_id.encode())
    for file in sorted(base_files, key=lambda f: f.name):
        h.update(f"\0{file.name}\0".encode())
        _sample_file(h, file)
    if plan.adapter is not None:
        for file in sorted(plan.adapter.path.iterdir()):
            if file.is_file() and (file.name.startswith("adapter_") or file.name == "config.json"):
                h.update(f"\0adapter/{file.name}\0".encode())
                h.update(file.read_bytes())
    h.update(json.dumps({"head": plan.head, "labels": plan.labels}).encode())
    if plan.prompt is not None:
        h.update(plan.prompt.canonical().encode())
    return h.hexdigest()[:LENGTH]


def _sample_file(h: hashlib._Hash, file: Path) -> None:
    size = file.stat().st_size
    h.update(str(size).encode())
    if size <= _SAMPLES * _SAMPLE_BYTES:
        h.update(file.read_bytes())
        return
    with file.open("rb") as fh:
        if file.suffix == ".safetensors":
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, _HEADER_LIMIT)))
        step = max(1, size // _SAMPLES)
        for offset in range(0, size, step):
            fh.seek(offset)
            h.update(fh.read(_SAMPLE_BYTES))
