"""The lifecycle's parts on their own: pinned versions, builder processes, check-and-swap, freeing."""

from __future__ import annotations

import gc
import shutil
import time
import weakref
from dataclasses import replace

import pytest

from tests import factories
from worker.lifecycle import builds
from worker.lifecycle.pinning import pin
from worker.lifecycle.registry import ModelRegistry, load_classifier
from worker.settings import Settings

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다"]


def settings_for(models, tmp_path, **env) -> Settings:
    return Settings.from_env(models.env(PRELOAD_MODELS="exaone", SNAPSHOT_DIR=str(tmp_path / "snapshots"), **env),
                             dotenv=False)


def test_settings_read_back_from_their_variables(models, tmp_path):
    """How a builder process gets the worker's settings: every field survives the round trip."""
    settings = replace(settings_for(models, tmp_path, MAX_MEMORY_GB="7.5", CASCADE_BAND="0.1,0.9"),
                       preload_models=("koelectra", "exaone"))
    assert Settings.from_env(settings.to_env(), dotenv=False) == settings
    empty = replace(settings, cascade_band=None, max_memory_gb=None, exaone_prompt_file="")
    assert Settings.from_env(empty.to_env(), dotenv=False) == empty


def test_a_load_reads_the_files_its_links_named_when_it_was_pinned(models, tmp_path):
    """A symlink flipped during a load cannot mix two versions: the load reads the real folder that
    the link named when the settings were pinned, and its version is that folder's."""
    versions = factories.adapter_versions(models.exaone_adapter, tmp_path)
    v1, v2, link = versions["v1"], versions["v2"], versions["current"]
    settings = settings_for(models, tmp_path, EXAONE_ADAPTER_DIR=str(link), MODEL_LOADER="transformers")
    pinned = pin(settings)
    assert pinned.exaone_adapter_dir == str(v1.resolve()) and pinned.exaone_model == str(models.exaone.resolve())
    link.unlink()
    link.symlink_to(v2)  # flipped after the pin, before the load
    after_flip = load_classifier("exaone", pinned)
    direct = load_classifier("exaone", replace(settings, exaone_adapter_dir=str(v1)))
    assert after_flip.version == direct.version
    assert [s.spam_score for s in after_flip.score(TEXTS)] == [s.spam_score for s in direct.score(TEXTS)]
    assert load_classifier("exaone", settings).version != direct.version  # unpinned: the link now names v2


def test_a_builder_builds_on_the_cpu_whatever_device_serves(models, tmp_path):
    """A GPU worker's build runs in a builder process on the CPU (never beside the served copy): with
    DEVICE=cuda on this host without one, the build still succeeds, and loads as a start would."""
    settings = settings_for(models, tmp_path, DEVICE="cuda", TORCH_DTYPE="bfloat16")
    version = builds.run("exaone", settings, timeout=240)
    on_cpu = replace(settings, device="cpu")
    loaded = load_classifier("exaone", on_cpu)
    assert loaded.loaded.source == "snapshot" and loaded.version == version


def test_one_build_per_model_and_a_newer_version_cancels_the_older(models, tmp_path):
    settings = settings_for(models, tmp_path)
    running = builds.Builds()
    running.want("exaone", settings)
    first = running._jobs["exaone"].process
    running.want("exaone", settings)  # asked again while it runs: the same builder
    assert running._jobs["exaone"].process is first
    other = tmp_path / "v2"
    shutil.copytree(models.exaone_adapter, other)
    factories.perturb_adapter_module(other, "h.1.mlp.c_proj", scale=0.5)
    running.want("exaone", replace(settings, exaone_adapter_dir=str(other)))
    assert first.wait(30) is not None, "the older build was stopped"
    deadline = time.monotonic() + 240
    finished = []
    while not finished:
        assert time.monotonic() < deadline
        finished = running.poll()
        time.sleep(0.2)
    (done,) = finished
    assert done.ok and done.key == builds.build_key("exaone", replace(settings, exaone_adapter_dir=str(other)))
    running.want("exaone", replace(settings, exaone_adapter_dir=str(other)))
    assert not running.running("exaone"), "a version built once is not built again"


class _Model:
    def __init__(self, version: str) -> None:
        self.version = version
        self.loaded = type("Loaded", (), {"finish": None, "version": version})()
        self.batch_size = 4
        self.name = "exaone"
        self.device = type("Device", (), {"type": "cpu"})()

    def score(self, texts):
        return [self.version] * len(texts)


def test_a_swap_only_replaces_what_it_expected_and_frees_the_replaced_model(monkeypatch):
    monkeypatch.setattr("worker.lifecycle.registry.process_stats.record_load", lambda name, loaded: None)
    registry = ModelRegistry()
    first, newer, stale = _Model("a"), _Model("b"), _Model("c")
    registry.swap("exaone", first)
    registry.enable_batching(0.001)
    assert registry.swap("exaone", newer, replacing=first)
    assert not registry.swap("exaone", stale, replacing=first), "a newer swap wins over an older snapshot"
    assert registry.score("exaone", ["x"]) == ["b"]
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None, "nothing (the batcher included) keeps a replaced model"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_build_key_names_what_is_built(models, tmp_path, dtype):
    settings = replace(settings_for(models, tmp_path), torch_dtype=dtype)
    assert builds.build_key("exaone", settings) == builds.build_key("exaone", replace(settings, batch_size=3))
    assert builds.build_key("exaone", settings) != builds.build_key("exaone", replace(settings, exaone_adapter_dir=""))
