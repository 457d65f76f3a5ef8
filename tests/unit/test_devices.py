"""Device decisions of the CUDA path, checked on CPU: the arguments the loaders pass, the device map
accelerate computes on the meta device, and the calls made to ``torch.cuda`` (patched to record)."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from worker.errors import ModelLoadError
from worker.loading import devices
from worker.loading import plan as planning
from worker.loading.devices import Placement, resolve_device
from worker.loading.memory_cap import capped_device_map, plan_device_map
from worker.settings import ModelSource, Settings


@pytest.fixture
def fake_gpus(monkeypatch):
    """Make torch report ``count`` GPUs and record ``set_device``; returns the recorded calls."""
    calls: list[torch.device] = []

    def install(count: int, pool_index: int | None = None) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", calls.append)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr("billiard.process.current_process", lambda: SimpleNamespace(index=pool_index))
        return calls

    return install


# --- 1: a CPU placement with bitsandbytes names the CPU -------------------------------------------


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_cpu_placement_passes_an_explicit_cpu_map_the_quantizer_keeps(fake_gpus, bits):
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    fake_gpus(1)  # a host with a visible GPU, where DEVICE=cpu was asked for
    placement = Placement(torch.device("cpu"), torch.float32, bits, None)
    for quantize in (True, False):  # quantizing now, and loading a quantized snapshot
        assert placement.from_pretrained_kwargs(quantize=quantize)["device_map"] == {"": "cpu"}
    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(**{f"load_in_{bits}": True}))
    assert quantizer.update_device_map({"": "cpu"}) == {"": "cpu"}
    assert quantizer.update_device_map(None) == {"": 0}, "without the map the weights would go to the GPU"


def test_every_cpu_placement_names_the_cpu():
    kwargs = Placement(torch.device("cpu"), torch.float32, None, None).from_pretrained_kwargs()
    assert kwargs == {"dtype": torch.float32, "device_map": {"": "cpu"}}


def test_a_snapshot_loaded_with_the_cpu_map_stays_memory_mapped(models, tmp_path):
    """The prefork children share one copy of the weights only while they are the file's pages."""
    from worker.loading import get_loader

    settings = replace(Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32"}, dotenv=False),
                       snapshot_dir=str(tmp_path))
    source = ModelSource("koelectra", str(models.koelectra), models.koelectra_adapter)
    get_loader(settings).load_model(source)  # builds the snapshot
    loaded = get_loader(settings).load_model(source)
    assert loaded.source == "snapshot"
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")
              if str(tmp_path) in line and ".safetensors" in line]
    params = list(loaded.model.parameters())
    assert mapped and all(any(lo <= p.data_ptr() < hi for lo, hi in mapped) for p in params)


# --- 2: MAX_MEMORY_GB never offloads to disk, applies to EXAONE only -------------------------------


def test_memory_cap_applies_to_exaone_only(fake_gpus):
    settings = Settings.from_env({"DEVICE": "cuda", "MAX_MEMORY_GB": "2"}, dotenv=False)
    fake_gpus(1)
    assert Placement.for_model("exaone", settings).max_memory_gb == 2.0
    assert Placement.for_model("koelectra", settings).max_memory_gb is None


@pytest.fixture
def exaone_plan(models):
    settings = Settings.from_env({}, dotenv=False)
    return planning.resolve(ModelSource("exaone", str(models.exaone), models.exaone_adapter), settings)


def test_accelerate_alone_would_offload_to_disk(exaone_plan):
    """Why the map is computed here: ``max_memory`` without a "cpu" entry sends the rest to disk."""
    from accelerate import init_empty_weights
    from transformers.integrations.accelerate import infer_auto_device_map

    total = plan_device_map(exaone_plan, torch.bfloat16, None, 0, 100).total
    with init_empty_weights():
        model = exaone_plan.model_class.from_config(exaone_plan.config, dtype=torch.bfloat16)
    device_map = infer_auto_device_map(model, max_memory={0: int(total * 0.8)},
                                       no_split_module_classes=model._no_split_modules)
    assert "disk" in device_map.values()


def test_a_cap_that_holds_the_model_places_all_of_it_on_the_gpu(exaone_plan):
    placed = plan_device_map(exaone_plan, torch.bfloat16, None, 0, 100)
    assert placed.device_map == {"": 0} and set(placed.bytes_on) == {"cuda:0"}


def test_a_cap_below_the_model_spills_to_cpu_memory_with_a_warning(exaone_plan, caplog):
    total_gb = plan_device_map(exaone_plan, torch.bfloat16, None, 0, 100).total / 2**30
    placement = Placement(torch.device("cuda", 0), torch.bfloat16, None, total_gb * 0.8)
    with caplog.at_level(logging.WARNING, logger="worker.loading.memory_cap"):
        device_map = capped_device_map(exaone_plan, placement, 0)
    assert set(device_map.values()) == {0, "cpu"}, device_map
    assert "disk" not in device_map.values()
    line = caplog.records[-1].getMessage()
    assert "spills" in line and "to CPU memory" in line and "GB would hold all of it" in line


def test_a_quantized_model_that_would_spill_is_refused_with_the_cap_it_needs(exaone_plan):
    placed = plan_device_map(exaone_plan, torch.bfloat16, "4bit", 0, 100)
    needed = (placed.total + placed.largest_layer) / 2**30
    placement = Placement(torch.device("cuda", 0), torch.bfloat16, "4bit", placed.total / 2**30 * 0.8)
    with pytest.raises(ModelLoadError, match=rf"bitsandbytes cannot run layers from CPU memory: set MAX_MEMORY_GB "
                                             rf"to at least {needed:.2f}"):
        capped_device_map(exaone_plan, placement, 0)


def test_quantized_sizes_are_smaller_than_the_dtypes(exaone_plan):
    bf16 = plan_device_map(exaone_plan, torch.bfloat16, None, 0, 100).total
    assert plan_device_map(exaone_plan, torch.bfloat16, "8bit", 0, 100).total < bf16
    assert plan_device_map(exaone_plan, torch.bfloat16, "4bit", 0, 100).total < \
        plan_device_map(exaone_plan, torch.bfloat16, "8bit", 0, 100).total


def test_sizes_follow_the_dtype_for_both_heads(models):
    settings = Settings.from_env({}, dotenv=False)
    for adapter in (models.exaone_adapter, models.exaone_cls_adapter):  # causal LM, Llama sequence head
        plan = planning.resolve(ModelSource("exaone", str(models.exaone), adapter), settings)
        fp32 = plan_device_map(plan, torch.float32, None, 0, 100).total
        # (the rotary buffer stays float32 in both)
        assert plan_device_map(plan, torch.bfloat16, None, 0, 100).total * 2 == pytest.approx(fp32, rel=0.01)


def test_capped_cuda_placement_hands_the_computed_map_to_from_pretrained(exaone_plan, fake_gpus):
    fake_gpus(1)
    placement = Placement(torch.device("cuda", 0), torch.bfloat16, None, 100.0)
    kwargs = placement.from_pretrained_kwargs(plan=exaone_plan)
    assert kwargs["device_map"] == {"": 0} and "max_memory" not in kwargs


# --- 5, 8, 9: choosing and setting the device ------------------------------------------------------


def test_a_child_takes_its_gpu_by_pool_index_and_makes_it_current(fake_gpus):
    calls = fake_gpus(2, pool_index=3)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]


def test_an_explicit_index_is_made_current(fake_gpus):
    calls = fake_gpus(2)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and calls == [torch.device("cuda", 0)]


def test_an_index_out_of_range_is_a_clear_error(fake_gpus):
    calls = fake_gpus(2)
    with pytest.raises(RuntimeError, match=r"DEVICE=cuda:2 but torch sees 2 CUDA device\(s\): use cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert calls == []


def test_auto_says_loudly_when_torch_cannot_use_the_hosts_gpu(fake_gpus, monkeypatch, caplog):
    fake_gpus(0)
    monkeypatch.setattr(devices, "nvidia_devices", lambda: ["nvidia0"])
    with caplog.at_level(logging.WARNING, logger="worker.loading.devices"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "NVIDIA GPU (nvidia0)" in caplog.text and "cannot use it" in caplog.text


def test_auto_on_a_host_without_nvidia_is_quiet(fake_gpus, monkeypatch, caplog):
    fake_gpus(0)
    monkeypatch.setattr(devices, "nvidia_devices", lambda: [])
    with caplog.at_level(logging.WARNING, logger="worker.loading.devices"):
        assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.records


def test_nvidia_devices_reads_the_driver_nodes(tmp_path):
    (tmp_path / "dev").mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / "dev" / name).touch()
    assert devices.nvidia_devices(tmp_path) == ["nvidia0", "nvidia1"]

