"""EXAONE 3.x as LG publishes it, mapped onto transformers' native Llama implementation.

transformers >= 5.24 loads ``model_type: "exaone"`` as ``LlamaForCausalLM`` and renames the
checkpoint keys, so no ``trust_remote_code`` is needed. Two things it leaves to us:

- the remote code defaults ``tie_word_embeddings`` to True, the native config to False: a config
  that omits the key would get a random ``lm_head``;
- PEFT renames adapter tensor keys but not ``target_modules``: an adapter trained on ``out_proj``,
  ``c_fc_0``, ``c_fc_1``, ``c_proj`` would silently attach only to q/k/v.

This module holds the name translation for both tensor keys and module names.
"""

from __future__ import annotations

import re

MODEL_TYPE = "exaone"

# Applied in order to "." + a dotted path (without its PEFT prefix) + "."; mirrors the remote tree.
_KEY_RENAMES = [
    (re.compile(r"^\.transformer\.wte\."), ".model.embed_tokens."),
    (re.compile(r"^\.transformer\.h\."), ".model.layers."),
    (re.compile(r"^\.transformer\.ln_f\."), ".model.norm."),
    (re.compile(r"\.attn\.attention\.out_proj\."), ".self_attn.o_proj."),
    (re.compile(r"\.attn\.attention\."), ".self_attn."),
    (re.compile(r"\.ln_1\."), ".input_layernorm."),
    (re.compile(r"\.ln_2\."), ".post_attention_layernorm."),
    (re.compile(r"\.mlp\.c_fc_0\."), ".mlp.gate_proj."),
    (re.compile(r"\.mlp\.c_fc_1\."), ".mlp.up_proj."),
    (re.compile(r"\.mlp\.c_proj\."), ".mlp.down_proj."),
]

# Leaf module names, as they appear in ``target_modules`` / ``modules_to_save``.
MODULE_RENAMES = {
    "out_proj": "o_proj",
    "c_fc_0": "gate_proj",
    "c_fc_1": "up_proj",
    "c_proj": "down_proj",
    "wte": "embed_tokens",
    "ln_f": "norm",
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attention": "self_attn",
    "h": "layers",
}

_PEFT_PREFIX = "base_model.model."


def is_exaone(config_dict: dict) -> bool:
    return config_dict.get("model_type") == MODEL_TYPE


def tie_word_embeddings(config_dict: dict) -> bool:
    """Whether the checkpoint ties ``lm_head`` to the embeddings (the remote code's default: yes)."""
    return bool(config_dict.get("tie_word_embeddings", True))


def _rename_path(path: str) -> str:
    dotted = f".{path}."
    for pattern, repl in _KEY_RENAMES:
        dotted = pattern.sub(repl, dotted)
    return dotted[1:-1]


def rename_key(key: str) -> str:
    """Translate one adapter tensor key from remote-code names to native Llama names."""
    prefix = _PEFT_PREFIX if key.startswith(_PEFT_PREFIX) else ""
    return prefix + _rename_path(key[len(prefix):])


def rename_modules(names: str | list[str] | set[str] | None) -> str | list[str] | None:
    """Translate ``target_modules`` / ``modules_to_save`` (names, dotted paths or a regex)."""
    if names is None:
        return None
    if isinstance(names, str):
        # A regex: rename whole words only; the post-load check catches anything it misses.
        return re.sub(r"\b(" + "|".join(map(re.escape, MODULE_RENAMES)) + r")\b",
                      lambda m: MODULE_RENAMES[m.group(1)], names)
    out = []
    for name in names:
        out.append(_rename_path(name) if "." in name else MODULE_RENAMES.get(name, name))
    return sorted(set(out))
