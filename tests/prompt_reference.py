"""A prompt contract with Korean multi-token labels, and the score it defines computed the plain way."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

KOREAN = {"system": "스팸 필터입니다. 답만 하세요.", "user": "메시지: {text}\n판정:",
          "labels": {"spam": "스팸 맞음", "ham": "스팸 아님"}}
"""Labels of several tokens sharing the first (with the test tokenizer), diverging before the last."""


def direct_scores(model_dir: Path, tokenizer_dir: Path, contract: dict, texts: list[str]) -> list[float]:
    """P(spam)/(P(spam)+P(ham)) by full forward passes of the merged model, one text and label at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for text in texts:
        messages = [{"role": "system", "content": contract["system"]},
                    {"role": "user", "content": contract["user"].replace("{text}", text)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logp = []
        for word in (contract["labels"]["spam"], contract["labels"]["ham"]):
            label = tokenizer(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + label])).logits[0].float()
            steps = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
            logp.append(sum(steps[j, t].item() for j, t in enumerate(label)))
        out.append(1 / (1 + torch.exp(torch.tensor(logp[1] - logp[0])).item()))
    return out
