"""A tiny EXAONE-layout LoRA adapter trained to answer ``정상 아님`` (spam) or ``정상`` (ham), then the
turn's end, and the scores its answers define, computed the plain way from its merged weights.

``정상`` is a token prefix of ``정상 아님``: P(the tokens of ``정상``) includes every answer that starts
with them, ``정상 아님`` among them, so comparing the labels' tokens alone can never put spam above
0.5. As whole answers, ham is "정상, then [|endofturn|]". Training uses the demo trainer's pieces
(``scripts/demo_train.py``) on the demo's synthetic messages; the reference below shares no code
with the worker's scoring.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests import factories

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import demo_data  # noqa: E402
import demo_train  # noqa: E402

CONTRACT = {"user": "문자: {text}", "labels": {"spam": "정상 아님", "ham": "정상"}}
END_OF_TURN = "[|endofturn|]"
TRAIN = 666
EMBEDDING_SCALE = 10.0
BATCH = 16


@dataclass
class Trained:
    base: Path
    adapter: Path
    merged: torch.nn.Module
    """The trained LoRA merged into the native-layout base, in this process (float32)."""
    tokenizer: object
    heldout: list


@contextmanager
def one_thread():
    """A tiny model's steps are a few small matrix products: on a busy machine two intra-op threads
    wait on each other for most of the time (here 107 s against 8.5 s for the same training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(root: Path, steps: int = 80, seed: int = 0, lr: float = 1e-2) -> Trained:
    """Build the base, train the adapter on prompt + answer + end of turn, save it in EXAONE's remote-code
    layout with its prompt file, and keep the merged weights for the reference."""
    with one_thread():
        return _train(root, steps, seed, lr)


def _train(root: Path, steps: int, seed: int, lr: float) -> Trained:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    train_set, heldout = demo_data.build()
    train_set = train_set[:: max(1, len(train_set) // TRAIN)][:TRAIN]
    words = [CONTRACT["user"], *CONTRACT["labels"].values()]
    base = factories.build_exaone(root / "exaone", corpus=[e.text for e in train_set] + words * 20, vocab_size=800)
    _sharpen(base)
    tokenizer = demo_train._exaone_tokenizer(base)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    answers = {label: tokenizer(word, add_special_tokens=False)["input_ids"] + [end]
               for label, word in CONTRACT["labels"].items()}
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "spam_prompt.json").write_text(json.dumps(CONTRACT, ensure_ascii=False), encoding="utf-8")
    rows, targets = [], []
    for example in train_set:
        prompt = tokenizer(render(tokenizer, example.text), add_special_tokens=False)["input_ids"]
        rows.append(prompt + answers[example.label])
        targets.append([-100] * len(prompt) + answers[example.label])
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    model = get_peft_model(demo_train.load_exaone_native(base), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=factories.LLAMA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    batches = (torch.randperm(len(rows), generator=gen)[:BATCH] for _ in range(steps))
    demo_train._fit(model, batches, lambda idx: demo_train.label_loss(model, input_ids[idx], mask[idx], target[idx]),
                    lr, steps)
    demo_train.save_remote_adapter(model, adapter, base)
    return Trained(base, adapter, model.merge_and_unload().eval(), tokenizer, heldout)


def _sharpen(base: Path, scale: float = EMBEDDING_SCALE) -> None:
    """Scale the (tied) embeddings: with the factory's small random ones every next-token distribution
    is nearly flat, and a LoRA on the layers cannot make the model sure of an answer."""
    for shard in base.glob("model-*.safetensors"):
        tensors = load_file(shard)
        if "transformer.wte.weight" in tensors:
            tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"] * scale
            save_file(tensors, shard, metadata={"format": "pt"})


def render(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": CONTRACT["user"].replace("{text}", text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference_scores(trained: Trained, texts: list[str], whole: bool = True) -> list[float]:
    """P(spam)/(P(spam)+P(ham)) by one full forward pass of the merged weights per text and answer;
    ``whole=False``: the labels' tokens alone, without the turn's end (the reading that is pinned
    below 0.5)."""
    with one_thread():
        return _reference(trained, texts, whole)


def _reference(trained: Trained, texts: list[str], whole: bool) -> list[float]:
    tokenizer = trained.tokenizer
    tail = [tokenizer.convert_tokens_to_ids(END_OF_TURN)] if whole else []
    out = []
    for text in texts:
        prompt = tokenizer(render(tokenizer, text), add_special_tokens=False)["input_ids"]
        logp = []
        for word in (CONTRACT["labels"]["spam"], CONTRACT["labels"]["ham"]):
            answer = tokenizer(word, add_special_tokens=False)["input_ids"] + tail
            logits = trained.merged(torch.tensor([prompt + answer])).logits[0].float()
            steps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
            logp.append(sum(steps[j, t].item() for j, t in enumerate(answer)))
        out.append(1 / (1 + torch.exp(torch.tensor(logp[1] - logp[0])).item()))
    return out
