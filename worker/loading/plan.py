"""Decide what to load before loading it: config, model class, classification head, labels.

All of this comes from small JSON files and the adapter, so mistakes (a missing adapter, an adapter
for the wrong kind of model, a classifier nobody trained) surface before gigabytes are read.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

from worker.errors import ModelLoadError
from worker.loading import exaone_layout
from worker.loading.adapters import Adapter, read_adapter
from worker.serving.prompt import PromptContract, PromptFileError, find_contract
from worker.settings import ModelSource, Settings

log = logging.getLogger(__name__)

SEQUENCE = "sequence"
"""A classification head scores the text; the spam probability is one of its softmax outputs."""
PROMPT = "prompt"
"""A causal LM reads an instruction prompt; the spam probability compares two label words."""

# The last projection of a sequence-classification head, by architecture family.
_HEAD_WEIGHTS = ("classifier.out_proj.weight", "score.weight", "classifier.weight")
_SPAM_WORDS = ("spam", "스팸")


@dataclass(frozen=True)
class LoadPlan:
    name: str
    model_id: str
    config: PreTrainedConfig
    head: str
    adapter: Adapter | None
    labels: tuple[str, ...]
    spam_index: int
    trust_remote_code: bool
    prompt: PromptContract | None = None
    """The prompt and label words of a ``PROMPT`` head (:mod:`worker.serving.prompt`)."""

    @property
    def model_class(self) -> type:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            LlamaForSequenceClassification,
        )

        if self.head == PROMPT:
            return AutoModelForCausalLM
        if self.config.model_type == exaone_layout.MODEL_TYPE:
            return LlamaForSequenceClassification
        return AutoModelForSequenceClassification

    @property
    def tokenizer_source(self) -> str:
        if self.adapter is not None and (self.adapter.path / "tokenizer_config.json").is_file():
            return str(self.adapter.path)
        return self.model_id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_model_source(source: ModelSource) -> None:
    """A model is an existing local folder or a well-formed Hub id (``org/name``). Anything else (a
    path that is not there, a traversal, a URL) is refused here with a clear line instead of being
    handed to the Hub client as an id."""
    value = source.model
    if Path(value).is_dir():
        return
    if value.startswith(("/", ".", "~")) or ".." in value or not _HUB_ID.match(value):
        raise ModelLoadError(source.name, f"model {value!r} is neither an existing folder nor a Hub id (org/name)")


def resolve(source: ModelSource, settings: Settings) -> LoadPlan:
    check_model_source(source)
    trust = settings.trust_remote_code
    try:
        raw, _ = PreTrainedConfig.get_config_dict(source.model)
        config = AutoConfig.from_pretrained(source.model, trust_remote_code=trust)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(source.name, f"no usable config for {source.model!r}: {exc}") from exc
    if exaone_layout.is_exaone(raw):
        config.tie_word_embeddings = exaone_layout.tie_word_embeddings(raw)
    adapter = read_adapter(source.name, source.adapter_dir, raw) if source.adapter_dir is not None else None
    head = _head(source, raw, adapter)
    labels: tuple[str, ...] = ()
    spam_index = -1
    if head == SEQUENCE:
        labels = _labels(source, config, adapter)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        spam_index = _spam_index(source.name, labels)
    if config.pad_token_id is None and head == SEQUENCE:
        config.pad_token_id = getattr(config, "eos_token_id", None)
    return LoadPlan(source.name, source.model, config, head, adapter, labels, spam_index, trust,
                    _prompt_contract(source, head))


def _prompt_contract(source: ModelSource, head: str) -> PromptContract | None:
    """The contract a prompt head reads messages with; a bad file stops the load naming its field."""
    if head != PROMPT:
        if source.prompt_file is not None:
            log.warning("%s: the prompt file %s is ignored: the model has a classification head",
                        source.name, source.prompt_file)
        return None
    try:
        return find_contract(source.adapter_dir, source.prompt_file)
    except PromptFileError as exc:
        raise ModelLoadError(source.name, str(exc)) from None


def _head(source: ModelSource, raw: dict, adapter: Adapter | None) -> str:
    architectures = raw.get("architectures") or []
    if adapter is not None:
        if adapter.task_type == "SEQ_CLS":
            return SEQUENCE
        if adapter.task_type == "CAUSAL_LM" and any(a.endswith("ForCausalLM") for a in architectures):
            return PROMPT
        raise ModelLoadError(
            source.name, f"adapter task_type {adapter.task_type!r} does not fit {source.model!r} "
            f"({', '.join(architectures) or 'unknown architecture'}); expected SEQ_CLS or CAUSAL_LM"
        )
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return SEQUENCE
    if any(a.endswith("ForCausalLM") for a in architectures):
        return PROMPT  # zero-shot with the instruction prompt
    raise ModelLoadError(
        source.name, f"{source.model!r} has no trained classification head and no adapter was given "
        f"(set {source.name.upper()}_ADAPTER_DIR)"
    )


def _labels(source: ModelSource, config: PreTrainedConfig, adapter: Adapter | None) -> tuple[str, ...]:
    if adapter is None:
        return tuple(config.id2label[i] for i in range(config.num_labels))
    head = next((adapter.tensors[f"base_model.model.{k}"] for k in _HEAD_WEIGHTS
                 if f"base_model.model.{k}" in adapter.tensors), None)
    if head is None:
        raise ModelLoadError(
            source.name, f"SEQ_CLS adapter {str(adapter.path)!r} saves no classifier head "
            f"(modules_to_save should include it); the head would be left random"
        )
    num_labels = head.shape[0]
    id2label = _adapter_id2label(adapter.path) or {i: config.id2label.get(i, f"LABEL_{i}") for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise ModelLoadError(source.name, f"adapter labels {id2label} do not match its {num_labels}-way classifier")
    return tuple(str(id2label[i]) for i in range(num_labels))


def _adapter_id2label(path: Path) -> dict[int, str] | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    id2label = json.loads(file.read_text()).get("id2label")
    return {int(k): v for k, v in id2label.items()} if id2label else None


def _spam_index(name: str, labels: tuple[str, ...]) -> int:
    """The label whose name says spam; for unnamed binary labels, ``LABEL_1`` by convention."""
    named = [i for i, label in enumerate(labels) if any(w in label.lower() for w in _SPAM_WORDS)]
    if len(named) == 1:
        return named[0]
    if len(labels) == 2 and not named:
        log.info("%s labels %s name no spam class; treating index 1 as spam", name, list(labels))
        return 1
    raise ModelLoadError(name, f"cannot tell which of the labels {list(labels)} is spam")


def import_model_code(settings: Settings) -> None:
    """Import the transformers modules the configured models will use (seconds: they pull in
    torch.distributed and torch._dynamo). Called before the pool forks, so a prefork child starts
    with them instead of importing them on its first load. Best effort: a real problem surfaces
    when the model loads."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    modules = ["transformers.modeling_utils", "transformers.masking_utils", "transformers.generation.utils",
               "transformers.tokenization_utils_tokenizers"]
    for name in settings.preload_models:
        try:
            model_type = json.loads((Path(settings.source(name).model) / "config.json").read_text())["model_type"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        families = {model_type_to_module_name(model_type)}
        if model_type == exaone_layout.MODEL_TYPE:
            families.add("llama")  # its classification head is Llama's
        modules += [f"transformers.models.{f}.{kind}_{f}" for f in sorted(families)
                    for kind in ("configuration", "modeling")]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            log.debug("not preimported: %s (%s)", module, exc)


def load_tokenizer(plan: LoadPlan) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_source, trust_remote_code=plan.trust_remote_code)
    tokenizer.padding_side = "right"  # classifiers read the last real token by its index
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_files(model_id: str, use_safetensors: bool) -> list[Path]:
    """The checkpoint's weight files, from a local folder or the local Hub cache (never downloads)."""
    folder = Path(model_id)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached locally: no figure rather than a failed load
            return []
    for suffix in (".safetensors",) if use_safetensors else (".safetensors", ".bin"):
        index = folder / f"{'model' if suffix == '.safetensors' else 'pytorch_model'}{suffix}.index.json"
        if index.is_file():
            return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            return files
    return []
