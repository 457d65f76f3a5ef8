"""The demo as a user meets it: a real worker on the trained demo adapters, measured by ``evaluate``
on the held-out split (synthetic data: the figures show the service works, not how real spam goes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.integration.helpers import client_for, wait_until_serving

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_evaluate_on_the_heldout_split_shows_both_trained_adapters_at_f1_09(worker_factory, demo, tmp_path):
    env = {"KOELECTRA_MODEL": str(demo / "koelectra"), "KOELECTRA_ADAPTER_DIR": str(demo / "koelectra-spam-lora"),
           "EXAONE_MODEL": str(demo / "exaone"), "EXAONE_ADAPTER_DIR": str(demo / "exaone-spam-lora"),
           "DEVICE": "cpu", "SNAPSHOT_DIR": str(tmp_path / "snapshots"), "HF_HUB_OFFLINE": "1"}
    worker = worker_factory(env, pool="threads", concurrency=8, name="demo")
    with client_for(worker) as client:
        wait_until_serving(worker, client)
        spam = client.classify("[광고] 최저가 대출 한도 조회! 지금 바로 클릭하세요", model="exaone")
    assert spam["label"] == "spam", spam
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "producer", "evaluate", str(demo / "data" / "heldout.jsonl"),
                          "--out", str(out), "--model", "all", "--no-progress"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "CELERY_BROKER_URL": worker.broker_url,
                              "CELERY_RESULT_BACKEND": worker.backend_url})
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    rows = (demo / "data" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    for name in ("koelectra", "exaone"):
        model = report["models"][name]
        assert model["n"] == len(rows) and model["errors"] == 0
        assert model["f1"] >= 0.9, (name, model)
        assert isinstance(model["model_version"], str) and len(model["model_version"]) == 12
    assert report["cascade"]["configured"]["f1"] >= 0.9
