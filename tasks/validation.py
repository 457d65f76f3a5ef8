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


# --- The internal tasks' arguments (sent worker to worker, but a message is a message) --------------


def check_offset(offset: object, max_items: int) -> int:
    """Where a chunk starts in its batch: a whole number below ``MAX_BATCH_ITEMS``."""
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < max_items:
        raise InvalidInput(f"offset must be a whole number from 0 to {max_items - 1} (MAX_BATCH_ITEMS), "
                           f"not {offset!r}")
    return offset


def check_score(score: object, version: object = "", precision: object = "") -> tuple[float, str, str]:
    """KoELECTRA's score, model_version and precision as an escalation carries them."""
    if not isinstance(score, int | float) or isinstance(score, bool) or not 0.0 <= score <= 1.0:
        raise InvalidInput(f"koelectra_score must be a number from 0 to 1, not {score!r}")
    if not isinstance(version, str) or len(version) > 64:
        raise InvalidInput(f"koelectra_version must be a string of at most 64 characters, not {version!r}")
    if not isinstance(precision, str) or len(precision) > 32:
        raise InvalidInput(f"koelectra_precision must be a string of at most 32 characters, not {precision!r}")
    return float(score), version, precision


def check_escalation(results: object, items: object,
                     max_items: int) -> list[tuple[int, object, float, str, str]]:
    """``escalate_batch``'s arguments: ``results`` holds ``None`` where an item of ``items``
    (``[index, text, koelectra_score, koelectra_version, koelectra_precision]``, the version or the
    precision absent from older workers) goes. The texts are left to the caller, which reports a bad
    one as that item's error."""
    if not isinstance(results, list) or not 0 < len(results) <= max_items:
        raise InvalidInput(f"results must be a list of 1 to {max_items} items (MAX_BATCH_ITEMS)")
    if any(r is not None and not isinstance(r, dict) for r in results):
        raise InvalidInput("results must hold result objects, or null where an escalated item goes")
    if not isinstance(items, list) or not items:
        raise InvalidInput("items must be a non-empty list of [index, text, koelectra_score, koelectra_version, "
                           "koelectra_precision]")
    checked = []
    for item in items:
        if not isinstance(item, list) or len(item) not in (3, 4, 5):
            raise InvalidInput(f"an escalated item must be [index, text, koelectra_score, koelectra_version, "
                               f"koelectra_precision], not {str(item)[:80]}")
        index, text, score, *named = item
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(results) \
                or results[index] is not None:
            raise InvalidInput(f"escalated item index {index!r} does not name an open slot of results")
        checked.append((index, text, *check_score(score, *named)))
    if len({index for index, *_ in checked}) != len(checked):
        raise InvalidInput("two escalated items name the same index")
    return checked


def check_chunks(chunks: object, chunk_ids: object, max_items: int) -> list[list[dict]]:
    """``join_chunks``' arguments: the chunks' result lists in input order, and their task ids."""
    if not isinstance(chunks, list) or not all(isinstance(c, list) for c in chunks):
        raise InvalidInput("chunks must be a list of result lists")
    if sum(len(c) for c in chunks) > max_items:
        raise InvalidInput(f"the chunks hold more than {max_items} results (MAX_BATCH_ITEMS)")
    if any(not isinstance(r, dict) for c in chunks for r in c):
        raise InvalidInput("a chunk must hold result objects")
    if not isinstance(chunk_ids, list | tuple) or not all(isinstance(i, str) and len(i) <= 64 for i in chunk_ids):
        raise InvalidInput("chunk_ids must be a list of task ids")
    return chunks
