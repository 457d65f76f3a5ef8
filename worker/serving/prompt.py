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
build exactly the prompts the worker will score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "spam_prompt.json"
PLACEHOLDER = "{text}"

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
        """The prompt text for one message, to be encoded without special tokens added."""
        user = self.user.replace(PLACEHOLDER, text)
        if not self.chat_template:
            return user
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + \
            [{"role": "user", "content": user}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.built_in:  # a base tokenizer without a template: the instruction as plain text
            return f"{self.system}\n\nMessage: {text}\nAnswer:"
        raise ValueError(f"{self.source}: chat_template is true but the tokenizer has no chat template")

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

    def canonical(self) -> str:
        """The contract as canonical JSON (what the model version hashes); the source is left out."""
        fields = {k: v for k, v in asdict(self).items() if k != "source"}
        return json.dumps(fields, sort_keys=True, ensure_ascii=False)


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
