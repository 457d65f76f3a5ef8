"""The real loaders on tiny models in the published layouts: complete, verified, or an error."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import factories
from worker.errors import ModelLoadError
from worker.loading import get_loader
from worker.loading.plan import PROMPT, SEQUENCE
from worker.serving.classifiers import SpamClassifier
from worker.settings import ModelSource, Settings

SETTINGS = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "MODEL_LOADER": "transformers"},
                             dotenv=False)
TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "See you " * 30, "a"]


def load(name: str, model: Path, adapter: Path | None, settings: Settings = SETTINGS):
    return get_loader(settings).load_model(ModelSource(name, str(model), adapter))


def scores(name: str, model: Path, adapter: Path | None, texts=TEXTS, settings: Settings = SETTINGS) -> list[float]:
    return [s.spam_score for s in SpamClassifier(load(name, model, adapter, settings), batch_size=8).score(texts)]


def lora_modules(model: torch.nn.Module) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}


def test_exaone_adapter_attaches_to_every_remote_code_module(models):
    loaded = load("exaone", models.exaone, models.exaone_adapter)
    assert loaded.head == PROMPT
    modules = lora_modules(loaded.model)
    # 2 layers x (q, k, v, o, gate, up, down): what the adapter names as out_proj, c_fc_0, ... included.
    assert len(modules) == 14
    for leaf in ("o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(m.endswith(leaf) for m in modules), leaf


def test_exaone_without_tie_key_ties_lm_head_to_embeddings(models):
    raw = json.loads((models.exaone / "config.json").read_text())
    assert "tie_word_embeddings" not in raw
    model = load("exaone", models.exaone, None).model
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_exaone_weights_equal_the_checkpoint_values(models):
    model = load("exaone", models.exaone, None).model
    state = model.state_dict()
    checkpoint = {}
    for shard in models.exaone.glob("model-*.safetensors"):
        checkpoint.update(load_file(shard))
    assert len(checkpoint) == len([k for k in state if k != "lm_head.weight"])
    assert torch.equal(state["model.layers.1.self_attn.o_proj.weight"],
                       checkpoint["transformer.h.1.attn.attention.out_proj.weight"])
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], checkpoint["transformer.h.0.mlp.c_proj.weight"])
    assert torch.equal(state["model.norm.weight"], checkpoint["transformer.ln_f.weight"])


def test_seq_cls_adapters_bring_their_classifier(models):
    for name, base, adapter in [("koelectra", models.koelectra, models.koelectra_adapter),
                                ("exaone", models.exaone, models.exaone_cls_adapter)]:
        loaded = load(name, base, adapter)
        assert loaded.head == SEQUENCE
        assert loaded.plan.labels == ("LABEL_0", "LABEL_1") and loaded.plan.spam_index == 1
        saved = load_file(adapter / "adapter_model.safetensors")
        head_keys = [k for k in saved if "lora_" not in k]
        assert head_keys, "the factory adapter saves its classifier"


def test_named_labels_choose_the_spam_index(models, tmp_path):
    adapter = factories.build_koelectra_adapter(tmp_path / "a", models.koelectra, id2label={"0": "spam", "1": "ham"})
    loaded = load("koelectra", models.koelectra, adapter)
    assert loaded.plan.labels == ("spam", "ham") and loaded.plan.spam_index == 0


@pytest.mark.parametrize("loader", ["transformers", "snapshot"])
@pytest.mark.parametrize("which", ["exaone", "exaone_cls", "koelectra"])
def test_every_adapted_module_changes_the_score(models, tmp_path, which, loader):
    """Perturbing any single adapted module's LoRA weights must change the result (merged or not)."""
    settings = replace(SETTINGS, model_loader=loader, snapshot_dir=str(tmp_path / "snapshots"))
    base = {"exaone": models.exaone, "exaone_cls": models.exaone, "koelectra": models.koelectra}[which]
    original = {"exaone": models.exaone_adapter, "exaone_cls": models.exaone_cls_adapter,
                "koelectra": models.koelectra_adapter}[which]
    name = "koelectra" if which == "koelectra" else "exaone"
    reference = scores(name, base, original, settings=settings)
    assert scores(name, base, original, settings=settings) == reference  # deterministic
    modules = factories.adapter_module_keys(original)
    assert len(modules) == (6 if which == "koelectra" else 14)
    for module in modules:
        copy = tmp_path / module.replace(".", "_")
        shutil.copytree(original, copy)
        factories.perturb_adapter_module(copy, module + ".")
        changed = scores(name, base, copy, settings=settings)
        assert changed != reference, f"perturbing {module} changed nothing: the module was dropped"


def test_batch_scores_equal_single_scores(models):
    for name, base, adapter in [("koelectra", models.koelectra, models.koelectra_adapter),
                                ("exaone", models.exaone, models.exaone_adapter),
                                ("exaone", models.exaone, models.exaone_cls_adapter),
                                ("exaone", models.exaone, None)]:
        classifier = SpamClassifier(load(name, base, adapter), batch_size=3)
        batched = [s.spam_score for s in classifier.score(TEXTS)]
        single = [classifier.score([t])[0].spam_score for t in TEXTS]
        assert batched == pytest.approx(single, abs=1e-5), (name, adapter)


def test_long_texts_are_truncated_and_flagged(models):
    classifier = SpamClassifier(load("exaone", models.exaone, models.exaone_adapter), batch_size=4, max_tokens=160)
    short, long = classifier.score(["짧은 메시지", "광고 " * 200])
    assert not short.truncated and long.truncated
    assert 0.0 <= long.spam_score <= 1.0
    with pytest.raises(ValueError, match="leaves no room for the message"):
        SpamClassifier(classifier.loaded, batch_size=4, max_tokens=100)


# --- failures: every one is a ModelLoadError naming the model and the cause -------------------


def test_missing_adapter_folder(models, tmp_path):
    with pytest.raises(ModelLoadError, match=r"'exaone'.*adapter folder .* does not exist"):
        load("exaone", models.exaone, tmp_path / "nope")


def test_adapter_folder_without_weights(models, tmp_path):
    adapter = tmp_path / "empty"
    shutil.copytree(models.exaone_adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has none of adapter_model.safetensors"):
        load("exaone", models.exaone, adapter)


def test_corrupt_adapter_weights(models, tmp_path):
    adapter = tmp_path / "corrupt"
    shutil.copytree(models.exaone_adapter, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt adapter weights"):
        load("exaone", models.exaone, adapter)


def test_adapter_for_another_base(models):
    with pytest.raises(ModelLoadError, match="'koelectra'.*does not fit"):
        load("koelectra", models.koelectra, models.exaone_cls_adapter)


def test_adapter_with_modules_the_model_lacks(models, tmp_path):
    adapter = tmp_path / "extra"
    shutil.copytree(models.exaone_adapter, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.0.attn.attention.extra_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="names module 'model.layers.0.self_attn.extra_proj'.*lacks"):
        load("exaone", models.exaone, adapter)


def test_adapter_weights_for_modules_its_config_does_not_target(models, tmp_path):
    """The silent-drop case: weights for out_proj, but target_modules never attaches LoRA there."""
    adapter = tmp_path / "untargeted"
    shutil.copytree(models.exaone_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = [m for m in config["target_modules"] if m != "out_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="4 adapter weights match no module"):
        load("exaone", models.exaone, adapter)


def test_seq_cls_adapter_without_classifier(models, tmp_path):
    adapter = tmp_path / "headless"
    shutil.copytree(models.koelectra_adapter, adapter)
    tensors = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_" in k}
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ModelLoadError, match="saves no classifier head"):
        load("koelectra", models.koelectra, adapter)


def test_koelectra_without_adapter_has_no_trained_head(models):
    with pytest.raises(ModelLoadError, match="no trained classification head.*KOELECTRA_ADAPTER_DIR"):
        load("koelectra", models.koelectra, None)


def test_checkpoint_missing_a_weight(models, tmp_path):
    base = tmp_path / "exaone"
    shutil.copytree(models.exaone, base)
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((base / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="weights missing .* would be left random"):
        load("exaone", base, None)


def test_truncated_checkpoint_shard(models, tmp_path):
    base = tmp_path / "exaone"
    shutil.copytree(models.exaone, base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="'exaone'"):
        load("exaone", base, None)


@pytest.mark.parametrize("value", ["/srv/nothing-here", "./models/none", "../etc", "org/../x", "https://x.y/m",
                                   "a/b/c", "~/none"])
def test_model_that_is_neither_a_folder_nor_a_hub_id(value):
    with pytest.raises(ModelLoadError, match=r"'exaone'.*neither an existing folder nor a Hub id"):
        get_loader(SETTINGS).load_model(ModelSource("exaone", value, None))



def test_out_of_memory_splits_the_batch_and_fails_only_the_item(models, monkeypatch):
    classifier = SpamClassifier(load("koelectra", models.koelectra, models.koelectra_adapter), batch_size=8)
    texts = [f"메시지 {i}" for i in range(7)] + ["너무 큰 메시지"]
    expected = [s.spam_score for s in classifier.score(texts)]
    real_forward = classifier._forward
    calls: list[int] = []

    def forward(batch):
        calls.append(len(batch))
        if len(batch) > 2 or "너무 큰 메시지" in batch:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(batch)

    monkeypatch.setattr(classifier, "_forward", forward)
    got = classifier.score(texts)
    assert [s.spam_score for s in got[:7]] == pytest.approx(expected[:7], abs=1e-6)
    assert got[7].error == "out of memory even as a batch of one" and got[7].spam_score != got[7].spam_score
    assert calls[0] == 8 and max(calls[1:]) <= 4
