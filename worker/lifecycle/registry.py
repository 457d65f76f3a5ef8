"""The models of this worker process, loaded once at start-up and read by every task.

Like arq's ``ctx``: the process-start hook fills it, tasks only look things up. Importing this
module is cheap (no torch), so the task module and Flower can import it too.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from producer.contract import ModelUnavailable
from worker.errors import ModelLoadError
from worker.serving import time_limits
from worker.telemetry.stats import process_stats

if TYPE_CHECKING:
    from worker.serving.batching import Batcher
    from worker.serving.classifiers import SpamClassifier
    from worker.serving.score import Score
    from worker.settings import Settings

log = logging.getLogger(__name__)

LOAD_LOCK = threading.Lock()
"""One model load or snapshot build at a time per process: transformers builds models under
process-wide patches (meta-device init, weight tying), and two loads in two threads break each
other (a tied ``lm_head`` found missing). Serving goes on meanwhile. A forked child gets it unlocked,
whatever a thread of its parent was doing at the fork."""

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=LOAD_LOCK._at_fork_reinit)


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, SpamClassifier] = {}
        self._batchers: dict[str, Batcher] = {}
        self._swap_lock = threading.Lock()

    def preload(self, settings: Settings) -> None:
        """Load every model in ``PRELOAD_MODELS`` completely, or raise ``ModelLoadError``. A model
        whose snapshot is not built yet serves from the checkpoint (or its adapter unmerged) until a
        builder process has built it (:mod:`worker.lifecycle.builds`)."""
        for name in settings.preload_models:
            self.swap(name, load_classifier(name, settings, serve_before_build=True, serve_unmerged=True))

    def swap(self, name: str, classifier: SpamClassifier, replacing: SpamClassifier | None = None) -> bool:
        """Serve ``name`` with ``classifier`` from the next task (or batched forward pass) on; a call
        already scoring keeps the classifier it started with. With ``replacing``, only if that is still
        the one serving (a newer swap wins). The replaced model is freed (RAM and GPU memory)."""
        with self._swap_lock:
            old = self._models.get(name)
            if replacing is not None and old is not replacing:
                return False
            self._models[name] = classifier
            if name in self._batchers:
                self._batchers[name].scorer = classifier
            process_stats.record_load(name, classifier.loaded)
        if old is not None and old is not classifier:
            del old
            release_memory()
        return True

    def enable_batching(self, max_wait_s: float) -> None:
        """Route every ``score`` through one batcher per model (non-forking pools: concurrent tasks
        share forward passes, and a task past its deadline stops waiting)."""
        from celery.worker import state

        from worker.serving.batching import Batcher

        for name, classifier in self._models.items():
            self._batchers[name] = Batcher(classifier, classifier.batch_size, max_wait_s,
                                           in_flight=lambda: len(state.active_requests),
                                           on_batch=process_stats.record_forward,
                                           thread_init=_device_of(classifier.device))
        log.info("dynamic batching on: up to %s texts per forward pass, waiting at most %.1f ms; a task waits "
                 "at most TASK_TIME_LIMIT_S",
                 ", ".join(f"{n} {c.batch_size}" for n, c in self._models.items()), max_wait_s * 1000)

    def has(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def score(self, name: str, texts: list[str]) -> list[Score]:
        """Scores in input order, batched with the other tasks of this process when batching is on."""
        batcher = self._batchers.get(name)
        return batcher.score(texts, time_limits.deadline()) if batcher else self.get(name).score(texts)

    def get(self, name: str) -> SpamClassifier:
        try:
            return self._models[name]
        except KeyError:
            loaded = ", ".join(self._models) or "none"
            raise ModelUnavailable(f"model {name!r} is not loaded in this worker (loaded: {loaded})") from None


def load_classifier(name: str, settings: Settings, **serve: bool) -> SpamClassifier:
    """``name`` loaded completely, as ``settings`` say (their paths resolved once: every file of the
    load is read from the same real folders), and warmed up; or ``ModelLoadError``. ``serve``: the
    snapshot loader's options to serve before its snapshot is built."""
    from worker.lifecycle.pinning import pin
    from worker.loading import get_loader
    from worker.serving.classifiers import SpamClassifier

    settings = pin(settings, (name,))
    options = serve if settings.model_loader == "snapshot" else {}
    with LOAD_LOCK:
        loaded = get_loader(settings, **options).load_model(settings.source(name))
    max_tokens = settings.exaone_max_tokens if name == "exaone" else None
    try:
        classifier = SpamClassifier(loaded, settings.batch_size, max_tokens)
    except ValueError as exc:  # a prompt contract this tokenizer or window cannot serve
        raise ModelLoadError(name, str(exc)) from None
    start = time.perf_counter()
    classifier.warm_up()
    loaded.timings["warmup"] = round(time.perf_counter() - start, 4)
    log.info("%s ready: %s", name, ", ".join(f"{k} {v:.2f}s" for k, v in loaded.timings.items()))
    return classifier


def release_memory() -> None:
    """Give a replaced model's memory back: collect the cycles that may hold it, return freed heap
    pages to the OS (glibc keeps them otherwise, and the process's RSS would stay at two models), and
    release the GPU blocks torch's caching allocator keeps for reuse."""
    gc.collect()
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _device_of(device):
    """Make the model's GPU the batcher thread's current device (it is per thread in torch): else
    argument-less CUDA calls there (``empty_cache``) would act on, and open a context on, GPU 0. Holds
    the device only: a closure over the classifier would keep a replaced model alive."""
    def init() -> None:
        import torch

        if device.type == "cuda":
            torch.cuda.set_device(device)

    return init


registry = ModelRegistry()
