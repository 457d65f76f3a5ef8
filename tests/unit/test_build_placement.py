"""Where builds and adapters go on a GPU worker, checked on CPU: a snapshot build never runs on the
GPU (it would need a second model's room beside the served copy), and under a ``MAX_MEMORY_GB`` that
spills layers to CPU memory the adapter is served merged, never as run-time LoRA layers."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from worker.loading import plan as planning
from worker.loading.base import StageTimer, checkpoint_files
from worker.loading.devices import Placement
from worker.loading.memory_cap import plan_device_map, spills
from worker.loading.snapshot_loader import SnapshotLoader, is_valid
from worker.settings import ModelSource, Settings

GPU = torch.device("cuda", 0)


def settings_for(tmp_path: Path) -> Settings:
    base = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "bfloat16"}, dotenv=False)
    return replace(base, snapshot_dir=str(tmp_path / "snapshots"))


@pytest.fixture
def device_maps(monkeypatch) -> list:
    """The ``device_map`` of every ``from_pretrained`` call, recorded on the way through."""
    seen: list = []
    real = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
    return seen


def test_a_build_for_a_gpu_runs_on_the_cpu(models, tmp_path, device_maps):
    """A CUDA placement on this CPU-only machine: the build never touches CUDA. The streamed build
    loads no model at all; the reference one (a non-plain LoRA adapter) and the quantizing load name
    the CPU."""
    settings = settings_for(tmp_path)
    plan = planning.resolve(ModelSource("exaone", str(models.exaone), models.exaone_adapter), settings)
    inputs = checkpoint_files(plan, settings)
    folder, built = SnapshotLoader(settings).ensure_snapshot(plan, Placement(GPU, torch.bfloat16, None, None), inputs)
    assert built and is_valid(folder) and device_maps == []

    adapter = tmp_path / "alpha-pattern"  # not plain LoRA: built the reference way
    shutil.copytree(models.koelectra_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"query": 16}}))
    ko = planning.resolve(ModelSource("koelectra", str(models.koelectra), adapter), settings)
    folder, built = SnapshotLoader(settings).ensure_snapshot(ko, Placement(GPU, torch.bfloat16, None, None),
                                                             checkpoint_files(ko, settings))
    assert built and is_valid(folder) and device_maps and all(m == {"": "cpu"} for m in device_maps)

    device_maps.clear()
    quantized = Placement(GPU, torch.bfloat16, "4bit", None)
    folder, built = SnapshotLoader(settings).ensure_snapshot(plan, quantized, inputs)
    assert built and json.loads((folder / "snapshot.json").read_text())["quantization"] == "4bit"
    assert device_maps == [{"": "cpu"}]


def test_under_a_spilling_memory_cap_the_adapter_is_served_merged(models, tmp_path):
    settings = settings_for(tmp_path)
    plan = planning.resolve(ModelSource("exaone", str(models.exaone), models.exaone_adapter), settings)
    total_gb = plan_device_map(plan, torch.bfloat16, None, 0, 100).total / 2**30
    spilling = Placement(GPU, torch.bfloat16, None, total_gb * 0.8)
    assert spills(plan, spilling) and not spills(plan, replace(spilling, max_memory_gb=100.0))
    on_cpu = Placement.for_model("exaone", settings)
    loader = SnapshotLoader(settings, serve_unmerged=True)
    inputs = checkpoint_files(plan, settings)
    loader.ensure_base(plan, on_cpu, inputs)  # the converted base is there, so the adapter could go unmerged

    assert loader._serve_unmerged(plan, on_cpu, inputs, StageTimer()).source == "base+adapter"
    assert loader._serve_unmerged(plan, spilling, inputs, StageTimer()) is None
    loader.prepare_weights(plan, spilling)  # a reload prepares the merged snapshot, not just the base
    assert is_valid(loader._folder(plan, spilling, inputs))
