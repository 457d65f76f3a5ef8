"""``model_version``: a short id of everything that decides a model's scores.

The same files give the same id in every process, on every host and across restarts, whatever
path or Hub id named them: files are identified by their content and their names within the
model's folder, never by where that folder is. The id covers the base checkpoint, the adapter's
weights and config, the tokenizer's files (with the chat template they hold), the classification
labels, the prompt contract and ``EXAONE_MAX_TOKENS``; a change to any of them changes it.

Adapter, tokenizer and prompt files are hashed whole (megabytes). The base checkpoint is
gigabytes that a start from a snapshot never reads, so it is identified by its config, each
weight file's name and size, its safetensors header (every tensor's name, dtype, shape and
offsets) and 64 KiB samples at 64 evenly spaced offsets (a file of up to 4 MiB is hashed whole):
a different or retrained base changes these, at a cost of a few megabytes read per start. Neither
dtype nor quantization enters the id: the same trained model on a CPU and on a GPU host has one
version, and each result says its ``precision`` beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.loading.plan import LoadPlan
    from worker.settings import Settings

_SAMPLES = 64
_SAMPLE_BYTES = 64 * 1024
_HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB
LENGTH = 12

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
"""The files a tokenizer and its chat template are read from (``additional_chat_templates/`` too)."""


def model_version(plan: LoadPlan, settings: Settings) -> str:
    """The version of ``plan``'s model as ``settings`` serve it (``USE_SAFETENSORS`` picks the weight
    files, ``EXAONE_MAX_TOKENS`` where EXAONE's messages are cut)."""
    from worker.loading.plan import weight_files

    h = hashlib.sha256()
    base = local_folder(plan.model_id)
    config = base / "config.json" if base is not None else None
    # A Hub id that is not in the local cache: nothing to read, so the id itself stands for it.
    h.update(config.read_bytes() if config is not None and config.is_file() else plan.model_id.encode())
    for file in sorted(weight_files(plan.model_id, settings.use_safetensors), key=lambda f: f.name):
        h.update(f"\0{file.name}\0".encode())
        _sample_file(h, file)
    if plan.adapter is not None:
        for file in sorted(plan.adapter.path.iterdir()):
            if file.is_file() and (file.name.startswith("adapter_") or file.name == "config.json"):
                h.update(f"\0adapter/{file.name}\0".encode())
                h.update(file.read_bytes())
    tokenizer = local_folder(plan.tokenizer_source)
    for file in tokenizer_files(tokenizer) if tokenizer is not None else []:
        h.update(f"\0tokenizer/{file.relative_to(tokenizer)}\0".encode())
        h.update(file.read_bytes())
    h.update(json.dumps({"head": plan.head, "labels": plan.labels,
                         "max_tokens": settings.exaone_max_tokens if plan.name == "exaone" else None}).encode())
    if plan.prompt is not None:
        h.update(plan.prompt.canonical().encode())
    return h.hexdigest()[:LENGTH]


def local_folder(model_id: str) -> Path | None:
    """The folder a model or tokenizer is read from: the folder itself, or a Hub id's snapshot in the
    local cache (never downloads); None when the id is not cached."""
    folder = Path(model_id)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a Hub id): the caller falls back to the id
        return None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer and chat-template files present in ``folder``, in a fixed order."""
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(f for f in extra.iterdir() if f.is_file())
    return files


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
