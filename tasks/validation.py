"""Payload checks, shared by the single and batch tasks. Torch-free."""

from __future__ import annotations

from producer.contract import MODELS, InvalidInput


def check_model(model: object) -> str:
    if not isinstance(model, str) or model.lower() not in MODELS:
        raise InvalidInput(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    return model.lower()


def check_text(text: object, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InvalidInput(f"text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("text is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"text has {len(text)} characters; the limit is {max_chars} (MAX_TEXT_CHARS)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("text is not valid Unicode (it contains lone surrogates)") from None
    return text


def check_texts(texts: object, max_items: int) -> list:
    if not isinstance(texts, list):
        raise InvalidInput(f"texts must be a list of strings, not {type(texts).__name__}")
    if not texts:
        raise InvalidInput("texts is empty")
    if len(texts) > max_items:
        raise InvalidInput(f"batch has {len(texts)} texts; the limit is {max_items} (MAX_BATCH_ITEMS)")
    return texts
