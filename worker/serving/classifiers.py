"""Spam scores from a loaded model, one batched forward pass per chunk of texts.

Two heads: a sequence-classification head (KoELECTRA, or EXAONE with a ``SEQ_CLS`` adapter) and
an instruction prompt on a causal LM (EXAONE with a ``CAUSAL_LM`` adapter, or zero-shot), read the
way its adapter was trained (:mod:`worker.serving.prompt`): the score compares the probabilities of the
whole spam and ham answers, teacher-forced after the prompt, in one or two forward passes and
no generation. Decoder inputs are right-padded and read at each text's real positions, so a text
gets the same positions, and so the same score, alone or in a batch.

A message is always text: control strings in it (``[|endofturn|]``, ``[SEP]``) are encoded as
plain text, never as the tokens the template or the tokenizer's post-processor write. Scores are
summed in float32 whatever the process's default dtype (transformers changes it while a model
loads, in another thread), and a message too long for the window is cut on a token boundary
between characters, so the prompt never exceeds the window and never ends in half a syllable.
"""

from __future__ import annotations

import logging

import torch

from worker.loading.base import LoadedModel
from worker.loading.plan import PROMPT
from worker.serving.prompt import BUILT_IN
from worker.serving.score import Score

log = logging.getLogger(__name__)

class SpamClassifier:
    """Scores texts with one model; ``score`` keeps input order and sorts by length internally."""

    def __init__(self, loaded: LoadedModel, batch_size: int, max_tokens: int | None = None) -> None:
        self.name = loaded.name
        self.loaded = loaded
        self.version = loaded.version
        self.batch_size = batch_size
        self.tokenizer = loaded.tokenizer
        self.device = loaded.placement.device
        window = _model_window(loaded)
        self.max_tokens = min(max_tokens, window) if max_tokens else window
        self.is_prompt = loaded.head == PROMPT
        self.spam_index = loaded.plan.spam_index
        placement = loaded.placement
        self.precision = placement.precision
        """What every score says it was computed in: ``float32``, ``bfloat16``, ``nf4``, ..."""
        self._prompt_overhead = 0
        if self.is_prompt:
            self.contract = loaded.plan.prompt or BUILT_IN
            self.frame = self.contract.frame(self.tokenizer)
            spam, ham = self.contract.answer_ids(self.tokenizer)
            self.passes = plan_passes(spam, ham)
            # Tokens the instructions and the fed answer tokens take (plus one for the cut), so a
            # message can be fitted to the window.
            self._fed = max(len(feed) for feed, _ in self.passes)
            self._prompt_overhead = len(self.frame.ids(self.tokenizer, "")) + self._fed + 1
            if self._prompt_overhead >= self.max_tokens:
                raise ValueError(f"the prompt alone takes {self._prompt_overhead} tokens; EXAONE_MAX_TOKENS "
                                 f"({self.max_tokens}) leaves no room for the message")
        inner = _unwrap(loaded.model)
        # Decoders are read at the last real token; encoders use their own pooling head.
        self.head = inner.lm_head if self.is_prompt else getattr(inner, "score", None)
        self.body = inner.model if self.head is not None else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward pass on a one-word input: reads every weight and builds the kernels, at the
        compute cost of a couple of tokens rather than a whole prompt (on a 2.4B model on two CPU
        cores, 0.5 s rather than 10 s)."""
        self._forward([self.tokenizer(".", add_special_tokens=False)["input_ids"]] if self.is_prompt else ["."])

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
                results[i] = Score(p, truncated[i], version=self.version, precision=self.precision) if p is not None \
                    else Score(float("nan"), truncated[i], error="out of memory even as a batch of one")
        return results  # type: ignore[return-value]

    def _forward_splitting(self, texts: list) -> list[float | None]:
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
            log.warning("%s: out of memory on a single text of %d %s", self.name, len(texts[0]),
                        "tokens" if self.is_prompt else "characters")
            return [None]
        half = len(texts) // 2
        log.warning("%s: out of memory on a batch of %d; retrying as %d + %d", self.name, len(texts), half,
                    len(texts) - half)
        return self._forward_splitting(texts[:half]) + self._forward_splitting(texts[half:])

    def _forward(self, inputs: list) -> list[float]:
        """Spam probabilities of ``inputs``: prompt token ids (prompt head) or texts (classification head)."""
        if self.is_prompt:
            return self._label_scores(inputs)
        enc = self.tokenizer(inputs, truncation=True, max_length=self.max_tokens, padding=True, return_tensors="pt",
                             split_special_tokens=True).to(self.device)
        if self.head is not None:
            hidden = self.body(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            last = enc["attention_mask"].sum(dim=1) - 1
            logits = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            logits = self.loaded.model(**enc).logits
        return torch.softmax(logits.float(), dim=-1)[:, self.spam_index].tolist()

    def _label_scores(self, prompt_ids: list[list[int]]) -> list[float]:
        """P(spam) / (P(spam) + P(ham)), each answer's probability the product of its tokens' probabilities
        after the prompt, teacher-forced. One forward pass per entry of ``self.passes``. The sums are
        float32 by name: the default dtype is process-wide, and a load in another thread sets it."""
        logprobs = torch.zeros(2, len(prompt_ids), dtype=torch.float32)
        for feed, reads in self.passes:
            token_logprobs = self._continuation_logprobs(prompt_ids, feed)
            for label, (offset, token) in reads:
                logprobs[label] += token_logprobs[:, offset, token]
        return torch.sigmoid(logprobs[0] - logprobs[1]).tolist()

    def _continuation_logprobs(self, prompt_ids: list[list[int]], feed: list[int]) -> torch.Tensor:
        """Log-probabilities ``[text, j, vocab]`` of the token that follows prompt + ``feed[:j]``, for
        ``j`` in ``0..len(feed)``. Rows are right-padded, so a text sees the same positions alone or
        in a batch; the LM head runs only at the positions read."""
        rows = [ids + feed for ids in prompt_ids]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        first = torch.tensor([len(ids) - 1 for ids in prompt_ids], device=self.device)
        positions = first[:, None] + torch.arange(len(feed) + 1, device=self.device)[None, :]
        picked = hidden[torch.arange(len(rows), device=self.device)[:, None], positions]
        return torch.log_softmax(self.head(picked).float(), dim=-1).cpu()

    def _encoder_truncation(self, texts: list[str]) -> list[bool]:
        lengths = self.tokenizer(texts, add_special_tokens=True, return_length=True,
                                 split_special_tokens=True)["length"]
        return [n > self.max_tokens for n in lengths]

    def _fit_prompt(self, text: str) -> tuple[list[int], bool]:
        """The prompt's token ids for ``text``, and whether the message was cut to fit the window.

        The message (never the instructions) is cut in the text, where one of its tokens starts:
        never inside a character, so never half a syllable; the cut prompt is encoded again and
        cut shorter until it fits with the fed answer tokens.
        """
        budget = self.max_tokens - self._prompt_overhead
        alone = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                               return_offsets_mapping=True)
        ids = self.frame.ids(self.tokenizer, text)
        if len(alone["input_ids"]) <= budget and len(ids) + self._fed <= self.max_tokens:
            return ids, False
        starts = [start for start, _ in alone["offset_mapping"]]
        keep = min(budget, len(starts) - 1)
        while keep > 0:
            ids = self.frame.ids(self.tokenizer, text[:starts[keep]])
            over = len(ids) + self._fed - self.max_tokens
            if over <= 0:
                return ids, True
            keep -= over
        return self.frame.ids(self.tokenizer, ""), True


def _model_window(loaded: LoadedModel) -> int:
    limits = [getattr(loaded.model.config, "max_position_embeddings", None), loaded.tokenizer.model_max_length]
    return min(int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000)


Read = tuple[int, tuple[int, int]]
"""``(label, (offset, token))``: add the log-probability of ``token`` at ``offset`` of a pass to a
label's total (label 0 is spam, 1 is ham)."""


def plan_passes(spam: list[int], ham: list[int]) -> list[tuple[list[int], list[Read]]]:
    """Which label tokens to feed after the prompt, and which probabilities to read, so that both
    labels are scored teacher-forced in as few forward passes as possible.

    Feeding the longer label minus its last token gives the distribution after the prompt and
    after each of its prefixes; the other label is read from the same pass as far as it shares
    that prefix (one extra token past it), and needs a second pass only if it goes on beyond that.
    One-token labels need one pass over the prompt alone.
    """
    labels = {0: spam, 1: ham}
    first = 0 if len(spam) >= len(ham) else 1
    second = 1 - first
    shared = 0
    while shared < min(len(spam), len(ham)) and spam[shared] == ham[shared]:
        shared += 1
    feed = labels[first][:-1]
    reads: list[Read] = [(first, (j, t)) for j, t in enumerate(labels[first])]
    if len(labels[second]) - 1 <= min(shared, len(feed)):
        reads += [(second, (j, t)) for j, t in enumerate(labels[second])]
        return [(feed, reads)]
    return [(feed, reads), (labels[second][:-1], [(second, (j, t)) for j, t in enumerate(labels[second])])]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
