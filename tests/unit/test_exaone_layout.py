"""Remote-code EXAONE names -> native Llama names, for adapter keys and module lists."""

from __future__ import annotations

from worker.loading import exaone_layout as layout


def test_adapter_keys_are_renamed():
    assert layout.rename_key("base_model.model.transformer.h.3.attn.attention.out_proj.lora_A.weight") == \
        "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight"
    assert layout.rename_key("base_model.model.transformer.h.0.mlp.c_fc_1.lora_B.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    assert layout.rename_key("base_model.model.transformer.wte.weight") == "base_model.model.model.embed_tokens.weight"
    assert layout.rename_key("base_model.model.score.weight") == "base_model.model.score.weight"


def test_module_lists_and_patterns_are_renamed():
    assert layout.rename_modules(["q_proj", "out_proj", "c_fc_0", "c_fc_1", "c_proj"]) == \
        ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj"]
    assert layout.rename_modules(["attn.attention.out_proj"]) == ["self_attn.o_proj"]
    assert layout.rename_modules(r".*\.(out_proj|c_proj)$") == r".*\.(o_proj|down_proj)$"
    assert layout.rename_modules(None) is None


def test_tie_defaults_to_true_for_this_family():
    assert layout.tie_word_embeddings({"model_type": "exaone"}) is True
    assert layout.tie_word_embeddings({"model_type": "exaone", "tie_word_embeddings": False}) is False
