"""The loader interface: one ``load_model`` template, one subclass per way of getting the weights.

The base class owns the order of steps (resolve what to load, materialise the adapted model, load
the tokenizer), turns every failure into a ``ModelLoadError`` and times each stage; a strategy
implements ``load_weights``. ``load_adapted`` is the reference path the strategies share.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from worker.errors import ModelLoadError, first_line
from worker.loading import plan as planning
from worker.loading.adapters import attach_adapter, check_fits
from worker.loading.devices import Placement
from worker.settings import ModelSource, Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to classify, with what a classifier and the stats need to know about it."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    plan: planning.LoadPlan
    placement: Placement
    timings: dict[str, float] = field(default_factory=dict)
    source: str = "checkpoint"
    """``checkpoint`` (the published files, converted on load) or a strategy's own cache."""
    bytes_read: int = 0
    """Size of the weight files this load had to read (base checkpoint and adapter)."""

    @property
    def head(self) -> str:
        return self.plan.head


class StageTimer:
    """Wall-clock seconds per load stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass
class LoadedWeights:
    """What a strategy returns: the adapted model and where its weights came from."""

    model: torch.nn.Module
    source: str
    files: list[Path]


class BaseLoader(ABC):
    """Loads one configured model completely or raises :class:`ModelLoadError`; never half."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load_model(self, source: ModelSource) -> LoadedModel:
        timer = StageTimer()
        try:
            with timer.stage("resolve"):
                plan = planning.resolve(source, self.settings)
                placement = Placement.for_model(source.name, self.settings)
            weights = self.load_weights(plan, placement, timer)
            with timer.stage("tokenizer"):
                tokenizer = planning.load_tokenizer(plan)
        except ModelLoadError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(source.name, f"out of GPU memory: {first_line(exc)}") from exc
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
            raise ModelLoadError(source.name, f"{type(exc).__name__}: {first_line(exc)}") from exc
        weights.model.eval()
        log.info("loaded %s from %s (%s) in %.2fs (%s)", source.name, _where(source.model), weights.source,
                 sum(timer.seconds.values()), ", ".join(f"{k} {v:.2f}s" for k, v in timer.seconds.items()))
        return LoadedModel(source.name, weights.model, tokenizer, plan, placement, timer.seconds,
                           source=weights.source, bytes_read=sum(f.stat().st_size for f in weights.files))

    @abstractmethod
    def load_weights(self, plan: planning.LoadPlan, placement: Placement, timer: StageTimer) -> LoadedWeights:
        """Materialise the adapted model, every weight from the checkpoint, adapter or a prepared copy."""


def load_adapted(plan: planning.LoadPlan, placement: Placement, settings: Settings,
                 timer: StageTimer) -> torch.nn.Module:
    """The reference path: ``from_pretrained`` with the guide's switches, then the verified adapter.

    ``LOW_CPU_MEM_USAGE`` is not passed: transformers 5 always builds on the meta device and ignores
    it. A weight the checkpoint lacks (and the adapter does not supply) is an error here, where
    transformers would only log it and leave the weight random.
    """
    with timer.stage("materialise"):
        model, info = plan.model_class.from_pretrained(
            plan.model_id, config=plan.config, use_safetensors=settings.use_safetensors or None,
            trust_remote_code=plan.trust_remote_code, output_loading_info=True,
            **placement.from_pretrained_kwargs(plan=plan),
        )
    if info["mismatched_keys"]:
        first = sorted(info["mismatched_keys"])[0]
        raise ModelLoadError(plan.name, f"weights with the wrong shape in {plan.model_id!r} (first: {first})")
    if plan.adapter is not None:
        check_fits(plan.name, model, plan.adapter)
    _check_complete(plan, set(info["missing_keys"]))
    if plan.adapter is not None:
        with timer.stage("adapter"):
            model = attach_adapter(plan.name, model, plan.adapter)
    return model


def checkpoint_files(plan: planning.LoadPlan, settings: Settings) -> list[Path]:
    """The checkpoint and adapter weight files the reference path reads (empty if not local)."""
    files = planning.weight_files(plan.model_id, settings.use_safetensors)
    if plan.adapter is not None:
        files += [f for f in plan.adapter.path.glob("adapter_model.*") if f.is_file()]
    return files


def _check_complete(plan: planning.LoadPlan, missing: set[str]) -> None:
    """A weight neither the checkpoint nor the adapter supplies would be random: refuse it."""
    supplied = plan.adapter.covers if plan.adapter is not None else (lambda key: False)
    left = sorted(k for k in missing if not supplied(k))
    if left:
        raise ModelLoadError(
            plan.name, f"{len(left)} weights missing from {plan.model_id!r} would be left random (first: {left[0]})"
        )


def _where(model: str) -> str:
    return str(Path(model)) if Path(model).exists() else model
