"""Serve a LoRA adapter unmerged over a shared base, without PEFT: ``y = W x + s B (A x)``.

A reload should serve a retrained adapter in seconds. Merging it means writing a new copy of every
adapted weight, gigabytes of fresh memory (about 10 s per 4.8 GB on the 2-core VM this was measured
on), and then its snapshot file. Wrapping the adapted layers of the converted base instead, which
is memory-mapped from its snapshot and shared by every process, costs only the adapter's own
megabytes, and needs no PEFT import in a process that never had one. The merged snapshot is built
in the background and served once written (``worker.lifecycle.reload``).

Only plain LoRA is served this way (one adapter on ``nn.Linear`` layers: no DoRA, no LoRA bias, no
rank or alpha patterns, no fan-in-fan-out, no layer selection); any other adapter is merged first.
Every tensor must land: an adapted layer that the base lacks, a shape that does not fit, a
targeted layer with no weights in the file are each a :class:`ModelLoadError`.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from worker.errors import ModelLoadError
from worker.loading.adapters import Adapter

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")


class LoraLinear(nn.Module):
    """A linear layer plus its low-rank update, applied at run time."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer("lora_b", b, persistent=False)
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b) * self.scale


def supported(adapter: Adapter) -> bool:
    """Whether :func:`apply` serves this adapter exactly as PEFT would."""
    c = adapter.config
    return (c.get("peft_type") == "LORA" and not c.get("use_dora") and not c.get("lora_bias")
            and not c.get("fan_in_fan_out") and c.get("bias", "none") == "none" and not c.get("rank_pattern")
            and not c.get("alpha_pattern") and not c.get("layers_to_transform") and not c.get("layer_replication")
            and not c.get("exclude_modules") and not c.get("target_parameters")
            and isinstance(c.get("r"), int) and c["r"] > 0 and isinstance(c.get("lora_alpha"), int | float))


def apply(model_name: str, model: nn.Module, adapter: Adapter) -> nn.Module:
    """Wrap the adapted layers of ``model`` and load the adapter's saved modules into it, in place."""
    pairs, saved = check(model_name, model, adapter)
    factor = scale(adapter)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for path, (a, b) in sorted(pairs.items()):
        base = modules[path]
        weight = base.weight
        parent, _, leaf = path.rpartition(".")
        setattr(modules[parent] if parent else model, leaf,
                LoraLinear(base, a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype), factor))
    for name, tensor in saved.items():
        param = params[name]
        param.data = tensor.to(param.device, param.dtype)
    return model


def scale(adapter: Adapter) -> float:
    """PEFT's ``scaling``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), the same float it computes."""
    config = adapter.config
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def check(model_name: str, model: nn.Module, adapter: Adapter
          ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """The adapter's LoRA pairs ``{layer path: (A, B)}`` and saved tensors ``{parameter name: tensor}``,
    checked to fit ``model`` (whose weights may be on the meta device): every pair on a linear layer
    of the right shape, every saved tensor on a parameter of its shape, every targeted layer given
    weights. Anything else is a :class:`ModelLoadError`."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.tensors.items():
        body = key.removeprefix(_PREFIX)
        match = _LORA_KEY.match(body)
        if match:
            pairs.setdefault(match["path"], {})[match["part"]] = tensor
        else:
            saved[body] = tensor
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for path, ab in sorted(pairs.items()):
        base = modules.get(path)
        if not isinstance(base, nn.Linear) or set(ab) != {"A", "B"}:
            raise ModelLoadError(model_name, f"adapter {str(adapter.path)!r} does not fit this model: "
                                 f"{path!r} is not a linear layer of it with both LoRA weights")
        out_features, in_features = base.weight.shape
        a, b = ab["A"], ab["B"]
        if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            raise ModelLoadError(model_name, f"adapter {str(adapter.path)!r} does not fit this model: {path!r} "
                                 f"is {out_features}x{in_features}, the adapter's update {b.shape[0]}x{a.shape[1]}")
    for name, tensor in saved.items():
        param = params.get(name)
        if param is None or param.shape != tensor.shape:
            raise ModelLoadError(model_name, f"adapter {str(adapter.path)!r} does not fit this model: its saved "
                                 f"tensor {name!r} matches no weight of it")
    missing = [path for path, module in modules.items() if isinstance(module, nn.Linear) and path not in pairs
               and _targeted(path, adapter.config.get("target_modules"))]
    if missing:
        raise ModelLoadError(model_name, f"{len(missing)} layers the adapter targets have no LoRA weights in "
                             f"{str(adapter.path)!r} (first: {missing[0]})")
    return {path: (ab["A"], ab["B"]) for path, ab in pairs.items()}, saved


def _targeted(path: str, targets: object) -> bool:
    """PEFT's rule for ``target_modules``: a regex matched against the whole path, or a list of names
    matched against its last components."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if isinstance(targets, list):
        return any(path == t or path.endswith(f".{t}") for t in targets)
    return False
