"""The reference strategy: the checkpoint as published, converted and adapted at every start.

This is the path the old loading guide used (``from_pretrained`` with its switches, then PEFT),
plus the completeness checks; the snapshot strategy builds on it.
"""

from __future__ import annotations

from worker.loading.base import BaseLoader, LoadedWeights, StageTimer, checkpoint_files, load_adapted
from worker.loading.devices import Placement
from worker.loading.plan import LoadPlan


class TransformersLoader(BaseLoader):
    def load_weights(self, plan: LoadPlan, placement: Placement, timer: StageTimer) -> LoadedWeights:
        model = load_adapted(plan, placement, self.settings, timer)
        return LoadedWeights(model, "checkpoint", checkpoint_files(plan, self.settings))
