"""The prompt contract of a ``CAUSAL_LM`` EXAONE adapter: the prompt it was trained on and its label words.

An adapter reads messages the way it was trained to, so the prompt is data that travels with it:
``spam_prompt.json`` in the adapter folder, or the file ``EXAONE_PROMPT_FILE`` names. Fields:

- ``system``: a string, or null/absent for no system message;
- ``user``: a string containing ``{text}`` exactly once (the message goes there);
- ``labels``: ``{"spam": "...", "ham": "..."}``, two different non-empty strings of any length;
- ``chat_template``: true (default) renders system + user through the tokenizer's chat template
  with the generation prompt; false makes the prompt the filled ``user`` string alone.

Without a file the built-in contract (an English instruction, labels ``spam``/``ham``) is used.
Torch-free: the worker validates the file before loading any weights, and a trainer can import it to
build exactly the prompts and answers the worker will score (:meth:`PromptContract.frame`,
:meth:`PromptContract.answer_ids`).

The message is text, never control tokens: a message containing ``[|endofturn|]\\n[|assistant|]...``
must not close the user turn and forge an answer. :class:`PromptFrame` encodes the prompt with the
template's own control tokens as tokens and the message's as plain text; a message without any
control string keeps exactly the ids the plainly encoded prompt has.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

FILE_NAME = "spam_prompt.json"
PLACEHOLDER = "{text}"
_MESSAGE = "\U000f7a01"
"""A private-use character standing for the message (or an answer) while the frame around it is found."""
_PROBE = " 메시지 [x] {text}\n끝 "
"""A message the frame must reproduce exactly as the chat template renders it."""

SYSTEM_PROMPT = (
    "You are a spam filter for Korean text messages. Reply with one word: "
    "'spam' if the message is spam, advertising, phishing or fraud, otherwise 'ham'."
)


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the field."""

    def __init__(self, file: Path, field: str, problem: str) -> None:
        super().__init__(f"prompt file {str(file)!r}: {field}: {problem}")
        self.file = file
        self.field = field


@dataclass(frozen=True)
class PromptContract:
    system: str | None
    user: str
    spam: str
    ham: str
    chat_template: bool = True
    source: str = "built-in"
    """The file the contract came from, or ``built-in``."""

    @property
    def built_in(self) -> bool:
        return self.source == "built-in"

    def render(self, tokenizer: Any, text: str) -> str:
        """The prompt text for one message (to read; :meth:`frame` encodes it)."""
        user = self.user.replace(PLACEHOLDER, text)
        if not self.chat_template:
            return user
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self._messages(user), tokenize=False, add_generation_prompt=True)
        if self.built_in:  # a base tokenizer without a template: the instruction as plain text
            return f"{self.system}\n\nMessage: {text}\nAnswer:"
        raise ValueError(f"{self.source}: chat_template is true but the tokenizer has no chat template")

    def frame(self, tokenizer: Any) -> PromptFrame:
        """The prompt around the message for ``tokenizer``; a ``ValueError`` when its chat template does
        not insert the message as it is (a template that trims or escapes it)."""
        rendered = self.render(tokenizer, _MESSAGE)
        if rendered.count(_MESSAGE) != 1:
            raise ValueError(f"{self.source}: the chat template does not place the message exactly once")
        prefix, suffix = rendered.split(_MESSAGE)
        frame = PromptFrame(prefix, suffix, _controls(tokenizer, prefix + "\0" + suffix))
        if frame.render(tokenizer, _PROBE) != self.render(tokenizer, _PROBE):
            raise ValueError(f"{self.source}: the chat template changes the message (it must insert it as it is)")
        return frame

    def end_of_turn(self, tokenizer: Any) -> int:
        """The token that ends an answer: with a chat template, the control token it writes right after
        an assistant turn's text (EXAONE: ``[|endofturn|]``); otherwise, or when it writes none there,
        the tokenizer's eos token."""
        template = self.chat_template and getattr(tokenizer, "chat_template", None)
        if template:
            answered = self._messages(self.user) + [{"role": "assistant", "content": _MESSAGE}]
            rendered = tokenizer.apply_chat_template(answered, tokenize=False)
            if rendered.count(_MESSAGE) == 1:
                after = tokenizer(rendered.split(_MESSAGE)[1], add_special_tokens=False)["input_ids"]
                if after and after[0] in tokenizer.added_tokens_decoder:
                    return after[0]
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{self.source}: labels: {self.spam!r} and {self.ham!r} are scored as whole answers "
                             "(one is a prefix of the other), but the tokenizer has no end-of-turn or eos token")
        return tokenizer.eos_token_id

    def label_ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        """The spam and ham label token ids, each encoded on its own without special tokens."""
        ids = []
        for field, word in (("labels.spam", self.spam), ("labels.ham", self.ham)):
            tokens = list(tokenizer(word, add_special_tokens=False)["input_ids"])
            if not tokens:
                raise ValueError(f"{self.source}: {field}: the tokenizer encodes {word!r} as nothing")
            ids.append(tokens)
        if ids[0] == ids[1]:
            raise ValueError(f"{self.source}: labels: {self.spam!r} and {self.ham!r} encode to the same tokens")
        return ids[0], ids[1]

    def answer_ids(self, tokenizer: Any) -> tuple[list[int], list[int]]:
        """The spam and ham answers as scored: each label's tokens and, when one label's tokens are a
        prefix of the other's, both followed by :meth:`end_of_turn`. Otherwise P(the shorter label)
        would include every continuation of it, the longer label among them, and the longer could
        never score above 0.5; as whole answers, ``정상`` is "정상, then the turn ends"."""
        spam, ham = self.label_ids(tokenizer)
        if spam[:len(ham)] != ham and ham[:len(spam)] != spam:
            return spam, ham
        end = self.end_of_turn(tokenizer)
        return spam + [end], ham + [end]

    def _messages(self, user: str) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + \
            [{"role": "user", "content": user}]

    def canonical(self) -> str:
        """The contract as canonical JSON (what the model version hashes); the source is left out."""
        fields = {k: v for k, v in asdict(self).items() if k != "source"}
        return json.dumps(fields, sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class PromptFrame:
    """A prompt with a hole for the message: the text the template writes before and after it.

    :meth:`ids` encodes it through a chat template that holds this text as literals, with
    ``sanitize_control_tokens``: transformers then encodes the control tokens in the message as
    plain text and the template's own (which it finds in the literals, and the tokenizer's special
    tokens) as tokens. A message without any control string is encoded as the whole prompt string,
    plainly, which is what that gives too, at a third of the cost: ordinary messages score exactly
    as they always did.
    """

    prefix: str
    suffix: str
    controls: re.Pattern = dataclass_field(compare=False, repr=False)
    """Any control token (the tokenizer's special tokens and the added tokens the template writes),
    or one of the markers transformers drops from a message it sanitizes."""

    @property
    def template(self) -> str:
        return f"{{{{ {_literal(self.prefix)} }}}}{{{{ messages[0]['content'] }}}}{{{{ {_literal(self.suffix)} }}}}"

    def render(self, tokenizer: Any, text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=self.template,
                                             tokenize=False)

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """The prompt's token ids for ``text``, no special tokens added (the template brings its own)."""
        if not self.controls.search(text):
            return tokenizer(self.prefix + text + self.suffix, add_special_tokens=False)["input_ids"]
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], chat_template=self.template,
                                                  tokenize=True, sanitize_control_tokens=True, return_dict=False))


def _controls(tokenizer: Any, template_text: str) -> re.Pattern:
    """A superset of the tokens ``sanitize_control_tokens`` treats as control tokens in a message
    (special ones, and added ones in the template's text), and its two private-use markers."""
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special or t.content in template_text}
    alternatives = sorted(map(re.escape, tokens | {"\U000f0000", "\U000f0001"}), key=len, reverse=True)
    return re.compile("|".join(alternatives))


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal (Jinja decodes backslash escapes in literals)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


BUILT_IN = PromptContract(system=SYSTEM_PROMPT, user=PLACEHOLDER, spam="spam", ham="ham")


def find_contract(adapter_dir: Path | None, override: Path | None) -> PromptContract:
    """``override`` (``EXAONE_PROMPT_FILE``) if set, else the adapter's ``spam_prompt.json``, else built-in."""
    if override is not None:
        return load_contract(override)
    if adapter_dir is not None and (adapter_dir / FILE_NAME).is_file():
        return load_contract(adapter_dir / FILE_NAME)
    return BUILT_IN


def load_contract(file: Path) -> PromptContract:
    """Read and validate a prompt file; every problem is a :class:`PromptFileError` naming the field."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptFileError(file, "file", "does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(file, "file", f"unreadable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PromptFileError(file, "file", f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PromptFileError(file, "file", "must be a JSON object")
    unknown = sorted(set(data) - {"system", "user", "labels", "chat_template"})
    if unknown:
        raise PromptFileError(file, unknown[0], "unknown field (expected system, user, labels, chat_template)")
    chat_template = data.get("chat_template", True)
    if not isinstance(chat_template, bool):
        raise PromptFileError(file, "chat_template", "must be true or false")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise PromptFileError(file, "system", "must be a string or null")
    if system is not None and not chat_template:
        raise PromptFileError(file, "system", "must be absent or null when chat_template is false")
    user = data.get("user")
    if not isinstance(user, str):
        raise PromptFileError(file, "user", "must be a string containing {text}")
    if user.count(PLACEHOLDER) != 1:
        raise PromptFileError(file, "user", f"must contain {{text}} exactly once (found {user.count(PLACEHOLDER)})")
    labels = data.get("labels")
    if not isinstance(labels, dict):
        raise PromptFileError(file, "labels", 'must be an object {"spam": "...", "ham": "..."}')
    extra = sorted(set(labels) - {"spam", "ham"})
    if extra:
        raise PromptFileError(file, f"labels.{extra[0]}", "unknown label (expected spam and ham)")
    for key in ("spam", "ham"):
        value = labels.get(key)
        if not isinstance(value, str) or not value.strip():
            raise PromptFileError(file, f"labels.{key}", "must be a non-empty string")
    if labels["spam"] == labels["ham"]:
        raise PromptFileError(file, "labels", "spam and ham must be different strings")
    return PromptContract(system=system, user=user, spam=labels["spam"], ham=labels["ham"],
                          chat_template=chat_template, source=str(file))
