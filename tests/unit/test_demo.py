"""The demo models: LoRA adapters trained on the synthetic spam/ham set, judged on its held-out split
through the worker's own loader and classifier, against untrained adapters on the same bases."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests import factories
from worker.loading import get_loader
from worker.serving.classifiers import SpamClassifier
from worker.serving.prompt import FILE_NAME, find_contract
from worker.settings import ModelSource, Settings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_data  # noqa: E402
import demo_models  # noqa: E402
import demo_train  # noqa: E402

SETTINGS = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "MODEL_LOADER": "transformers"},
                             dotenv=False)
MODELS = ("koelectra", "exaone")
# Building and training take well under a minute on two idle cores; a shared machine may be slower.
pytestmark = pytest.mark.timeout(900)


def heldout(root: Path) -> list[dict]:
    lines = (root / "data" / demo_data.HELDOUT_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def worker_scores(name: str, base: Path, adapter: Path, texts: list[str]) -> list[float]:
    loaded = get_loader(SETTINGS).load_model(ModelSource(name, str(base), adapter))
    return [s.spam_score for s in SpamClassifier(loaded, batch_size=32).score(texts)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_heldout_file_is_labeled_both_classes_and_disjoint_from_training(demo):
    rows = heldout(demo)
    assert {r["label"] for r in rows} == {"spam", "ham"}
    assert min(sum(r["label"] == c for r in rows) for c in ("spam", "ham")) >= 50
    train = {json.loads(line)["text"] for line in (demo / "data" / "train.jsonl").read_text().splitlines()}
    assert not train & {r["text"] for r in rows}
    csv_lines = (demo / "data" / "heldout.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0] == "text,label" and len(csv_lines) == len(rows) + 1


def test_data_is_deterministic():
    assert demo_data.build() == demo_data.build()
    assert demo_data.new_templates() == demo_data.new_templates()


def test_exaone_labels_are_multi_token_and_share_their_first_token(demo):
    from transformers import AutoTokenizer

    adapter = demo / "exaone-spam-lora"
    contract = find_contract(adapter, None)
    assert contract.source == str(adapter / FILE_NAME) and contract.chat_template
    spam, ham = contract.label_ids(AutoTokenizer.from_pretrained(demo / "exaone"))
    assert len(spam) >= 2 and len(ham) >= 2
    assert spam[0] == ham[0] and spam != ham


def test_koelectra_adapter_says_which_index_is_spam(demo):
    loaded = get_loader(SETTINGS).load_model(
        ModelSource("koelectra", str(demo / "koelectra"), demo / "koelectra-spam-lora"))
    assert loaded.plan.labels == ("ham", "spam") and loaded.plan.spam_index == 1


@pytest.mark.parametrize("name", MODELS)
def test_trained_adapters_reach_f1_090_on_the_heldout_split_through_the_worker(demo, name):
    rows = heldout(demo)
    scores = worker_scores(name, demo / name, demo / f"{name}-spam-lora", [r["text"] for r in rows])
    labels = [r["label"] for r in rows]
    assert demo_train.f1(labels, scores) >= 0.9
    # Spam near 1 and ham near 0 on average, not a threshold barely crossed.
    assert mean([s for s, lab in zip(scores, labels, strict=True) if lab == "spam"]) > 0.75
    assert mean([s for s, lab in zip(scores, labels, strict=True) if lab == "ham"]) < 0.25


@pytest.mark.parametrize("name", MODELS)
def test_untrained_adapters_do_not(demo, name, tmp_path):
    """Random-init adapters on the same bases: scores that do not tell the classes apart."""
    adapter = tmp_path / f"{name}-untrained"
    if name == "koelectra":
        factories.build_koelectra_adapter(adapter, demo / name, id2label={"0": "ham", "1": "spam"})
    else:
        factories.build_exaone_adapter(adapter, demo / name)
        shutil.copy(demo / "exaone-spam-lora" / FILE_NAME, adapter / FILE_NAME)
    rows = heldout(demo)
    scores = worker_scores(name, demo / name, adapter, [r["text"] for r in rows])
    labels = [r["label"] for r in rows]
    assert demo_train.f1(labels, scores) < 0.8
    gap = mean([s for s, lab in zip(scores, labels, strict=True) if lab == "spam"]) - \
        mean([s for s, lab in zip(scores, labels, strict=True) if lab == "ham"])
    assert abs(gap) < 0.2


def test_a_current_build_is_kept_and_exports_point_at_it(demo, capfd):
    assert not demo_models.ensure(demo)
    capfd.readouterr()
    demo_models.main(demo)
    out = capfd.readouterr().out.splitlines()
    assert out == [
        f"export KOELECTRA_MODEL={demo / 'koelectra'} KOELECTRA_ADAPTER_DIR={demo / 'koelectra-spam-lora'}",
        f"export EXAONE_MODEL={demo / 'exaone'} EXAONE_ADAPTER_DIR={demo / 'exaone-spam-lora'}",
        f"export DEMO_HELDOUT={demo / 'data' / 'heldout.jsonl'}",
    ]


def test_a_changed_recipe_rebuilds(tmp_path, monkeypatch):
    built = []

    def fake_build(root: Path) -> dict:
        built.append(root)
        for part in demo_models.PARTS:
            (root / part).mkdir(parents=True)
        return {"train": 1, "heldout": 1, "koelectra_f1": 1.0, "exaone_f1": 1.0, "seconds": {"total": 0.0}}

    monkeypatch.setattr(demo_train, "build", fake_build)
    assert demo_models.ensure(tmp_path) and not demo_models.ensure(tmp_path)
    (tmp_path / "data" / "stale").write_text("from the old recipe")
    (tmp_path / demo_models.STAMP).write_text("an older recipe\n")
    assert demo_models.ensure(tmp_path)
    assert len(built) == 2 and not (tmp_path / "data" / "stale").exists()
