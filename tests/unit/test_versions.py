"""``model_version`` names everything that decides a score, by content: the same files named two
ways give one version, and a changed chat template, tokenizer file or EXAONE_MAX_TOKENS a new one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import pytest
from transformers import AutoTokenizer

from tests.prompt_reference import KOREAN
from worker.lifecycle.versions import model_version
from worker.loading import plan as planning
from worker.serving.prompt import FILE_NAME
from worker.settings import ModelSource, Settings

SETTINGS = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32"}, dotenv=False)


def version(name: str, model: Path | str, adapter: Path | None, **settings) -> str:
    chosen = replace(SETTINGS, **settings)
    return model_version(planning.resolve(ModelSource(name, str(model), adapter), chosen), chosen)


@pytest.fixture
def exaone(models, tmp_path) -> tuple[Path, Path]:
    """A copy of the test EXAONE base and its adapter with a prompt file, free to edit."""
    base, adapter = tmp_path / "exaone", tmp_path / "adapter"
    shutil.copytree(models.exaone, base)
    shutil.copytree(models.exaone_adapter, adapter)
    (adapter / FILE_NAME).write_text(json.dumps(KOREAN, ensure_ascii=False))
    return base, adapter


def test_a_changed_chat_template_changes_the_version(exaone):
    base, adapter = exaone
    before = version("exaone", base, adapter)
    jinja = base / "chat_template.jinja"
    template = jinja.read_text()
    assert "'\n'" in template
    jinja.write_text(template.replace("'\n'", "'\n\n'"))  # one more newline after each user turn
    changed = version("exaone", base, adapter)
    assert changed != before
    # The older layout: the template inside tokenizer_config.json.
    jinja.unlink()
    config = base / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    legacy = version("exaone", base, adapter)
    assert AutoTokenizer.from_pretrained(base).chat_template == template
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template + " "}))
    assert version("exaone", base, adapter) not in (before, changed, legacy)


def test_a_changed_tokenizer_file_changes_the_version(exaone, models):
    base, adapter = exaone
    before = version("exaone", base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["무료쿠폰"])  # a word that now encodes as one token
    tokenizer.save_pretrained(base)
    assert version("exaone", base, adapter) != before
    # A tokenizer that travels with the adapter is the one used, and is hashed.
    fresh = version("exaone", models.exaone, adapter)
    AutoTokenizer.from_pretrained(models.exaone).save_pretrained(adapter)
    assert version("exaone", models.exaone, adapter) != fresh


def test_exaone_max_tokens_changes_exaones_version_only(exaone, models):
    base, adapter = exaone
    assert version("exaone", base, adapter, exaone_max_tokens=256) != version("exaone", base, adapter)
    koelectra = ("koelectra", models.koelectra, models.koelectra_adapter)
    assert version(*koelectra, exaone_max_tokens=256) == version(*koelectra)


def test_identical_files_named_two_ways_have_one_version(exaone, tmp_path, monkeypatch):
    """A local folder, a copy of it elsewhere, and the same files in the Hub cache under an id."""
    base, adapter = exaone
    first = version("exaone", base, adapter)
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(base, elsewhere)
    other_adapter = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, other_adapter)
    assert version("exaone", elsewhere, other_adapter) == first

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-exaone"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    plan = planning.resolve(ModelSource("exaone", str(base), adapter), SETTINGS)
    assert model_version(replace(plan, model_id="acme/tiny-exaone"), SETTINGS) == first
    # Not in the cache: nothing to read, and not the version of the files.
    assert model_version(replace(plan, model_id="acme/elsewhere"), SETTINGS) != first
