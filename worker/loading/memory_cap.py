"""``MAX_MEMORY_GB``: place EXAONE's layers under a per-GPU cap before loading, never on disk.

Handing accelerate ``max_memory={gpu: cap}`` alone makes its device list ``[gpu, "disk"]``: what
does not fit is offloaded to disk and re-read from safetensors on every forward pass (and with
bitsandbytes, loading raises). Here the map is computed up front on the meta device, with CPU
memory as the only overflow: a model that fits is placed on the GPU, one that does not spills the
rest to CPU memory with a warning that says how much went where, and a quantized one (bitsandbytes
cannot run layers from CPU memory on a GPU model) is refused with the cap it would need. The
usable GPU budget is the cap minus the largest layer, which accelerate keeps free to bring
spilled layers in.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worker.errors import ModelLoadError

if TYPE_CHECKING:
    from worker.loading.devices import Placement
    from worker.loading.plan import LoadPlan

log = logging.getLogger(__name__)

_GB = 2**30
_UNQUANTIZED = ("lm_head", "score", "classifier")
"""Heads bitsandbytes leaves in the model's dtype (transformers' ``get_keys_to_not_convert``)."""


@dataclass(frozen=True)
class DeviceMapPlan:
    device_map: dict[str, int | str]
    bytes_on: dict[str, int]
    """Weight bytes per device (``cuda:N``, ``cpu``)."""
    largest_layer: int

    @property
    def total(self) -> int:
        return sum(self.bytes_on.values())


class _QuantizedSizes:
    """Enough of a transformers quantizer for sizing: a quantized linear weight's bytes per element."""

    def __init__(self, element_size: float) -> None:
        self.element_size = element_size

    def param_element_size(self, model: torch.nn.Module, name: str, param: torch.Tensor) -> float:
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if kind == "weight" and isinstance(module, torch.nn.Linear) and module_name.split(".")[-1] not in _UNQUANTIZED:
            return self.element_size
        return param.element_size()


def meta_model(plan: LoadPlan, dtype: torch.dtype) -> torch.nn.Module:
    """``plan``'s model on the meta device: every parameter's name, shape and dtype, no weights."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(plan.config)  # building a model may set attributes on its config
    with init_empty_weights():  # an Auto class has from_config; a concrete one (Llama's head) _from_config
        build = getattr(plan.model_class, "from_config", None) or plan.model_class._from_config
        return build(config, dtype=dtype)


def plan_device_map(plan: LoadPlan, dtype: torch.dtype, quantization: str | None, gpu: int,
                    cap_gb: float) -> DeviceMapPlan:
    """Where each layer of ``plan``'s model goes with ``cap_gb`` GiB on GPU ``gpu`` and the rest in
    CPU memory; computed on the meta device (no weights read, no GPU touched)."""
    from transformers.integrations.accelerate import compute_module_sizes, infer_auto_device_map

    model = meta_model(plan, dtype)
    sizes_by = _QuantizedSizes({"4bit": 0.5, "8bit": 1.0}[quantization]) if quantization else None
    no_split = model._no_split_modules
    cpu_room = sum(p.numel() * 4 for p in model.parameters()) + _GB  # enough for all of it: never "disk"
    device_map = infer_auto_device_map(model, max_memory={gpu: int(cap_gb * _GB), "cpu": cpu_room},
                                       no_split_module_classes=no_split, hf_quantizer=sizes_by)
    module_sizes, _ = compute_module_sizes(model, sizes_by, only_modules=False)
    bytes_on: Counter[str] = Counter()
    for name, where in device_map.items():
        bytes_on[_device_name(where)] += module_sizes[name]
    layers = [module_sizes[n] for n, m in model.named_modules() if type(m).__name__ in (no_split or ())]
    return DeviceMapPlan(dict(device_map), dict(bytes_on), max(layers, default=0))


def capped_device_map(plan: LoadPlan, placement: Placement, gpu: int) -> dict[str, int | str]:
    """The device map to load with under ``MAX_MEMORY_GB``: warns when layers spill to CPU memory,
    raises :class:`ModelLoadError` when they cannot (disk, or a quantized model)."""
    cap = placement.max_memory_gb
    assert cap is not None
    placed = plan_device_map(plan, placement.dtype, placement.quantization, gpu, cap)
    gpu_name = f"cuda:{gpu}"
    spilled = {d: b for d, b in placed.bytes_on.items() if d != gpu_name and b}
    if not spilled:
        log.info("MAX_MEMORY_GB=%s: all %.2f GB of %s's weights fit on %s", cap, placed.total / _GB, plan.name,
                 gpu_name)
        return placed.device_map
    needed = (placed.total + placed.largest_layer) / _GB
    if "disk" in spilled or placement.quantization is not None:
        why = "bitsandbytes cannot run layers from CPU memory" if placement.quantization else "it would go to disk"
        raise ModelLoadError(plan.name, f"MAX_MEMORY_GB={cap} holds {placed.bytes_on.get(gpu_name, 0) / _GB:.2f} GB "
                             f"of the {placed.total / _GB:.2f} GB of weights and {why}: set MAX_MEMORY_GB to at "
                             f"least {needed:.2f} (the weights plus the largest layer), or unset it")
    layers = sum(1 for d in placed.device_map.values() if _device_name(d) == "cpu")
    log.warning("MAX_MEMORY_GB=%s: %s keeps %.2f GB of its %.2f GB of weights on %s and spills %.2f GB (%d modules) "
                "to CPU memory, copied to the GPU on every forward pass (slow); %.2f GB would hold all of it",
                cap, plan.name, placed.bytes_on.get(gpu_name, 0) / _GB, placed.total / _GB, gpu_name,
                spilled["cpu"] / _GB, layers, needed)
    return placed.device_map


def spills(plan: LoadPlan, placement: Placement) -> bool:
    """Whether ``MAX_MEMORY_GB`` leaves part of the model in CPU memory (computed on the meta device,
    like :func:`capped_device_map`, without its warning)."""
    if placement.max_memory_gb is None or placement.device.type != "cuda":
        return False
    gpu = placement.device.index or 0
    placed = plan_device_map(plan, placement.dtype, placement.quantization, gpu, placement.max_memory_gb)
    return any(where != f"cuda:{gpu}" and size for where, size in placed.bytes_on.items())


def summarize(device_map: dict[str, int | str] | None) -> str:
    """``cuda:0 30, cpu 6``: modules per device of a loaded model's ``hf_device_map``, for the stats."""
    if not device_map:
        return ""
    counts = Counter(_device_name(d) for d in device_map.values())
    return ", ".join(f"{d} {n}" for d, n in counts.items())


def _device_name(where: int | str | torch.device) -> str:
    if isinstance(where, int):
        return f"cuda:{where}"
    return str(where)
