"""The reference strategy: ``from_pretrained`` with the guide's switches, plus completeness checks.

``USE_SAFETENSORS``, ``TORCH_DTYPE``, ``DEVICE``, ``MAX_MEMORY_GB`` and ``USE_QUANTIZATION`` are
passed through. ``LOW_CPU_MEM_USAGE`` is not: transformers 5 always builds the skeleton on the meta
device and ignores the flag. A weight the checkpoint lacks (and the adapter does not supply) is an
error here, where transformers would only log it and leave the weight random.
"""

from __future__ import annotations

import torch

from worker.errors import ModelLoadError
from worker.loading.base import BaseLoader
from worker.loading.devices import Placement
from worker.loading.plan import LoadPlan


class TransformersLoader(BaseLoader):
    def load_base(self, plan: LoadPlan, placement: Placement) -> tuple[torch.nn.Module, set[str]]:
        model, info = plan.model_class.from_pretrained(
            plan.model_id,
            config=plan.config,
            use_safetensors=self.settings.use_safetensors or None,
            trust_remote_code=plan.trust_remote_code,
            output_loading_info=True,
            **placement.from_pretrained_kwargs(),
        )
        if info["mismatched_keys"]:
            first = sorted(info["mismatched_keys"])[0]
            raise ModelLoadError(plan.name, f"weights with the wrong shape in {plan.model_id!r} (first: {first})")
        return model, set(info["missing_keys"])
