"""A model's verdict on one text. Torch-free, so tasks and batching can use it without the model code."""

from __future__ import annotations

from dataclasses import dataclass

_QUANTIZED = {"4bit": "nf4", "8bit": "int8"}


@dataclass(frozen=True)
class Score:
    spam_score: float
    truncated: bool
    error: str | None = None
    """Set when this text could not be scored (out of memory even alone); ``spam_score`` is then NaN."""
    version: str = ""
    """The ``model_version`` of the weights that gave the score."""
    precision: str = ""
    """What the weights computed it in (:func:`precision_of`): one version served in bfloat16 on a
    GPU and in float32 on a CPU gives slightly different scores, and a fleet is measured apart by it."""


def precision_of(dtype: str, quantization: str | None) -> str:
    """``nf4`` or ``int8`` for weights quantized by bitsandbytes (4-bit is always NF4 here), else the
    weights' dtype: ``float32``, ``bfloat16``, ``float16``."""
    return _QUANTIZED.get(quantization or "", dtype)
