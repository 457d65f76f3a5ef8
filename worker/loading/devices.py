"""Where and how a model's weights live: device, dtype, quantization, memory cap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.settings import Settings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    """``4bit`` or ``8bit`` (bitsandbytes), or None."""
    max_memory_gb: float | None

    @classmethod
    def for_model(cls, name: str, settings: Settings) -> Placement:
        device = resolve_device(settings.device)
        if settings.torch_dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[settings.torch_dtype]
        # bitsandbytes quantizes on CUDA and, since 0.48, on CPU (slower to compute, a quarter the memory).
        quantization = settings.quantization_for(name)
        return cls(device=device, dtype=dtype, quantization=quantization, max_memory_gb=settings.max_memory_gb)

    def from_pretrained_kwargs(self, quantize: bool = True) -> dict[str, Any]:
        """Device, dtype and quantization arguments for ``from_pretrained``; ``quantize=False`` for
        weights that are quantized already (their config says how)."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if self.max_memory_gb is not None:
                kwargs["device_map"] = "auto"
                kwargs["max_memory"] = {index: f"{self.max_memory_gb}GiB"}
            else:
                kwargs["device_map"] = {"": index}
        if self.quantization is not None and quantize:
            from transformers import BitsAndBytesConfig

            if self.quantization == "4bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype,
                    bnb_4bit_use_double_quant=True,
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return kwargs


def resolve_device(value: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible; asking for CUDA without one is an error.

    With several GPUs and no index given, a prefork child takes GPU ``pool index % count``, so the
    children of one worker spread over the host's GPUs (a respawned child keeps its index).
    """
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(value)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={value} but no CUDA device is visible to torch")
    if device.type == "cuda" and device.index is None:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
        count = torch.cuda.device_count()
        device = torch.device("cuda", (index or 0) % count if count > 1 else 0)
    return device
