"""The prompt contract of an EXAONE adapter: the file, whole-label scoring, and the model version."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests import factories
from tests.prompt_reference import KOREAN, direct_scores
from worker.errors import ModelLoadError
from worker.loading import get_loader
from worker.serving.classifiers import SpamClassifier, plan_passes
from worker.serving.prompt import BUILT_IN, FILE_NAME, PromptFileError, find_contract, load_contract
from worker.settings import ModelSource, Settings

SETTINGS = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "MODEL_LOADER": "transformers"},
                             dotenv=False)
TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다", "See you " * 20, "a"]


def write(folder: Path, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / FILE_NAME
    file.write_text(json.dumps(data, ensure_ascii=False))
    return file


# --- the file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "field"), [
    ({**KOREAN, "user": "no placeholder"}, "user"),
    ({**KOREAN, "user": "{text} twice {text}"}, "user"),
    ({**KOREAN, "labels": {"spam": "스팸", "ham": ""}}, "labels.ham"),
    ({**KOREAN, "labels": {"spam": "x", "ham": "x"}}, "labels"),
    ({**KOREAN, "labels": {"spam": "x"}}, "labels.ham"),
    ({**KOREAN, "labels": ["spam", "ham"]}, "labels"),
    ({**KOREAN, "system": 3}, "system"),
    ({**KOREAN, "chat_template": "yes"}, "chat_template"),
    ({**KOREAN, "chat_template": False}, "system"),
    ({**KOREAN, "temperature": 0}, "temperature"),
    ([1, 2], "file"),
])
def test_a_bad_prompt_file_names_the_file_and_the_field(tmp_path, data, field):
    file = write(tmp_path, data)
    with pytest.raises(PromptFileError) as info:
        load_contract(file)
    assert info.value.field == field
    assert str(info.value).startswith(f"prompt file '{file}': {field}: ")


def test_the_override_wins_over_the_adapter_file_and_built_in_is_the_default(tmp_path):
    adapter = tmp_path / "adapter"
    write(adapter, KOREAN)
    other = write(tmp_path / "other", {"user": "{text}", "labels": {"spam": "예", "ham": "아니오"},
                                       "chat_template": False})
    assert find_contract(None, None) is BUILT_IN
    assert find_contract(tmp_path, None) is BUILT_IN
    assert find_contract(adapter, None).spam == "스팸 맞음"
    assert find_contract(adapter, other).spam == "예"
    plain = load_contract(other)
    assert plain.system is None and plain.render(None, "안녕") == "안녕"


def test_a_bad_prompt_file_stops_the_load(models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    write(adapter, {**KOREAN, "labels": {"spam": "스팸 맞음", "ham": 7}})
    with pytest.raises(ModelLoadError, match=r"spam_prompt.json': labels.ham: must be a non-empty string"):
        get_loader(SETTINGS).load_model(ModelSource("exaone", str(models.exaone), adapter))


# --- which passes score the labels --------------------------------------------------------------------


def covered(passes) -> dict[int, list[tuple[list[int], int]]]:
    """For each label, the (context after the prompt, token) pairs the passes read."""
    out: dict[int, list] = {0: [], 1: []}
    for feed, reads in passes:
        for label, (offset, token) in reads:
            out[label].append((feed[:offset], token))
    return out


@pytest.mark.parametrize(("spam", "ham", "count"), [
    ([5], [6], 1),             # one token each: the prompt alone
    ([5, 7], [5, 8], 1),       # shared first token, diverging at the last
    ([5, 7, 9], [5, 8, 9], 2),  # diverging before the last token: the other needs its own pass
    ([5], [5, 8, 9], 1),       # one is a prefix of the other
    ([4, 7], [6], 1),
])
def test_every_label_token_is_read_after_exactly_its_own_prefix(spam, ham, count):
    passes = plan_passes(spam, ham)
    assert len(passes) == count
    got = covered(passes)
    assert got[0] == [(spam[:j], t) for j, t in enumerate(spam)]
    assert got[1] == [(ham[:j], t) for j, t in enumerate(ham)]


# --- scores against a direct computation ----------------------------------------------------------


@pytest.fixture(scope="module")
def korean_adapter(models, tmp_path_factory) -> Path:
    adapter = tmp_path_factory.mktemp("prompt") / "adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    write(adapter, KOREAN)
    return adapter


def test_korean_labels_are_several_tokens_sharing_the_first(models):
    tokenizer = AutoTokenizer.from_pretrained(models.exaone)
    spam, ham = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in KOREAN["labels"].values())
    assert len(spam) > 1 and len(ham) > 1 and spam[0] == ham[0] and spam != ham


def test_whole_label_scores_equal_a_direct_computation_alone_and_in_a_batch(models, korean_adapter, tmp_path):
    settings = replace(SETTINGS, model_loader="snapshot", snapshot_dir=str(tmp_path / "snapshots"))
    loaded = get_loader(settings).load_model(ModelSource("exaone", str(models.exaone), korean_adapter))
    classifier = SpamClassifier(loaded, batch_size=8)
    batched = [s.spam_score for s in classifier.score(TEXTS)]
    alone = [classifier.score([t])[0].spam_score for t in TEXTS]
    # The merged weights the worker serves (not the converted base beside them).
    snapshot = next(p for p in (tmp_path / "snapshots").glob("exaone-*") if p.is_dir() and "-base-" not in p.name)
    expected = direct_scores(snapshot, models.exaone, KOREAN, TEXTS)
    assert batched == pytest.approx(expected, abs=1e-4)
    assert alone == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 4) for s in batched)) == len(TEXTS)


def test_one_token_labels_score_as_the_next_token_softmax_of_the_two(models):
    """The built-in contract's spam/ham are one token each: the score is the softmax of their two
    logits after the prompt, as before whole-label scoring."""
    loaded = get_loader(SETTINGS).load_model(ModelSource("exaone", str(models.exaone), models.exaone_adapter))
    classifier = SpamClassifier(loaded, batch_size=8)
    tokenizer = loaded.tokenizer
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("spam", "ham")]
    assert [len(i) for i in ids] == [1, 1]
    expected = []
    for text in TEXTS:
        prompt = BUILT_IN.render(tokenizer, text)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])).logits
        expected.append(torch.softmax(logits[0, -1, [ids[0][0], ids[1][0]]].float(), dim=-1)[0].item())
    assert [s.spam_score for s in classifier.score(TEXTS)] == pytest.approx(expected, abs=1e-5)


# --- model_version ---------------------------------------------------------------------------------------


def version(models, adapter: Path, **settings) -> str:
    loaded = get_loader(replace(SETTINGS, **settings)).load_model(ModelSource("exaone", str(models.exaone), adapter))
    return loaded.version


def test_model_version_follows_the_files(models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    first = version(models, adapter)
    assert len(first) == 12 and int(first, 16) >= 0
    assert version(models, adapter) == first
    # The same files elsewhere, loaded another way: the same version.
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    assert version(models, copy, model_loader="snapshot", snapshot_dir=str(tmp_path / "snap")) == first

    write(adapter, KOREAN)
    with_prompt = version(models, adapter)
    assert with_prompt != first
    write(adapter, {**KOREAN, "user": "메시지 {text}"})
    assert version(models, adapter) not in (first, with_prompt)
    (adapter / FILE_NAME).unlink()
    assert version(models, adapter) == first

    factories.perturb_adapter_module(adapter, "h.0.attn.attention.q_proj", scale=1e-3)
    assert version(models, adapter) != first
