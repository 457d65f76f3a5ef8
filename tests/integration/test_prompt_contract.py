"""Real workers read an EXAONE adapter through its prompt file and say which version decided."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.integration.helpers import client_for, wait_until_serving
from tests.prompt_reference import KOREAN, direct_scores
from worker.loading import get_loader
from worker.serving.prompt import FILE_NAME
from worker.settings import ModelSource, Settings

pytestmark = pytest.mark.integration

TEXTS = ["무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요", "내일 회의는 오후 3시에 시작합니다",
         "대출 승인 완료 010-1234-5678", "엄마 오늘 저녁 같이 먹어요", "See you at lunch tomorrow"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("prompt") / "korean.json"
    file.write_text(json.dumps(KOREAN, ensure_ascii=False))
    return file


def expected_version(models, prompt_file) -> str:
    settings = Settings.from_env({"DEVICE": "cpu", "TORCH_DTYPE": "float32", "MODEL_LOADER": "transformers",
                                  "EXAONE_PROMPT_FILE": str(prompt_file)}, dotenv=False)
    source = ModelSource("exaone", str(models.exaone), models.exaone_adapter, prompt_file)
    return get_loader(settings).load_model(source).version


def _built_snapshot(snapshots, timeout: float = 120):
    """The merged snapshot, once the builder a first start starts in the background has written it."""
    deadline = time.monotonic() + timeout
    while not (found := [p for p in snapshots.glob("exaone-*") if (p / "snapshot.json").is_file()
                         and "-base-" not in p.name]):
        assert time.monotonic() < deadline, "the merged snapshot was never built"
        time.sleep(0.5)
    return found[0]


def test_prompt_file_scores_and_versions_on_prefork_and_threads(worker_factory, models, prompt_file, tmp_path):
    """Multi-token labels sharing their first tokens: each worker's scores equal full forward passes
    of the merged weights, alone and in a batch; every process reports the same version."""
    snapshots = tmp_path / "snapshots"
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_PROMPT_FILE=str(prompt_file), SNAPSHOT_DIR=str(snapshots))
    version = expected_version(models, prompt_file)
    seen = {}
    for pool, concurrency in (("prefork", 2), ("threads", 4)):
        worker = worker_factory(env, pool=pool, concurrency=concurrency, name=f"prompt-{pool}")
        with client_for(worker) as client:
            wait_until_serving(worker, client)
            singles = [h.get(timeout=60) for h in [client.submit(t, model="exaone") for t in TEXTS]]
            batch = client.submit_batch(TEXTS, model="exaone").get(timeout=60)
            stats = client.app.control.inspect(timeout=2.0).stats() or {}
        merged = _built_snapshot(snapshots)
        expected = direct_scores(merged, models.exaone, KOREAN, TEXTS)
        assert [r["spam_score"] for r in singles] == pytest.approx(expected, abs=1e-4), pool
        assert [r["spam_score"] for r in batch] == pytest.approx(expected, abs=1e-4), pool
        assert {r["model_version"] for r in singles + batch} == {version}
        versions = {k: v for s in stats.values() for k, v in s.items() if k.endswith(".exaone.version")}
        assert len(versions) == concurrency if pool == "prefork" else 1, stats
        assert set(versions.values()) == {version}
        prompts = {v for s in stats.values() for k, v in s.items() if k.endswith(".exaone.prompt")}
        assert prompts == {str(prompt_file)}
        seen[pool] = singles
        worker.stop()
    assert [r["spam_score"] for r in seen["prefork"]] == pytest.approx([r["spam_score"] for r in seen["threads"]],
                                                                      abs=1e-6)


def test_a_bad_prompt_file_stops_start_up_naming_the_field(worker_factory, models, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(models.exaone_adapter, adapter)
    (adapter / FILE_NAME).write_text(json.dumps({**KOREAN, "user": "no placeholder"}))
    worker = worker_factory(models.env(EXAONE_ADAPTER_DIR=str(adapter)), pool="prefork", name="bad-prompt")
    assert worker.process.wait(timeout=180) == 1
    stop_lines = [x for x in worker.log().splitlines() if "stopping the worker" in x]
    assert len(stop_lines) == 1, worker.log()[-3000:]
    assert f"cannot load model 'exaone': prompt file '{adapter / FILE_NAME}': user: must contain {{text}} " \
           "exactly once" in stop_lines[0]
