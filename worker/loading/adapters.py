"""PEFT adapters: read from a folder, translated to the loaded model's names, attached and verified.

``PeftModel.from_pretrained`` only warns when adapter weights find no module, and does not
translate ``target_modules`` for checkpoints that transformers renames on load. Here every tensor
in the adapter file must land in the model with its exact value, and every adapter parameter in
the model must come from the file; anything else is a :class:`ModelLoadError`.

PEFT (and the bitsandbytes it imports) takes seconds to import, so it is imported only where an
adapter is attached: a start from a prepared snapshot reads the adapter's JSON and tensors to plan
and fingerprint the load, but never imports PEFT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from worker.errors import ModelLoadError
from worker.loading import exaone_layout

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Adapter:
    """An adapter folder read into memory, with names already translated for the target model."""

    path: Path
    config: dict[str, Any]
    """``adapter_config.json`` as read, module names translated; :meth:`peft_config` builds PEFT's."""
    tensors: dict[str, torch.Tensor]

    @property
    def task_type(self) -> str:
        return str(self.config.get("task_type") or "")

    def peft_config(self, model_name: str) -> PeftConfig:
        from peft import PeftConfig

        try:
            fields = {k: v for k, v in self.config.items() if k != "runtime_config"}
            config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**fields))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(model_name, f"unusable {CONFIG_FILE} in {str(self.path)!r}: {exc}") from exc
        config.inference_mode = True
        return config

    def saved_module_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """Tensors the adapter saves for a ``modules_to_save`` entry (e.g. the classifier head)."""
        prefix = f"base_model.model.{module}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def covers(self, base_key: str) -> bool:
        """Whether a base-model weight is replaced by one of the adapter's saved modules."""
        return f"base_model.model.{base_key}" in self.tensors


def read_adapter(model_name: str, path: Path, base_config: dict) -> Adapter:
    """Read ``adapter_config.json`` and the weights, translating names for EXAONE checkpoints."""
    if not path.is_dir():
        raise ModelLoadError(model_name, f"adapter folder {str(path)!r} does not exist")
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(model_name, f"adapter folder {str(path)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(model_name, f"unreadable {CONFIG_FILE} in {str(path)!r}: {exc}") from exc
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise ModelLoadError(model_name, f"unreadable {CONFIG_FILE} in {str(path)!r}: no peft_type")
    tensors = _read_weights(model_name, path)
    if exaone_layout.is_exaone(base_config):
        tensors = {exaone_layout.rename_key(k): v for k, v in tensors.items()}
        for field in ("target_modules", "modules_to_save", "layers_pattern"):
            if config.get(field):
                config[field] = exaone_layout.rename_modules(config[field])
    return Adapter(path=path, config=config, tensors=tensors)


def _read_weights(model_name: str, path: Path) -> dict[str, torch.Tensor]:
    for fname in WEIGHT_FILES:
        file = path / fname
        if not file.is_file():
            continue
        try:
            if fname.endswith(".safetensors"):
                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
            raise ModelLoadError(model_name, f"corrupt adapter weights {str(file)!r}: {exc}") from exc
    raise ModelLoadError(model_name, f"adapter folder {str(path)!r} has none of {', '.join(WEIGHT_FILES)}")


def check_fits(model_name: str, model: torch.nn.Module, adapter: Adapter) -> None:
    """Every module the adapter names must exist in the base model, or it was made for another base."""
    modules = {name for name, _ in model.named_modules()}
    prefix = "base_model.model."
    for key in adapter.tensors:
        body = key[len(prefix):] if key.startswith(prefix) else key
        path = body.split(".lora_")[0] if ".lora_" in body else body.rsplit(".", 1)[0]
        if path not in modules:
            raise ModelLoadError(
                model_name, f"adapter {str(adapter.path)!r} does not fit this model: it names module {path!r}, "
                f"which the base model lacks (an adapter for another base or layout?)"
            )


def attach_adapter(model_name: str, model: torch.nn.Module, adapter: Adapter) -> PeftModel:
    """Wrap ``model`` with the adapter and prove that every adapter weight is in place."""
    from peft import get_peft_model
    from peft.utils import set_peft_model_state_dict

    try:
        config = adapter.peft_config(model_name)
        # The base may be a converted copy of the checkpoint the adapter names (a base snapshot).
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or config.base_model_name_or_path
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(model_name, f"adapter {str(adapter.path)!r} does not fit this model: {exc}") from exc
    try:
        set_peft_model_state_dict(peft_model, adapter.tensors)
    except RuntimeError as exc:  # shape mismatch: an adapter trained for another base
        raise ModelLoadError(model_name, f"adapter {str(adapter.path)!r} does not fit this model: {exc}") from exc
    _verify(model_name, peft_model, adapter)
    return peft_model


def merge_and_unload(peft_model: PeftModel) -> torch.nn.Module:
    """PEFT's ``merge_and_unload``, with plain LoRA layers merged by one fused ``addmm`` each in the
    weight's own dtype. PEFT computes a bf16 layer's delta in float32 on CPU, then casts and adds it
    in place: three passes over the weight, and on a memory-mapped base a copy-on-write fault per
    page (the merge was most of a retrained adapter's snapshot build). ``addmm`` accumulates in
    float32 and rounds once."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    if not all(_plain_lora(m) for m in layers):
        return peft_model.merge_and_unload()
    with torch.no_grad():
        for layer in layers:
            (name,) = layer.active_adapters
            weight = layer.get_base_layer().weight
            # Into fresh memory: a weight memory-mapped from a snapshot, written in place, is copied
            # page by page on write, which made the merge 8x slower here.
            weight.data = torch.addmm(weight, layer.lora_B[name].weight.to(weight.dtype),
                                      layer.lora_A[name].weight.to(weight.dtype), alpha=layer.scaling[name])
    return peft_model.unload()


def _plain_lora(layer: Any) -> bool:
    """One active vanilla LoRA adapter on an ``nn.Linear`` (no DoRA or other variant, no LoRA bias)."""
    names = layer.active_adapters
    return (len(names) == 1 and names[0] not in getattr(layer, "lora_variant", {})
            and not layer.use_dora.get(names[0]) and not layer.lora_bias.get(names[0]) and not layer.fan_in_fan_out
            and isinstance(layer.get_base_layer(), torch.nn.Linear) and not layer.merged)


def _verify(model_name: str, peft_model: PeftModel, adapter: Adapter) -> None:
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    unused = sorted(set(adapter.tensors) - set(loaded))
    if unused:
        raise ModelLoadError(
            model_name,
            f"{len(unused)} adapter weights match no module of the model (first: {unused[0]}); "
            f"the adapter was trained for another base or layout",
        )
    missing = sorted(set(loaded) - set(adapter.tensors))
    if missing:
        raise ModelLoadError(model_name, f"{len(missing)} adapter weights are not in the file (first: {missing[0]})")
    for key, value in adapter.tensors.items():
        got = loaded[key]
        if got.shape != value.shape or not torch.equal(got, value.to(got.device, got.dtype)):
            raise ModelLoadError(model_name, f"adapter weight {key} did not load as saved")
