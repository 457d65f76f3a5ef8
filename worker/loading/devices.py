"""Where and how a model's weights live: device, dtype, quantization, memory cap."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.serving.score import precision_of
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.loading.plan import LoadPlan

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    """``4bit`` or ``8bit`` (bitsandbytes), or None."""
    max_memory_gb: float | None

    @property
    def dtype_name(self) -> str:
        """``float32``, ``bfloat16``...: the dtype as settings, results and figures name it."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        """What the weights compute in: ``nf4``/``int8`` when quantized, else :attr:`dtype_name`."""
        return precision_of(self.dtype_name, self.quantization)

    @classmethod
    def for_model(cls, name: str, settings: Settings) -> Placement:
        device = resolve_device(settings.device)
        if settings.torch_dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[settings.torch_dtype]
        # bitsandbytes quantizes on CUDA and, since 0.48, on CPU (slower to compute, a quarter the memory).
        quantization = settings.quantization_for(name)
        # The cap is EXAONE's, as documented: KoELECTRA (57 MB) always fits.
        cap = settings.max_memory_gb if name == "exaone" and device.type == "cuda" else None
        return cls(device=device, dtype=dtype, quantization=quantization, max_memory_gb=cap)

    def from_pretrained_kwargs(self, quantize: bool = True, plan: LoadPlan | None = None) -> dict[str, Any]:
        """Device, dtype and quantization arguments for ``from_pretrained``; ``quantize=False`` for
        weights that are quantized already (their config says how). ``plan`` is needed under a
        memory cap, to place the model's layers before loading it (:mod:`worker.loading.memory_cap`)."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if self.max_memory_gb is not None and plan is not None:
                from worker.loading.memory_cap import capped_device_map

                kwargs["device_map"] = capped_device_map(plan, self, index)
            else:
                kwargs["device_map"] = {"": index}
        else:
            # Named, never left out: bitsandbytes' quantizers turn a missing device_map into the current
            # CUDA device, so on a host with a GPU a "CPU" quantized load (or quantized snapshot) would
            # land on the GPU. A snapshot loaded this way stays memory-mapped (shared across children).
            kwargs["device_map"] = {"": "cpu"}
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
    children of one worker spread over the host's GPUs (a respawned child keeps its index). The
    chosen GPU becomes the current device, or argument-less CUDA calls would open a second context
    on GPU 0 in every child.
    """
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
        if value == "cpu" and (found := nvidia_devices()):
            log.warning("DEVICE=auto is serving on CPU although this host has an NVIDIA GPU (%s): torch %s "
                        "cannot use it (%s). Install a CUDA build of torch (scripts/bootstrap does on a GPU host), "
                        "or set DEVICE=cuda to stop instead, or DEVICE=cpu to silence this.", ", ".join(found),
                        torch.__version__, "a CPU build" if torch.version.cuda is None else
                        f"built for CUDA {torch.version.cuda}: check the driver")
    device = torch.device(value)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={value} but no CUDA device is visible to torch")
    count = torch.cuda.device_count()
    if device.index is None:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
        device = torch.device("cuda", (index or 0) % count if count > 1 else 0)
    elif device.index >= count:
        raise RuntimeError(f"DEVICE={value} but torch sees {count} CUDA device(s): use cuda:0"
                           + (f" to cuda:{count - 1}" if count > 1 else ""))
    torch.cuda.set_device(device)
    return device


def nvidia_devices(root: Path = Path("/")) -> list[str]:
    """The NVIDIA GPUs the host's driver exposes (``/dev/nvidiaN``), whether or not torch can use them."""
    return sorted(p.name for p in (root / "dev").glob("nvidia[0-9]*"))
