"""A model's verdict on one text. Torch-free, so tasks and batching can use it without the model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    spam_score: float
    truncated: bool
    error: str | None = None
    """Set when this text could not be scored (out of memory even alone); ``spam_score`` is then NaN."""
    version: str = ""
    """The ``model_version`` of the weights that gave the score."""
