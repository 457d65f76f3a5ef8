"""The start-up prefetch reads the files the loader will map: the newest snapshot, else the checkpoint."""

from __future__ import annotations

import json
import os

from worker import prefetch
from worker.settings import Settings


def _settings(tmp_path, **env):
    return Settings.from_env({"PRELOAD_MODELS": "exaone", "EXAONE_MODEL": str(tmp_path / "ckpt"),
                              "SNAPSHOT_DIR": str(tmp_path / "snaps"), **env}, dotenv=False)


def _snapshot(root, name, mtime):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "snapshot.json").write_text(json.dumps({"files": {"model.safetensors": 1000}}))
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


def test_nothing_to_read_for_hub_ids(tmp_path):
    settings = _settings(tmp_path, EXAONE_MODEL="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct")
    assert prefetch.weight_files(settings) == [] and prefetch.start(settings) is None
