"""The fast strategy: prepared snapshots of the ready-to-serve weights.

The first start converts the checkpoint to the target dtype (the base snapshot), merges the LoRA
weights into it and writes the result as one safetensors file in the target dtype. Both are written
tensor by tensor (:mod:`worker.loading.streamed_build`), on the CPU, holding a few tensors rather
than a model; what cannot be streamed is built the reference way (``from_pretrained``, PEFT's merge,
``save_pretrained``). With ``USE_QUANTIZATION`` the merged model is then quantized with bitsandbytes
and written as a second snapshot. Every later start loads its snapshot directly: no PEFT wrapping,
no merge, no conversion, no quantization. The file is memory-mapped, so on CPU the prefork children
of one worker share one physical copy of it.

A snapshot lives in ``SNAPSHOT_DIR/<model>-<fingerprint>``; the fingerprint covers everything that
changes the weights (checkpoint and adapter files, dtype, head, library versions), so a changed
input builds a new snapshot rather than serving a stale one. It is written into a temporary folder
and renamed into place, under a file lock, so concurrent processes build it once and never see a
partial one. A snapshot whose files do not match its manifest is rebuilt, never served. Before a
build and after it, a model's snapshots beyond the ``SNAPSHOT_KEEP`` most recently used are
deleted, with the temporary folders of builds that died: a disk filled by old versions makes room
for the new one, and a build that fails leaves nothing behind.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open

from worker.errors import ModelLoadError
from worker.lifecycle import prefetch
from worker.loading import lora, streamed_build
from worker.loading.adapters import attach_adapter, merge_and_unload
from worker.loading.base import BaseLoader, LoadedWeights, StageTimer, checkpoint_files, load_adapted, load_base
from worker.loading.devices import Placement
from worker.loading.plan import LoadPlan, resolve
from worker.settings import ModelSource, Settings

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "snapshot.json"


class SnapshotLoader(BaseLoader):
    def __init__(self, settings: Settings, serve_before_build: bool = False, serve_unmerged: bool = False) -> None:
        """When the model's snapshot is not built yet, serve at once and leave the build to
        ``LoadedModel.finish``: ``serve_unmerged`` from the converted base with the adapter applied at
        run time (:mod:`worker.loading.lora`; a reload then serves a new adapter in seconds), else
        ``serve_before_build`` from the checkpoint the reference way (a first start then serves as soon
        as the reference path would)."""
        super().__init__(settings)
        self.serve_before_build = serve_before_build
        self.serve_unmerged = serve_unmerged

    def load_weights(self, plan: LoadPlan, placement: Placement, timer: StageTimer) -> LoadedWeights:
        inputs = self._inputs(plan, timer)
        if self.serve_unmerged:
            deferred = self._serve_unmerged(plan, placement, inputs, timer)
            if deferred is not None:
                return deferred
        if self.serve_before_build and placement.quantization is None:
            deferred = self._serve_before_build(plan, placement, inputs, timer)
            if deferred is not None:
                return deferred
        start = time.perf_counter()
        folder, built = self.ensure_snapshot(plan, placement, inputs)
        if built:
            timer.seconds["snapshot"] = round(time.perf_counter() - start, 4)
        source = "checkpoint+snapshot" if built else "snapshot"
        files = _weights(folder)
        # Mapped weights are otherwise read by page faults in the first forward pass, several times
        # slower than one sequential read; the read runs while the model is being built.
        reader = prefetch.read_in_background(files)
        with timer.stage("materialise"):
            model, info = plan.model_class.from_pretrained(
                folder, output_loading_info=True, **placement.from_pretrained_kwargs(quantize=False, plan=plan),
            )
        with timer.stage("read"):
            reader.join()
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"] | info["mismatched_keys"])
            raise ModelLoadError(plan.name, f"snapshot {str(folder)!r} does not match its model (first: {bad[0]})")
        if source != "snapshot":
            files = inputs + files
        return LoadedWeights(model, source, files)

    def prepare_weights(self, plan: LoadPlan, placement: Placement) -> None:
        """The snapshot; with ``serve_unmerged``, only the converted base, and the adapter checked
        against it (the load serves it unmerged and builds the snapshot after)."""
        inputs = self._inputs(plan)
        if self.serve_unmerged and _unmerged_servable(plan, placement) \
                and not is_valid(self._folder(plan, placement, inputs)):
            base = self.ensure_base(plan, placement, inputs)
            # Checked on the CPU, on the memory-mapped base: never a second copy beside a served one.
            lora.apply(plan.name, load_base(plan, base, _on_cpu(placement)), plan.adapter)
            return
        self.ensure_snapshot(plan, placement, inputs)

    def prepared(self, source: ModelSource) -> bool:
        """The snapshot exists, or (``serve_unmerged``, plain LoRA) the converted base it is served over."""
        plan = resolve(source, self.settings)
        placement = Placement.for_model(source.name, self.settings)
        inputs = checkpoint_files(plan, self.settings)
        if not inputs:
            return False  # a Hub id not downloaded yet
        if is_valid(self._folder(plan, placement, inputs)):
            return True
        return self.serve_unmerged and _unmerged_servable(plan, placement) and \
            is_valid(self._base_folder(plan, placement, inputs))

    def _inputs(self, plan: LoadPlan, timer: StageTimer | None = None) -> list[Path]:
        """The checkpoint and adapter files, downloaded first when the model is a Hub id not cached."""
        inputs = checkpoint_files(plan, self.settings)
        if not inputs and not Path(plan.model_id).is_dir():
            from huggingface_hub import snapshot_download

            with timer.stage("download") if timer else nullcontext():
                snapshot_download(plan.model_id)
            inputs = checkpoint_files(plan, self.settings)
        return inputs

    def _serve_unmerged(self, plan: LoadPlan, placement: Placement, inputs: list[Path],
                        timer: StageTimer) -> LoadedWeights | None:
        """The converted base, memory-mapped, with a plain LoRA adapter applied at run time; the
        merged snapshot's build (or the wait for another process's) as ``finish``. None when the
        snapshot exists, the base is not converted yet, or :func:`_unmerged_servable` says no."""
        if not _unmerged_servable(plan, placement) or is_valid(self._folder(plan, placement, inputs)):
            return None
        base = self._base_folder(plan, placement, inputs)
        if not is_valid(base):
            return None
        files = _weights(base)
        reader = prefetch.read_in_background(files)  # as for a snapshot: one read, not the warm-up's page faults
        with timer.stage("materialise"):
            model = load_base(plan, base, placement)
        with timer.stage("adapter"):
            model = lora.apply(plan.name, model, plan.adapter)
        with timer.stage("read"):
            reader.join()
        _mark_used(base)
        files += [f for f in inputs if plan.adapter.path in f.parents]
        return LoadedWeights(model, "base+adapter", files, finish=lambda: self.ensure_snapshot(plan, placement, inputs))

    def _serve_before_build(self, plan: LoadPlan, placement: Placement, inputs: list[Path],
                            timer: StageTimer) -> LoadedWeights | None:
        """The reference path's model, and the snapshot build as ``finish``; None when the snapshot
        exists. Every process that starts before the snapshot exists serves this way, none waits for
        another's build: the worker's main process has one builder process build it
        (:mod:`worker.lifecycle.builds`), then the serving processes switch to it."""
        if is_valid(self._folder(plan, placement, inputs)):
            return None
        model = load_adapted(plan, placement, self.settings, timer)
        return LoadedWeights(model, "checkpoint", inputs, finish=lambda: self.ensure_snapshot(plan, placement, inputs))

    def _folder(self, plan: LoadPlan, placement: Placement, inputs: list[Path]) -> Path:
        return self.settings.snapshot_path / f"{plan.name}-{fingerprint(plan, placement, inputs)}"

    def _base_folder(self, plan: LoadPlan, placement: Placement, inputs: list[Path]) -> Path:
        base_files = [f for f in inputs if plan.adapter.path not in f.parents]
        return self.settings.snapshot_path / f"{plan.name}-base-{fingerprint(plan, placement, base_files, base=True)}"

    def ensure_snapshot(self, plan: LoadPlan, placement: Placement, inputs: list[Path]) -> tuple[Path, bool]:
        """The snapshot's folder, built first if missing or damaged (and whether this call built it)."""
        folder = self._folder(plan, placement, inputs)
        if is_valid(folder):
            _mark_used(folder)
            return folder, False
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            if is_valid(folder):  # another process built it while we waited
                _mark_used(folder)
                return folder, False
            self._build(plan, placement, inputs, folder)
        prune(self.settings.snapshot_path, plan.name, self.settings.snapshot_keep)
        return folder, True

    def _build(self, plan: LoadPlan, placement: Placement, inputs: list[Path], folder: Path) -> None:
        """Build ``folder`` (the caller holds its lock): the adapter merged into the converted base,
        the whole model when there is no adapter, or the merged snapshot quantized. Always on the CPU,
        whatever ``DEVICE`` says: a build beside the served copy would need a second model's room on
        the GPU, and a snapshot is only a file (one built on the CPU loads on CUDA, quantized too)."""
        where = _on_cpu(placement)
        if placement.quantization is None and plan.adapter is not None:
            base = self.ensure_base(plan, placement, inputs)
            self._stream_or_build(folder, lambda: streamed_build.prepare(
                plan, placement.dtype, _weights(base), base, merge=True), lambda: _merged(plan, where, base))
        elif placement.quantization is None:
            self._stream_or_build(folder, lambda: streamed_build.prepare(
                plan, placement.dtype, inputs, plan.model_id, merge=False),
                lambda: load_adapted(plan, where, self.settings, StageTimer()))
        else:  # quantize the merged snapshot, so merging never meets quantized layers
            merged, _ = self.ensure_snapshot(plan, replace(placement, quantization=None), inputs)
            kwargs = where.from_pretrained_kwargs(plan=plan)
            self.build(folder, placement.quantization, lambda: plan.model_class.from_pretrained(merged, **kwargs))

    def ensure_base(self, plan: LoadPlan, placement: Placement, inputs: list[Path]) -> Path:
        """The base checkpoint converted to the target dtype, without any adapter: built once, so a
        new adapter's snapshot merges into it instead of reading and converting the checkpoint again."""
        folder = self._base_folder(plan, placement, inputs)
        with _build_lock(folder):
            if not is_valid(folder):
                files = [f for f in inputs if plan.adapter.path not in f.parents]
                where, safetensors = _on_cpu(placement), self.settings.use_safetensors or None
                self._stream_or_build(
                    folder, lambda: streamed_build.prepare(plan, placement.dtype, files, plan.model_id, merge=False),
                    lambda: load_base(plan, plan.model_id, where, use_safetensors=safetensors))
                prune(self.settings.snapshot_path, f"{plan.name}-base", self.settings.snapshot_keep)
        _mark_used(folder)
        return folder

    def _stream_or_build(self, folder: Path, stream, make_model) -> None:
        """Write ``folder`` tensor by tensor (:mod:`worker.loading.streamed_build`); the reference way,
        ``make_model`` then ``save_pretrained``, when it cannot be streamed."""
        try:
            snapshot = stream()
        except streamed_build.Unstreamable as why:
            log.info("building %s the reference way: %s", folder.name, why)
            self.build(folder, None, make_model)
            return
        self._write(folder, None, snapshot.write)

    def build(self, folder: Path, quantization: str | None, make_model) -> None:
        """Write the model ``make_model`` returns as a snapshot, atomically (the reference way)."""
        def save(tmp: Path) -> None:
            model = make_model()
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1000GB")
            del model
            gc.collect()

        self._write(folder, quantization, save)

    def _write(self, folder: Path, quantization: str | None, write) -> None:
        """Run ``write`` into a temporary folder beside ``folder``, add the manifest and rename it into
        place. Old snapshots are pruned first, so a disk filled by old versions makes room; a failed
        write (a full disk) leaves no temporary folder."""
        root = folder.parent
        prune(root, folder.name.rsplit("-", 1)[0], max(self.settings.snapshot_keep - 1, 1))
        log.info("building snapshot %s", folder)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            write(tmp)
            files = {f.name: f.stat().st_size for f in tmp.glob("*.safetensors")}
            (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files, "quantization": quantization},
                                                   indent=1))
            _fsync_folder(tmp)
            shutil.rmtree(folder, ignore_errors=True)  # an invalid one we are replacing
            os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _merged(plan: LoadPlan, placement: Placement, base: Path):
    """The base snapshot with the verified adapter merged into its weights (the reference way)."""
    return merge_and_unload(attach_adapter(plan.name, load_base(plan, base, placement), plan.adapter))


def _on_cpu(placement: Placement) -> Placement:
    """Where a build (or a check) runs: the CPU, in the placement's dtype and quantization."""
    return replace(placement, device=torch.device("cpu"), max_memory_gb=None)


def _unmerged_servable(plan: LoadPlan, placement: Placement) -> bool:
    """Whether the adapter may be served unmerged over the base: plain LoRA, unquantized, and not
    under a ``MAX_MEMORY_GB`` that spills layers to CPU memory (accelerate's offload hooks would
    lose the adapter's layers: they are served merged instead)."""
    if plan.adapter is None or placement.quantization is not None or not lora.supported(plan.adapter):
        return False
    if placement.max_memory_gb is None:
        return True
    from worker.loading.memory_cap import spills

    return not spills(plan, placement)


def _weights(folder: Path) -> list[Path]:
    return [folder / name for name in _manifest(folder)["files"]]


def is_valid(folder: Path) -> bool:
    """Complete (every file at its recorded size) and readable; anything else is rebuilt."""
    try:
        manifest = _manifest(folder)
        if manifest.get("format") != FORMAT or not manifest.get("files"):
            return False
        for name, size in manifest["files"].items():
            file = folder / name
            if file.stat().st_size != size:
                log.warning("snapshot file %s is %d bytes, expected %d: rebuilding", file, file.stat().st_size, size)
                return False
            with safe_open(file, framework="pt") as handle:
                handle.keys()
        return True
    except (OSError, ValueError, SafetensorError):
        return False


def fingerprint(plan: LoadPlan, placement: Placement, weight_files: list[Path], base: bool = False) -> str:
    """A hash of everything that changes the prepared weights (``weight_files``: checkpoint + adapter);
    ``base``: of the converted base alone, which no adapter file or label name changes."""
    from importlib.metadata import version

    if not weight_files:
        raise ModelLoadError(plan.name, f"no local weight files for {plan.model_id!r} to build a snapshot from")
    inputs = list(weight_files)
    config = Path(plan.model_id) / "config.json"
    if config.is_file():
        inputs.append(config)
    if plan.adapter is not None and not base:
        inputs += sorted(plan.adapter.path.glob("adapter_config.json")) + sorted(plan.adapter.path.glob("config.json"))
    h = hashlib.sha256()
    for file in inputs:
        stat = file.stat()
        h.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    libraries = ["torch", "transformers", "peft", "safetensors"] + (["bitsandbytes"] if placement.quantization else [])
    h.update(json.dumps({
        "format": FORMAT, "dtype": str(placement.dtype), "head": plan.head,
        "labels": len(plan.labels) if base else plan.labels, "base": base,
        "quantization": placement.quantization, "versions": [version(p) for p in libraries],
    }).encode())
    return h.hexdigest()[:16]


def prune(root: Path, name: str, keep: int) -> list[Path]:
    """Delete ``name``'s snapshots beyond the ``keep`` most recently used, and dead builds' temporary
    folders; return what was deleted.

    A folder whose lock another process holds (being built, or rebuilt) is left alone. A process
    still serving from a deleted snapshot keeps its mapping: the kernel frees the file when the last
    mapping goes. The empty ``.lock`` files stay, since deleting one could let two builders in.
    """
    pattern = re.compile(rf"({re.escape(name)}-[0-9a-f]{{16}})(\.tmp-\d+)?")
    entries = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    found = {p: m for p in entries if (m := pattern.fullmatch(p.name))}  # m[1]: the snapshot, m[2]: ".tmp-<pid>"
    snapshots = sorted((p for p, m in found.items() if not m[2]), key=_last_used, reverse=True)
    doomed = snapshots[keep:] + [p for p, m in found.items() if m[2]]
    removed = []
    for folder in doomed:
        lock = _build_lock(root / found[folder][1], timeout=0)  # a temp folder's is its snapshot's
        try:
            with lock:
                shutil.rmtree(folder)
        except Timeout:
            continue
        except OSError as exc:
            log.warning("could not delete old snapshot %s: %s", folder, exc)
            continue
        log.info("deleted old snapshot %s", folder)
        removed.append(folder)
    return removed


def _build_lock(folder: Path, timeout: float = -1) -> FileLock:
    """The lock held while ``folder`` is built (or deleted), beside it so it outlives the folder."""
    return FileLock(str(folder) + ".lock", timeout=timeout)


def _mark_used(folder: Path) -> None:
    """Record a use in the folder's mtime, which :func:`prune` ranks by; best effort (read-only dirs)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def _last_used(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())
