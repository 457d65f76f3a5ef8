"""A plain LoRA adapter served unmerged over the base, without PEFT: PEFT's scores, or a clear error."""

from __future__ import annotations

import json
import shutil

import pytest

from worker.errors import ModelLoadError
from worker.loading import lora
from worker.loading import plan as planning
from worker.loading.adapters import attach_adapter
from worker.loading.base import LoadedModel, load_base
from worker.loading.devices import Placement
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings

SETTINGS = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32"}, dotenv=False)
TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "See you " * 20, "a"]


def scores(plan, model) -> list[float]:
    loaded = LoadedModel(plan.name, model.eval(), planning.load_tokenizer(plan), plan,
                         Placement.for_model(plan.name, SETTINGS))
    return [s.spam_score for s in SpamClassifier(loaded, batch_size=4).score(TEXTS)]


@pytest.mark.parametrize("which", ["exaone", "exaone_cls", "koelectra"])
def test_unmerged_scores_equal_peft(models, which):
    name = "koelectra" if which == "koelectra" else "exaone"
    base = models.koelectra if which == "koelectra" else models.exaone
    adapter = {"exaone": models.exaone_adapter, "exaone_cls": models.exaone_cls_adapter,
               "koelectra": models.koelectra_adapter}[which]
    plan = planning.resolve(ModelSource(name, str(base), adapter), SETTINGS)
    placement = Placement.for_model(name, SETTINGS)
    assert lora.supported(plan.adapter)
    ours = lora.apply(name, load_base(plan, base, placement), plan.adapter)
    assert sum(isinstance(m, lora.LoraLinear) for m in ours.modules()) == len(
        [k for k in plan.adapter.tensors if "lora_A" in k])
    peft = attach_adapter(name, load_base(plan, base, placement), plan.adapter)
    assert scores(plan, ours) == pytest.approx(scores(plan, peft), abs=1e-5)
    assert scores(plan, ours) != pytest.approx(scores(plan, load_base(plan, base, placement)), abs=1e-4)


def test_an_adapter_that_does_not_fit_or_misses_a_layer_is_refused(models, tmp_path):
    plan = planning.resolve(ModelSource("exaone", str(models.exaone), models.exaone_adapter), SETTINGS)
    placement = Placement.for_model("exaone", SETTINGS)
    other = planning.resolve(ModelSource("exaone", str(models.exaone), models.koelectra_adapter), SETTINGS)
    with pytest.raises(ModelLoadError, match="does not fit this model"):
        lora.apply("exaone", load_base(plan, models.exaone, placement), other.adapter)
    missing = {k: v for k, v in plan.adapter.tensors.items() if "layers.1.mlp.down_proj" not in k}
    cut = type(plan.adapter)(plan.adapter.path, plan.adapter.config, missing)
    with pytest.raises(ModelLoadError, match="layers the adapter targets have no LoRA weights"):
        lora.apply("exaone", load_base(plan, models.exaone, placement), cut)


def test_only_plain_lora_is_served_unmerged(models, tmp_path):
    adapter = tmp_path / "dora"
    shutil.copytree(models.exaone_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    plan = planning.resolve(ModelSource("exaone", str(models.exaone), adapter), SETTINGS)
    assert not lora.supported(plan.adapter)
