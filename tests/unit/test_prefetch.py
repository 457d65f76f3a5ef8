"""The start-up prefetch reads the files the loader will map: the newest snapshot, else the checkpoint."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.lifecycle import prefetch
from worker.settings import Settings


def _settings(tmp_path, **env):
    return Settings.from_env({"PRELOAD_MODELS": "exaone", "EXAONE_MODEL": str(tmp_path / "ckpt"),
                              "SNAPSHOT_DIR": str(tmp_path / "snaps"), **env}, dotenv=False)


def _snapshot(root, name, mtime, quantization=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "snapshot.json").write_text(json.dumps({"files": {"model.safetensors": 1000},
                                                      "quantization": quantization}))
    os.utime(folder / "snapshot.json", (mtime, mtime))
    return folder


def test_reads_the_newest_complete_snapshot_else_the_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / "ckpt" / shard).write_bytes(b"w" * 100)
    settings = _settings(tmp_path)
    assert [f.name for f in prefetch.weight_files(settings)] == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    _snapshot(tmp_path / "snaps", "exaone-old", 1_000)
    new = _snapshot(tmp_path / "snaps", "exaone-new", 2_000)
    (tmp_path / "snaps" / "exaone-partial.tmp-1").mkdir()  # a build in progress has no manifest
    assert prefetch.weight_files(settings) == [new / "model.safetensors"]
    assert prefetch.weight_files(_settings(tmp_path, MODEL_LOADER="transformers"))[0].parent == tmp_path / "ckpt"
    thread = prefetch.start(settings)
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


def test_reads_the_snapshot_of_the_configured_quantization(tmp_path):
    (tmp_path / "ckpt").mkdir()
    merged = _snapshot(tmp_path / "snaps", "exaone-merged", 1_000)
    quantized = _snapshot(tmp_path / "snaps", "exaone-4bit", 2_000, quantization="4bit")
    assert prefetch.weight_files(_settings(tmp_path)) == [merged / "model.safetensors"]
    assert prefetch.weight_files(_settings(tmp_path, USE_QUANTIZATION="true")) == [quantized / "model.safetensors"]


def test_nothing_to_read_for_hub_ids(tmp_path):
    settings = _settings(tmp_path, EXAONE_MODEL="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct")
    assert prefetch.weight_files(settings) == [] and prefetch.start(settings) is None


def _resident_fraction(file) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh mapping)."""
    libc = prefetch._load_libc()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = file.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(file, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        try:
            assert libc.mincore(addr, size, vec) == 0
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(sys.platform != "linux", reason="page-cache residency is read with Linux's mincore")
def test_read_into_cache_leaves_whole_files_in_the_page_cache(tmp_path):
    weights, empty = tmp_path / "model.safetensors", tmp_path / "empty.safetensors"
    weights.write_bytes(os.urandom((8 << 20) + 123))
    empty.write_bytes(b"")
    fd = os.open(weights, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_fraction(weights) > 0.5:
        pytest.skip("this filesystem keeps the file cached (tmpfs?)")
    prefetch.read_into_cache([weights, empty])
    assert _resident_fraction(weights) == 1.0
    with ThreadPoolExecutor(2) as pool:
        assert prefetch._populate(weights, pool)  # the mapped path, not the read() fallback, does it
