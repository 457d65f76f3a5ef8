"""The loader interface: one ``load_model`` template, one subclass per way of getting the weights.

The base class owns the order of steps (resolve what to load, materialise the adapted model, load
the tokenizer), turns every failure into a ``ModelLoadError`` and times each stage; a strategy
implements ``load_weights``. ``load_adapted`` is the reference path the strategies share.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from worker.errors import ModelLoadError, first_line
from worker.lifecycle.versions import model_version
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
    finish: Callable[[], None] | None = None
    """Work this load deferred so the model could serve sooner (building its snapshot); run it, then
    load again to serve from what it prepared."""
    version: str = ""
    """``model_version`` (:mod:`worker.lifecycle.versions`): the same files give the same id everywhere."""

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
    finish: Callable[[], None] | None = None


class BaseLoader(ABC):
    """Loads one configured model completely or raises :class:`ModelLoadError`; never half."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def load_model(self, source: ModelSource) -> LoadedModel:
        timer = StageTimer()
        with _load_errors(source.name):
            with timer.stage("resolve"):
                plan = planning.resolve(source, self.settings)
                placement = Placement.for_model(source.name, self.settings)
            weights = self.load_weights(plan, placement, timer)
            with timer.stage("tokenizer"):
                tokenizer = planning.load_tokenizer(plan)
            with timer.stage("version"):  # last: a Hub id's files, tokenizer included, are in the cache now
                version = model_version(plan, self.settings)
        weights.model.eval()
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in timer.seconds.items())
        log.info("loaded %s version %s from %s (%s) in %.2fs (%s)", source.name, version, _where(source.model),
                 weights.source, sum(timer.seconds.values()), stages)
        return LoadedModel(source.name, weights.model, tokenizer, plan, placement, timer.seconds,
                           source=weights.source, bytes_read=sum(f.stat().st_size for f in weights.files),
                           finish=weights.finish, version=version)

    @abstractmethod
    def load_weights(self, plan: planning.LoadPlan, placement: Placement, timer: StageTimer) -> LoadedWeights:
        """Materialise the adapted model, every weight from the checkpoint, adapter or a prepared copy."""

    def prepare(self, source: ModelSource) -> str:
        """Make what a later ``load_model`` of ``source`` needs (a strategy's files) and check what can
        be checked without materialising it: the plan, the adapter, the tokenizer, the prompt's answers
        and how its template places the message.
        Returns the ``model_version`` the load will have; raises :class:`ModelLoadError`."""
        with _load_errors(source.name):
            plan = planning.resolve(source, self.settings)
            if plan.prompt is not None:
                tokenizer = planning.load_tokenizer(plan)
                plan.prompt.answer_ids(tokenizer)
                plan.prompt.frame(tokenizer)
            self.prepare_weights(plan, Placement.for_model(source.name, self.settings))
            return model_version(plan, self.settings)

    def prepare_weights(self, plan: planning.LoadPlan, placement: Placement) -> None:  # noqa: B027 - a hook
        """Write whatever ``load_weights`` will read (nothing for the reference path)."""

    def prepared(self, source: ModelSource) -> bool:
        """Whether everything a ``load_model`` of ``source`` reads exists already, so that
        :meth:`prepare` would write nothing: cheap (small files and headers), no model, no CUDA."""
        return True


def load_adapted(plan: planning.LoadPlan, placement: Placement, settings: Settings,
                 timer: StageTimer) -> torch.nn.Module:
    """The reference path: ``from_pretrained`` with the guide's switches, then the verified adapter.

    ``LOW_CPU_MEM_USAGE`` is not passed: transformers 5 always builds on the meta device and ignores
    it. A weight the checkpoint lacks (and the adapter does not supply) is an error here, where
    transformers would only log it and leave the weight random.
    """
    with timer.stage("materialise"):
        model = load_base(plan, plan.model_id, placement, use_safetensors=settings.use_safetensors or None)
    if plan.adapter is not None:
        with timer.stage("adapter"):
            model = attach_adapter(plan.name, model, plan.adapter)
    return model


def load_base(plan: planning.LoadPlan, folder: str | Path, placement: Placement, **kwargs: Any) -> torch.nn.Module:
    """The base model from ``folder`` (the checkpoint, or a converted copy of it), checked to be
    complete once the adapter's saved modules are in, and to fit the adapter."""
    model, info = plan.model_class.from_pretrained(
        folder, config=plan.config, trust_remote_code=plan.trust_remote_code, output_loading_info=True,
        **placement.from_pretrained_kwargs(plan=plan), **kwargs,
    )
    if info["mismatched_keys"]:
        first = sorted(info["mismatched_keys"])[0]
        raise ModelLoadError(plan.name, f"weights with the wrong shape in {str(folder)!r} (first: {first})")
    if plan.adapter is not None:
        check_fits(plan.name, model, plan.adapter)
    _check_complete(plan, set(info["missing_keys"]))
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


@contextmanager
def _load_errors(name: str) -> Iterator[None]:
    """Every failure to load ``name`` as one :class:`ModelLoadError` line."""
    try:
        yield
    except ModelLoadError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(name, f"out of GPU memory: {first_line(exc)}") from exc
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelLoadError(name, f"{type(exc).__name__}: {first_line(exc)}") from exc


def _where(model: str) -> str:
    return str(Path(model)) if Path(model).exists() else model
