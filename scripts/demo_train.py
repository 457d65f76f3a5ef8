"""Build the demo models and train their LoRA adapters on the synthetic spam/ham set (PEFT, CPU).

The base checkpoints are tiny random-weight models in the real layouts (``tests/factories.py``),
with tokenizers made from the synthetic training split and slot word lists (KoELECTRA's a fixed
frequency-ranked WordPiece vocabulary, EXAONE's a trained byte-level BPE); they stay frozen. Only the LoRA adapters
(and KoELECTRA's classifier head, saved in ``modules_to_save``) are trained, so what the demo
shows is the adapters at work. THE DATA IS SYNTHETIC (``scripts/demo_data.py``): the held-out
figures printed here mean nothing about real spam.

- KoELECTRA: a ``SEQ_CLS`` adapter, ``id2label`` {0: ham, 1: spam} in the adapter's ``config.json``.
- EXAONE: a ``CAUSAL_LM`` adapter trained on its prompt contract (``spam_prompt.json``, read back
  through ``worker.serving.prompt`` so training and serving build the same prompt): Korean labels of two
  tokens sharing the first, teacher-forced loss on the label tokens only. Trained on the native
  Llama layout and saved with EXAONE's remote-code names, as one trained on the published model is.

``python scripts/demo_train.py OUT`` builds everything under OUT and prints held-out figures.
"""

from __future__ import annotations

import json
import string
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import demo_data  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests import factories  # noqa: E402
from worker.loading import exaone_layout  # noqa: E402
from worker.serving import prompt  # noqa: E402

SEED = 0
THREADS = 2

# EXAONE's prompt contract: the labels share their first token ("스팸") and differ in the second.
PROMPT_CONTRACT = {
    "system": "문자 메시지 스팸 분류기입니다. '스팸 맞음' 또는 '스팸 아님'으로만 답하세요.",
    "user": "문자: {text}",
    "labels": {"spam": "스팸 맞음", "ham": "스팸 아님"},
    "chat_template": True,
}

KOELECTRA_SIZES = {"embedding_size": 64, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "intermediate_size": 128, "max_position_embeddings": 128}
# Every linear layer of the encoder (not the classifier head, which is trained whole).
KOELECTRA_TARGETS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                     r"|intermediate\.dense|output\.dense)")
# Twice the test factory's width (hidden 128, 2 layers): at 64 the adapter separates the classes less.
EXAONE_SIZES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
EXAONE_VOCAB = 1500


def korean_alphabet() -> list[str]:
    """The 2,350 Hangul syllables of KS X 1001 (the common set) and printable ASCII."""
    syllables = []
    for hi in range(0xB0, 0xC9):
        for lo in range(0xA1, 0xFF):
            try:
                syllables.append(bytes([hi, lo]).decode("euc-kr"))
            except UnicodeDecodeError:
                continue
    return syllables + [c for c in string.printable if not c.isspace()]


def wordpiece_vocab(texts: list[str], words: int = 1500, suffixes: int = 500) -> list[str]:
    """A KoELECTRA-style vocabulary, the same in every process (the WordPiece trainer is not): the
    most frequent words, the most frequent word endings as ``##`` pieces (particles and verb endings:
    는, 에서, 입니다), and every character of :func:`korean_alphabet` both ways. Ties go by text."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    split = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    ends: Counter[str] = Counter()
    for text in texts:
        for word, _ in split.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += 1
            ends.update(f"##{word[i:]}" for i in range(1, len(word)) if len(word) - i <= 3)
    top = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2 and len(w) > 1][:words]
    tails = [e for e, n in sorted(ends.items(), key=lambda kv: (-kv[1], kv[0])) if n >= 2 and len(e) > 3][:suffixes]
    chars = [p for c in korean_alphabet() for p in (c, f"##{c}")]
    return list(dict.fromkeys(chars + top + tails))


def _log(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _epochs(n: int, size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """The batches of ``epochs`` passes over ``n`` examples, each pass in a new seeded order."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).tolist()
        yield from (order[i:i + size] for i in range(0, n, size))


def _fit(model, batches: Iterable, loss_of: Callable[[object], torch.Tensor], lr: float, steps: int) -> None:
    """Train ``model``'s trainable weights one step per batch (``loss_of(batch)``, :func:`_optimizer`'s
    schedule over ``steps``), and leave it in eval mode."""
    optim, schedule = _optimizer(model, lr, steps)
    model.train()
    for batch in batches:
        loss = loss_of(batch)
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
    model.eval()


def _optimizer(model, lr: float, steps: int):
    """AdamW on the trainable (LoRA and saved-module) weights, the rate decaying linearly to zero:
    the last steps are small, so the adapter does not end on an unlucky jump."""
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda step: max(0.0, 1 - step / steps))


def f1(labels: list[str], scores: list[float], threshold: float = 0.5) -> float:
    """F1 of the spam class."""
    pred = [s >= threshold for s in scores]
    gold = [lab == "spam" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# --- KoELECTRA ----------------------------------------------------------------------------------


def train_koelectra(base: Path, out: Path, train: list[demo_data.Example], seed: int = SEED,
                    epochs: int = 10, lr: float = 2e-3, batch_size: int = 32) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, ElectraForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = ElectraForSequenceClassification.from_pretrained(  # no dropout: a tiny model, a short run
        base, num_labels=2, id2label={0: "ham", 1: "spam"}, label2id={"ham": 0, "spam": 1},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # The new head's initial values, drawn here in a fixed order (transformers' own order of
    # initialising missing weights may vary between processes).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.classifier.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02 if param.dim() > 1 else torch.zeros(param.shape))
    torch.manual_seed(seed)
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=KOELECTRA_TARGETS)
    model = get_peft_model(model, lora)
    enc = tokenizer([e.text for e in train], truncation=True, max_length=128, padding=True, return_tensors="pt")
    y = torch.tensor([int(e.label == "spam") for e in train])

    def loss(idx: list[int]) -> torch.Tensor:
        mask = enc["attention_mask"][idx]
        width = int(mask.sum(1).max())
        return model(input_ids=enc["input_ids"][idx, :width], attention_mask=mask[:, :width], labels=y[idx]).loss

    _fit(model, _epochs(len(train), batch_size, epochs, seed), loss, lr, epochs * -(-len(train) // batch_size))
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"id2label": {"0": "ham", "1": "spam"}}, indent=1))
    return out


@torch.inference_mode()
def koelectra_scores(base: Path, adapter: Path, texts: list[str]) -> list[float]:
    """P(spam) from the trained adapter, computed here (the worker's path is in the tests)."""
    from peft import PeftModel
    from transformers import AutoTokenizer, ElectraForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = ElectraForSequenceClassification.from_pretrained(base, num_labels=2)
    model = PeftModel.from_pretrained(model, adapter).eval()
    enc = tokenizer(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    return torch.softmax(model(**enc).logits, -1)[:, 1].tolist()


# --- EXAONE ---------------------------------------------------------------------------------------


def load_exaone_native(base: Path):
    """The published-layout checkpoint as a native ``LlamaForCausalLM`` (tied embeddings)."""
    from transformers import LlamaForCausalLM

    config = json.loads((base / "config.json").read_text())
    model = LlamaForCausalLM(factories._llama_config(config))
    state = {}
    for shard in sorted(base.glob("model-*.safetensors")):
        state.update({exaone_layout.rename_key(k): v for k, v in load_file(shard).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _exaone_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"
    return tokenizer


def _encode(tokenizer, contract: prompt.PromptContract, texts: list[str], labels: list[list[int]]):
    """Right-padded prompt + label ids, and the targets: -100 except on the label tokens."""
    rows, targets = [], []
    for text, label in zip(texts, labels, strict=True):
        ids = tokenizer(contract.render(tokenizer, text), add_special_tokens=False)["input_ids"]
        rows.append(ids + label)
        targets.append([-100] * len(ids) + label)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    return input_ids, mask, target


def check_labels(tokenizer, contract: prompt.PromptContract) -> tuple[list[int], list[int]]:
    """The label ids; each label must be several tokens, sharing their leading token(s)."""
    spam, ham = contract.label_ids(tokenizer)
    if len(spam) < 2 or len(ham) < 2 or spam[0] != ham[0]:
        raise AssertionError(f"demo labels should be multi-token with a shared first token: {spam} {ham}")
    return spam, ham


def train_exaone(base: Path, out: Path, train: list[demo_data.Example], seed: int = SEED, rank: int = 8,
                 epochs: int = 8, lr: float = 4e-3, batch_size: int = 32) -> Path:
    from peft import LoraConfig, get_peft_model

    out.mkdir(parents=True, exist_ok=True)
    (out / prompt.FILE_NAME).write_text(json.dumps(PROMPT_CONTRACT, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    contract = prompt.load_contract(out / prompt.FILE_NAME)  # as the worker will read it
    tokenizer = _exaone_tokenizer(base)
    spam_ids, ham_ids = check_labels(tokenizer, contract)
    torch.manual_seed(seed)
    model = load_exaone_native(base)
    lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=factories.LLAMA_TARGETS)
    model = get_peft_model(model, lora)
    input_ids, mask, target = _encode(tokenizer, contract, [e.text for e in train],
                                      [spam_ids if e.label == "spam" else ham_ids for e in train])

    def loss(idx: list[int]) -> torch.Tensor:
        width = int(mask[idx].sum(1).max())
        return label_loss(model, input_ids[idx, :width], mask[idx, :width], target[idx, :width])

    _fit(model, _epochs(len(train), batch_size, epochs, seed), loss, lr, epochs * -(-len(train) // batch_size))
    save_remote_adapter(model, out, base)
    return out


def label_loss(peft_model, input_ids, mask, target) -> torch.Tensor:
    """Cross-entropy of the label tokens alone (teacher-forced), what the EXAONE adapters train on."""
    logits, gold = _label_logits(peft_model, input_ids, mask, target)
    return torch.nn.functional.cross_entropy(logits, gold)


def _label_logits(peft_model, input_ids, mask, target):
    """Next-token logits at the positions that predict a label token, and those tokens (the LM head
    applied there only: the rest of the sequence needs no vocabulary-sized output)."""
    inner = peft_model.get_base_model()
    hidden = inner.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    gold = target[:, 1:]
    keep = gold != -100
    return inner.lm_head(hidden[keep]).float(), gold[keep]


def save_remote_adapter(peft_model, out: Path, base: Path) -> None:
    """Save as a LoRA trained on EXAONE's remote code is saved: remote names in keys and targets."""
    peft_model.save_pretrained(out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({factories._to_exaone_key(k): v for k, v in tensors.items()}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_modules"] = sorted(factories.EXAONE_TARGETS)
    config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))


@torch.inference_mode()
def exaone_scores(base: Path, adapter: Path, texts: list[str], batch_size: int = 32) -> list[float]:
    """P(spam label) / (P(spam label) + P(ham label)), each label's probability the product of its
    tokens' teacher-forced probabilities after the prompt (the worker's contract scoring)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict

    contract = prompt.find_contract(adapter, None)
    tokenizer = _exaone_tokenizer(base)
    spam_ids, ham_ids = contract.label_ids(tokenizer)
    config = json.loads((adapter / "adapter_config.json").read_text())
    model = get_peft_model(load_exaone_native(base), LoraConfig(
        task_type="CAUSAL_LM", r=config["r"], lora_alpha=config["lora_alpha"],
        target_modules=exaone_layout.rename_modules(config["target_modules"])))
    tensors = {exaone_layout.rename_key(k): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    set_peft_model_state_dict(model, tensors)
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        logp = []
        for label in (spam_ids, ham_ids):
            input_ids, mask, target = _encode(tokenizer, contract, chunk, [label] * len(chunk))
            logits, gold = _label_logits(model, input_ids, mask, target)
            token_logp = torch.log_softmax(logits, -1).gather(-1, gold.unsqueeze(-1)).view(len(chunk), len(label))
            logp.append(token_logp.sum(1))
        out += torch.sigmoid(logp[0] - logp[1]).tolist()
    return out


# --- everything -------------------------------------------------------------------------------------


def build(root: Path, seed: int = SEED) -> dict:
    """Data, base checkpoints and trained adapters under ``root``; returns held-out figures."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    train, heldout = demo_data.write(root / "data")
    # The tokenizers learn the training messages and the slot word lists (no labels), standing in
    # for the general text a published tokenizer is trained on.
    texts = [e.text for e in train] + demo_data.lexicon() * 3
    koelectra = factories.build_koelectra(root / "koelectra", vocab=wordpiece_vocab(texts), config=KOELECTRA_SIZES)
    # The EXAONE tokenizer also learns the prompt's words, so the labels become whole tokens.
    prompt_text = [PROMPT_CONTRACT["system"], PROMPT_CONTRACT["user"], *PROMPT_CONTRACT["labels"].values()]
    exaone = factories.build_exaone(root / "exaone", corpus=texts + prompt_text * 20, vocab_size=EXAONE_VOCAB,
                                    config=EXAONE_SIZES)
    t0 = time.perf_counter()
    train_koelectra(koelectra, root / "koelectra-spam-lora", train, seed)
    t1 = time.perf_counter()
    train_exaone(exaone, root / "exaone-spam-lora", train, seed)
    t2 = time.perf_counter()
    metrics: dict = {"train": len(train), "heldout": len(heldout)}
    for name, base, score in (("koelectra", koelectra, koelectra_scores), ("exaone", exaone, exaone_scores)):
        scores = score(base, root / f"{name}-spam-lora", [e.text for e in heldout])
        metrics[f"{name}_f1"] = round(f1([e.label for e in heldout], scores), 4)
    metrics["seconds"] = {"build": round(t0 - started, 1), "koelectra": round(t1 - t0, 1),
                          "exaone": round(t2 - t1, 1), "check": round(time.perf_counter() - t2, 1),
                          "total": round(time.perf_counter() - started, 1)}
    (root / "data" / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def summary(m: dict) -> str:
    return (f"{m['train']} synthetic training messages; held-out F1 (spam class) koelectra "
            f"{m['koelectra_f1']:.3f}, exaone {m['exaone_f1']:.3f} on {m['heldout']} messages with unseen slot "
            f"values (synthetic data: the figures mean nothing about real spam); built in "
            f"{m['seconds']['total']:.0f}s")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo-models").resolve()
    m = build(target)
    _log(summary(m))
