"""Spam scores from a loaded model, one batched forward pass per chunk of texts.

Two heads: a sequence-classification head (KoELECTRA, or EXAONE with a ``SEQ_CLS`` adapter) and
an instruction prompt on a causal LM (EXAONE with a ``CAUSAL_LM`` adapter, or zero-shot), whose
score compares the next-token logits of the spam and ham label words: one forward pass, no
generation. Decoder inputs are right-padded and read at each text's last real token, so a text
gets the same positions, and so the same score, alone or in a batch.
"""

from __future__ import annotations

import logging

import torch

from worker.loading.base import LoadedModel
from worker.loading.plan import PROMPT
from worker.score import Score

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a spam filter for Korean text messages. Reply with one word: "
    "'spam' if the message is spam, advertising, phishing or fraud, otherwise 'ham'."
)
SPAM_WORD = "spam"
HAM_WORD = "ham"


class SpamClassifier:
    """Scores texts with one model; ``score`` keeps input order and sorts by length internally."""

    def __init__(self, loaded: LoadedModel, batch_size: int, max_tokens: int | None = None) -> None:
        self.name = loaded.name
        self.loaded = loaded
        self.batch_size = batch_size
        self.tokenizer = loaded.tokenizer
        self.device = loaded.placement.device
        window = _model_window(loaded)
        self.max_tokens = min(max_tokens, window) if max_tokens else window
        self.is_prompt = loaded.head == PROMPT
        # Tokens the instructions take (plus one for the cut), so a message can be fitted to the window.
        self._prompt_overhead = (
            len(self.tokenizer(self._prompt(""), add_special_tokens=False)["input_ids"]) + 1 if self.is_prompt else 0
        )
        if self.is_prompt and self._prompt_overhead >= self.max_tokens:
            raise ValueError(f"the prompt alone takes {self._prompt_overhead} tokens; EXAONE_MAX_TOKENS "
                             f"({self.max_tokens}) leaves no room for the message")
        self.spam_index = 0 if self.is_prompt else loaded.plan.spam_index
        if self.is_prompt:
            self.label_ids = list(_label_token_ids(self.tokenizer))
        inner = _unwrap(loaded.model)
        # Decoders are read at the last real token; encoders use their own pooling head.
        self.head = inner.lm_head if self.is_prompt else getattr(inner, "score", None)
        self.body = inner.model if self.head is not None else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward pass on a one-word input: reads every weight and builds the kernels, at the
        compute cost of a couple of tokens rather than a whole prompt."""
        self._forward(["."])

    @torch.inference_mode()
    def score(self, texts: list[str]) -> list[Score]:
        if self.is_prompt:
            inputs, truncated = zip(*(self._fit_prompt(t) for t in texts), strict=True)
        else:
            inputs, truncated = texts, self._encoder_truncation(texts)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        results: list[Score | None] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            probs = self._forward_splitting([inputs[i] for i in chunk])
            for i, p in zip(chunk, probs, strict=True):
                results[i] = Score(p, truncated[i]) if p is not None else \
                    Score(float("nan"), truncated[i], error="out of memory even as a batch of one")
        return results  # type: ignore[return-value]

    def _forward_splitting(self, texts: list[str]) -> list[float | None]:
        """On out-of-memory, retry the two halves; a text that fails alone gets None.

        The retry runs after the ``except`` block: inside it the live traceback keeps the failed
        pass's activations allocated, so ``empty_cache()`` could free nothing and the halves would
        fail too.
        """
        try:
            return self._forward(texts)
        except (torch.OutOfMemoryError, MemoryError):
            pass  # leave the handler first: that drops the traceback and the tensors it holds
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(texts) == 1:
            log.warning("%s: out of memory on a single text of %d characters", self.name, len(texts[0]))
            return [None]
        half = len(texts) // 2
        log.warning("%s: out of memory on a batch of %d; retrying as %d + %d", self.name, len(texts), half,
                    len(texts) - half)
        return self._forward_splitting(texts[:half]) + self._forward_splitting(texts[half:])

    def _forward(self, texts: list[str]) -> list[float]:
        enc = self.tokenizer(
            texts, add_special_tokens=not self.is_prompt, truncation=not self.is_prompt,
            max_length=None if self.is_prompt else self.max_tokens, padding=True, return_tensors="pt",
        ).to(self.device)
        if self.head is not None:
            hidden = self.body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            last = enc["attention_mask"].sum(dim=1) - 1
            logits = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
            if self.is_prompt:
                logits = logits[:, self.label_ids]
        else:
            logits = self.loaded.model(**enc).logits
        return torch.softmax(logits.float(), dim=-1)[:, self.spam_index].tolist()

    def _encoder_truncation(self, texts: list[str]) -> list[bool]:
        lengths = self.tokenizer(texts, add_special_tokens=True, return_length=True)["length"]
        return [n > self.max_tokens for n in lengths]

    def _fit_prompt(self, text: str) -> tuple[str, bool]:
        """The prompt for ``text``, cutting the message (never the instructions) to fit the window."""
        budget = self.max_tokens - self._prompt_overhead
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return self._prompt(text), False
        return self._prompt(self.tokenizer.decode(ids[:budget])), True

    def _prompt(self, text: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{SYSTEM_PROMPT}\n\nMessage: {text}\nAnswer:"


def _model_window(loaded: LoadedModel) -> int:
    limits = [getattr(loaded.model.config, "max_position_embeddings", None), loaded.tokenizer.model_max_length]
    return min(int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000)


def _label_token_ids(tokenizer) -> tuple[int, int]:
    """First token of each label word as the model would generate it right after the prompt."""
    ids = []
    for word in (SPAM_WORD, HAM_WORD):
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"the tokenizer encodes the label word {word!r} as nothing")
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ValueError(f"label words {SPAM_WORD!r} and {HAM_WORD!r} start with the same token")
    return ids[0], ids[1]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
