"""The out-of-memory retry frees the failed pass before it retries (on CUDA, ``empty_cache()`` can
only give back blocks no live tensor holds, and a live traceback holds the failed pass's)."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch

from worker.loading import get_loader
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings


class Activations:
    """Stands for the tensors a failed forward pass had allocated when it ran out of memory."""


def test_the_retry_runs_after_the_failed_pass_is_freed(models, monkeypatch):
    settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "MODEL_LOADER": "transformers"},
                                 dotenv=False)
    loaded = get_loader(settings).load_model(ModelSource("koelectra", str(models.koelectra),
                                                         models.koelectra_adapter))
    classifier = SpamClassifier(loaded, batch_size=8)
    classifier.device = torch.device("cuda")  # the path that calls empty_cache(); _forward is replaced below
    failed: list[weakref.ref] = []
    seen_at_retry: list[tuple[bool, bool]] = []  # (an exception being handled, the failed pass still alive)

    def state() -> tuple[bool, bool]:
        return sys.exc_info()[0] is not None, any(ref() is not None for ref in failed)

    def forward(batch: list[str]) -> list[float]:
        seen_at_retry.append(state())
        activations = Activations()  # referenced only by this frame, as a pass's tensors are
        if len(batch) > 2:
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [0.25] * len(batch)

    emptied: list[tuple[bool, bool]] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(state()))
    monkeypatch.setattr(classifier, "_forward", forward)
    assert classifier._forward_splitting([f"t{i}" for i in range(8)]) == pytest.approx([0.25] * 8)
    assert len(failed) == 3  # 8, then 4 + 4, then 2 + 2 + 2 + 2
    assert emptied == [(False, False)] * 3, "empty_cache() ran while the failed pass was still referenced"
    assert set(seen_at_retry) == {(False, False)}
