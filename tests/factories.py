"""Tiny models with the real architectures and on-disk layouts, built with random weights.

No model can be downloaded here, so the tests make their own: a KoELECTRA-style discriminator
checkpoint with a WordPiece tokenizer and a ``SEQ_CLS`` LoRA adapter, and an EXAONE 3.5 checkpoint
in the layout LG publishes (``model_type: "exaone"``, remote-code key names, tied embeddings with
the config key omitted) with adapters trained against the remote-code module names. The loading
code under test is the real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    ElectraConfig,
    ElectraForPreTraining,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요",
    "대출 승인 완료 010-1234-5678 로 연락 주세요",
    "내일 회의는 오후 3시에 시작합니다",
    "엄마 오늘 저녁 같이 먹어요",
    "[광고] 최저가 할인 이벤트 진행중 spam ham",
    "Congratulations you won a free prize click here",
    "See you at lunch tomorrow",
    "택배가 도착했습니다 확인 부탁드립니다",
]

# EXAONE 3.5's chat template, reduced to what the prompt builder uses.
EXAONE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\n' }}{% endif %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

# Native Llama module name -> EXAONE remote-code module name.
LLAMA_TO_EXAONE = {
    "model.embed_tokens.": "transformer.wte.",
    "model.layers.": "transformer.h.",
    "model.norm.": "transformer.ln_f.",
    ".self_attn.o_proj.": ".attn.attention.out_proj.",
    ".self_attn.": ".attn.attention.",
    ".input_layernorm.": ".ln_1.",
    ".post_attention_layernorm.": ".ln_2.",
    ".mlp.gate_proj.": ".mlp.c_fc_0.",
    ".mlp.up_proj.": ".mlp.c_fc_1.",
    ".mlp.down_proj.": ".mlp.c_proj.",
}
EXAONE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc_0", "c_fc_1", "c_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _to_exaone_key(key: str) -> str:
    for native, remote in LLAMA_TO_EXAONE.items():
        key = key.replace(native, remote)
    return key


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


# --- tokenizers -------------------------------------------------------------------------------


def build_wordpiece_tokenizer(out: Path, corpus: list[str] | None = None, vocab_size: int = 300,
                              alphabet: list[str] | None = None, vocab: list[str] | None = None) -> None:
    """A BERT-style WordPiece tokenizer like KoELECTRA's, trained on the tiny corpus (or ``corpus``).

    ``alphabet``: characters added to the trained vocabulary both as a word start and as a ``##``
    continuation, so that a word made of them never becomes ``[UNK]`` (as in KoELECTRA's vocabulary).
    ``vocab``: a fixed vocabulary (after the special tokens) instead of a trained one; the trainer
    breaks frequency ties differently in every process, a given vocabulary is reproducible.
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if vocab is None:
        tok.train_from_iterator(CORPUS if corpus is None else corpus,
                                trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    else:
        tok.model = models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(specials + vocab))}, unk_token="[UNK]")
    if alphabet:
        vocab = tok.get_vocab()
        for piece in (p for c in alphabet for p in (c, f"##{c}")):
            vocab.setdefault(piece, len(vocab))
        tok.model = models.WordPiece(vocab, unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
    fast.save_pretrained(out)


def build_bytelevel_tokenizer(out: Path, corpus: list[str] | None = None, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer with EXAONE's special tokens and chat template.

    Trained on the tiny corpus plus the label words, or on ``corpus`` alone when given.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS + ["spam", "ham", "스팸", "정상"] if corpus is None else corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[|endofturn|]", unk_token="[UNK]",
        model_max_length=256,
    )
    fast.chat_template = EXAONE_CHAT_TEMPLATE
    fast.save_pretrained(out)


# --- KoELECTRA ----------------------------------------------------------------------------------


def electra_config(vocab_size: int, **overrides) -> ElectraConfig:
    sizes = {"embedding_size": 32, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
    return ElectraConfig(vocab_size=vocab_size, **{**sizes, **overrides})


def build_koelectra(out: Path, seed: int = 0, corpus: list[str] | None = None, vocab_size: int = 300,
                    alphabet: list[str] | None = None, config: dict | None = None,
                    vocab: list[str] | None = None) -> Path:
    """A discriminator checkpoint like ``monologg/koelectra-small-v3-discriminator``.

    ``corpus``/``vocab_size``/``alphabet``/``vocab``: see :func:`build_wordpiece_tokenizer`;
    ``config`` overrides sizes.
    """
    out.mkdir(parents=True, exist_ok=True)
    build_wordpiece_tokenizer(out, corpus, vocab_size, alphabet, vocab)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    _seed(seed)
    model = ElectraForPreTraining(electra_config(vocab_size, **(config or {})))
    model.save_pretrained(out)
    return out


def build_koelectra_adapter(out: Path, base: Path, seed: int = 1, id2label: dict | None = None) -> Path:
    """A ``SEQ_CLS`` LoRA adapter with the classifier in ``modules_to_save``, all weights non-zero."""
    _seed(seed)
    model = ElectraForSequenceClassification.from_pretrained(base, num_labels=2)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "key", "value"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    if id2label is not None:
        (out / "config.json").write_text(json.dumps({"id2label": id2label}))
    return out


# --- EXAONE -------------------------------------------------------------------------------------


def exaone_config_dict(vocab_size: int, **overrides) -> dict:
    """A config.json as LG publishes it, shrunk; ``tie_word_embeddings`` omitted on purpose."""
    return {
        "architectures": ["ExaoneForCausalLM"],
        "model_type": "exaone",
        "activation_function": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": 256,
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 64, "rope_type": "llama3",
        },
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 7,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    } | overrides


def _llama_config(exaone: dict, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=exaone["vocab_size"], hidden_size=exaone["hidden_size"],
        intermediate_size=exaone["intermediate_size"], num_hidden_layers=exaone["num_layers"],
        num_attention_heads=exaone["num_attention_heads"], num_key_value_heads=exaone["num_key_value_heads"],
        head_dim=exaone["head_dim"], rms_norm_eps=exaone["layer_norm_epsilon"],
        max_position_embeddings=exaone["max_position_embeddings"],
        rope_parameters={"rope_theta": exaone["rope_theta"], **exaone["rope_scaling"]},
        tie_word_embeddings=True, pad_token_id=0, **extra,
    )


def build_exaone(out: Path, seed: int = 0, shards: int = 2, corpus: list[str] | None = None,
                 vocab_size: int = 400, config: dict | None = None) -> Path:
    """An EXAONE 3.5 checkpoint in the published layout: remote-code key names, fp32, sharded.

    ``corpus``/``vocab_size`` train the tokenizer on other text; ``config`` overrides config.json sizes.
    """
    out.mkdir(parents=True, exist_ok=True)
    build_bytelevel_tokenizer(out, corpus, vocab_size)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = exaone_config_dict(vocab_size, **(config or {}))
    _seed(seed)
    model = LlamaForCausalLM(_llama_config(config))
    # Norm weights are ones at init; randomise them so that a dropped norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {_to_exaone_key(k): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per_shard:(i + 1) * per_shard]}
        save_file(part, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def build_exaone_adapter(out: Path, base: Path, task_type: str = "CAUSAL_LM", seed: int = 1,
                         dora: bool = False) -> Path:
    """A LoRA adapter as one trained with EXAONE's remote code would be saved (``dora``: a DoRA one,
    which only PEFT can apply).

    Built on the native Llama layout, then written back with the remote-code names in both the
    tensor keys and ``target_modules`` (what PEFT records when it trains on the remote model).
    """
    config = json.loads((base / "config.json").read_text())
    _seed(seed)
    if task_type == "SEQ_CLS":
        model = LlamaForSequenceClassification(_llama_config(config, num_labels=2))
        lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                          init_lora_weights=False)
    else:
        model = LlamaForCausalLM(_llama_config(config))
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                          init_lora_weights=False, use_dora=dora)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(out)
    tensors = load_file(out / "adapter_model.safetensors")
    remote = {_to_exaone_key(k): v for k, v in tensors.items()}
    save_file(remote, out / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["target_modules"] = sorted(EXAONE_TARGETS)
    adapter_config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return out


def perturb_adapter_module(adapter: Path, module_key: str, scale: float = 0.5) -> None:
    """Add noise to the LoRA B weights of one adapted module (key substring) in place."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    hits = [k for k in tensors if module_key in k and "lora_B" in k]
    assert len(hits) == 1, (module_key, hits)
    gen = torch.Generator().manual_seed(123)
    tensors[hits[0]] = tensors[hits[0]] + scale * torch.randn(tensors[hits[0]].shape, generator=gen)
    save_file(tensors, path, metadata={"format": "pt"})


def adapter_versions(adapter: Path, folder: Path) -> dict[str, Path]:
    """What a rollout flips between, made in ``folder``: ``v1`` (a copy of the EXAONE-layout
    ``adapter``), ``v2`` (one module retrained) and ``current``, a relative symlink to v1."""
    folder.mkdir(parents=True, exist_ok=True)
    v1, v2 = folder / "v1", folder / "v2"
    shutil.copytree(adapter, v1)
    shutil.copytree(adapter, v2)
    perturb_adapter_module(v2, "h.1.mlp.c_proj", scale=0.5)
    (folder / "current").symlink_to("v1")
    return {"v1": v1, "v2": v2, "current": folder / "current"}


def adapter_module_keys(adapter: Path) -> list[str]:
    """The module paths (key prefixes) that carry LoRA weights in an adapter file."""
    keys = load_file(adapter / "adapter_model.safetensors")
    return sorted({k.split(".lora_B")[0] for k in keys if ".lora_B" in k})
