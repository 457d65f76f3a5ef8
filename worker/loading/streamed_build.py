"""Snapshots written tensor by tensor: each weight read, renamed, cast, merged and written in turn.

Built the reference way, a base snapshot is ``from_pretrained`` of the whole checkpoint (fp32 shards
cast to bf16) then ``save_pretrained``, and a merged one loads the whole base and merges into fresh
memory: a second model beside the served one (19 GB peak for EXAONE-2.4B). A snapshot is only a
file, so here it is written as a stream, a few tensors in memory at a time:

- what to write (names, shapes, dtypes, tied weights) comes from the model built on the meta
  device, without weights;
- checkpoint keys are renamed by transformers' own rules for that model (EXAONE's remote-code names
  to Llama's, a base-model prefix added or dropped) and written under the names its
  ``save_pretrained`` would use (it reverts the renaming), so a snapshot loads exactly as before;
- each weight is cast as transformers' load casts it, then given its LoRA update by the fused
  ``addmm`` of :func:`worker.loading.adapters.merge_and_unload` (the same rounding, so the same
  scores), or replaced by the adapter's saved module (a ``SEQ_CLS`` head);
- ``config.json`` and ``generation_config.json`` are the ones ``save_pretrained`` writes.

Everything is checked before a byte is written. What does not fit raises :class:`Unstreamable`
with the reason, and the caller builds the reference way, which loads the model (and names any
real problem with it): ``.bin`` checkpoints, conversions other than renaming (fused or split
weights), remote code, modules kept in fp32, tied weights the checkpoint also stores, weights
missing or of the wrong shape, adapters other than plain LoRA.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from worker.errors import ModelLoadError
from worker.loading import lora
from worker.loading.adapters import check_fits
from worker.loading.memory_cap import meta_model
from worker.loading.plan import LoadPlan
from worker.loading.safetensors_stream import (
    Entry,
    FormatError,
    Writer,
    read_block,
    read_header,
    read_tensor,
    row_blocks,
)

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
_BLOCK = 64 << 20
"""Source bytes of a tensor that is only cast, read and cast at a time (EXAONE-2.4B's embedding is 1 GB)."""


class Unstreamable(Exception):
    """Why a snapshot is built the reference way instead."""


@dataclass(frozen=True)
class _Source:
    """Where one written tensor comes from, and what is done to it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None = None
    entry: Entry | None = None
    """The checkpoint (or base snapshot) tensor; None when the adapter supplies the tensor or for a
    base's head that only adapters supply (written as zeros: no adapter-free model uses it)."""
    saved: torch.Tensor | None = None
    lora: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(A, B)``: the weight becomes ``W + scale * B @ A``."""


@dataclass
class StreamedSnapshot:
    """A checked plan for one snapshot; :meth:`write` writes it into a folder."""

    name: str
    tensors: dict[str, _Source]
    config: Any
    generation_config: Any | None
    scale: float = 1.0

    def write(self, folder: Path) -> None:
        """Config files, then each weight read, cast (and merged) and written in turn, through buffers
        reused from one tensor to the next."""
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)
        files = {s.file for s in self.tensors.values() if s.file is not None}
        fds = {file: os.open(file, os.O_RDONLY) for file in files}
        scratch = _Scratch()
        try:
            with torch.no_grad(), Writer(folder / WEIGHTS, {k: (s.dtype, s.shape) for k, s in self.tensors.items()},
                                         {"format": "pt"}) as writer:
                for key in writer.order:
                    for block in self._blocks(self.tensors[key], fds, scratch):
                        writer.write(key, block)
        finally:
            for fd in fds.values():
                os.close(fd)
        size = (folder / WEIGHTS).stat().st_size
        log.info("%s: streamed %d tensors (%.2f GB) into %s in %.1fs", self.name, len(self.tensors), size / 1e9,
                 folder, time.perf_counter() - start)

    def _blocks(self, source: _Source, fds: dict[Path, int], scratch: _Scratch) -> Iterator[torch.Tensor]:
        """The tensor to write, whole or in blocks of rows. A tensor only cast goes in blocks (a cast
        is elementwise: the same bits as cast whole, as transformers casts on load); a merged one whole."""
        if source.entry is None:
            yield (source.saved if source.saved is not None else torch.zeros(source.shape)).to(source.dtype)
        elif source.lora is None:
            for offset, size, shape in row_blocks(source.entry, _BLOCK):
                into = scratch.bytes("read", size)
                yield scratch.cast(read_block(fds[source.file], offset, size, source.entry.dtype, shape, into),
                                   source.dtype)
        else:
            entry = source.entry
            weight = read_tensor(fds[source.file], entry, scratch.bytes("read", entry.end - entry.start))
            weight = scratch.cast(weight, source.dtype)
            a, b = source.lora
            merged = scratch.tensor("merged", source.dtype, source.shape)
            yield torch.addmm(weight, b.to(source.dtype), a.to(source.dtype), alpha=self.scale, out=merged)


class _Scratch:
    """Buffers reused from one tensor to the next: fresh memory costs a page fault per page (about
    10 s per 4.8 GB on the VM measured here), so a build allocates its few buffers once."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def bytes(self, slot: str, size: int) -> torch.Tensor:
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.uint8)
        return buffer[:size]

    def tensor(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return self.bytes(slot, n * dtype.itemsize).view(dtype).reshape(shape)

    def cast(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``value.to(dtype)`` (the same rounding: ``to`` is a copy into new memory), into a reused buffer."""
        if value.dtype == dtype:
            return value
        return self.tensor("cast", dtype, tuple(value.shape)).copy_(value)


def prepare(plan: LoadPlan, dtype: torch.dtype, files: list[Path], source: str | Path,
            merge: bool) -> StreamedSnapshot:
    """Plan the snapshot of ``plan`` in ``dtype`` from the safetensors ``files`` of ``source`` (the
    checkpoint, or a base snapshot); ``merge``: with the adapter merged in, else the base alone
    (with an adapter) or the whole model (without). Raises :class:`Unstreamable`."""
    adapter = plan.adapter
    if merge and (adapter is None or not lora.supported(adapter)):
        raise Unstreamable("the adapter is not plain LoRA")
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise Unstreamable("the weights are not all safetensors files")
    skeleton = meta_model(plan, dtype)
    if skeleton.is_remote_code():
        raise Unstreamable("the model class is remote code")
    if skeleton._get_dtype_plan(dtype):
        raise Unstreamable("the model keeps some modules in float32")
    renamings = _renamings(skeleton)
    expected = skeleton.state_dict()  # meta tensors: names, shapes, dtypes
    found = _checkpoint_keys(files, renamings, skeleton.base_model_prefix, expected)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})  # {target: source}, as save drops targets
    for target, tied_to in tied.items():
        if target in found or tied_to not in found and not (adapter is not None and adapter.covers(tied_to)):
            raise Unstreamable(f"tied weights {target} / {tied_to} not as the checkpoint stores them")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    if adapter is not None:
        try:
            check_fits(plan.name, skeleton, adapter)
            if merge:
                pairs, saved = lora.check(plan.name, skeleton, adapter)
        except ModelLoadError as exc:
            raise Unstreamable(str(exc)) from exc
    tensors: dict[str, _Source] = {}
    for key, meta in expected.items():
        if key in tied:
            continue
        shape = tuple(meta.shape)
        if key in saved:
            tensors[key] = _Source(meta.dtype, shape, saved=saved[key])
        elif key in found:
            file, entry = found[key]
            if entry.shape != shape:
                raise Unstreamable(f"{key} is {list(entry.shape)} in {file}, {list(shape)} in the model")
            tensors[key] = _Source(meta.dtype, shape, file, entry)
        elif adapter is not None and adapter.covers(key):
            tensors[key] = _Source(meta.dtype, shape)
        else:
            raise Unstreamable(f"{key} is in neither {source} nor the adapter")
    for path, (a, b) in pairs.items():
        key = f"{path}.weight"
        if key not in tensors or tensors[key].entry is None:
            raise Unstreamable(f"the LoRA layer {path} has no weight of its own in {source}")
        tensors[key] = _Source(tensors[key].dtype, tensors[key].shape, tensors[key].file, tensors[key].entry,
                               lora=(a, b))
    reverse = _reverse(renamings)
    written = {reverse(key): value for key, value in tensors.items()}
    if len(written) != len(tensors):
        raise Unstreamable("two weights would be written under one name")
    config = skeleton.config
    config.dtype = str(skeleton.dtype).split(".")[1]  # what save_pretrained records
    config.architectures = [type(skeleton).__name__]
    return StreamedSnapshot(plan.name, written, config, _generation_config(skeleton, source),
                            lora.scale(adapter) if pairs else 1.0)


def _renamings(skeleton: Any) -> list[Any]:
    """transformers' checkpoint-key transforms for this model, when all of them only rename."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError as exc:  # a transformers whose loading internals moved: the reference path works
        raise Unstreamable(f"transformers has no weight-renaming rules here ({exc})") from exc
    transforms = get_model_conversion_mapping(skeleton)
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        raise Unstreamable("the checkpoint's weights are converted on load, not only renamed")
    return transforms


def _checkpoint_keys(files: list[Path], renamings: list[Any], prefix: str,
                     expected: dict[str, torch.Tensor]) -> dict[str, tuple[Path, Entry]]:
    """Each model key the checkpoint supplies, renamed as ``from_pretrained`` renames it (its two tries:
    with the rules, then as the key stands with only the base-model prefix fixed); keys the model does
    not have are left out, as transformers leaves them."""
    from transformers.core_model_loading import rename_source_key

    found: dict[str, tuple[Path, Entry]] = {}
    for file in files:
        try:
            entries = read_header(file)
        except (OSError, FormatError) as exc:
            raise Unstreamable(str(exc)) from exc
        for key, entry in entries.items():
            renamed, _ = rename_source_key(key, renamings, [], prefix, expected)
            if renamed not in expected and key in expected:
                renamed, _ = rename_source_key(key, [], [], prefix, expected)
            if renamed not in expected:
                continue
            if renamed in found:
                raise Unstreamable(f"two checkpoint weights load into {renamed}")
            found[renamed] = (file, entry)
    return found


def _reverse(renamings: list[Any]):
    """The name ``save_pretrained`` writes a model key under: the renamings that matched, reverted."""
    from transformers.core_model_loading import apply_renamings

    used = [t.reverse_transform() for t in renamings[::-1] if t.was_used()]
    return lambda key: apply_renamings(key, used) if used else key


def _generation_config(skeleton: Any, source: str | Path) -> Any | None:
    """What ``from_pretrained`` gives a generative model (its ``generation_config.json``, or one made
    from ``config.json``) and ``save_pretrained`` writes; None for a classifier."""
    if not skeleton.can_generate():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:
        return GenerationConfig.from_pretrained(source, config_file_name="config.json", _from_model_config=True)
