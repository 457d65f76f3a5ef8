"""A trained adapter whose labels share a prefix, scored as whole answers by real workers, and each
result, stats entry and metric saying the precision it was computed in."""

from __future__ import annotations

import urllib.request

import pytest

from tests import prefix_adapter
from tests.conftest import free_port
from tests.integration.helpers import client_for, serving_figures, wait_for_snapshots, wait_until_serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return prefix_adapter.train(tmp_path_factory.mktemp("prefix-adapter"))


def _info_samples(port: int) -> dict[tuple[str, str, str], float]:
    """``spam_model_info`` samples of the worker's Prometheus endpoint as {(model, precision, pid): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.labels["model"], s.labels.get("precision", ""), s.labels["pid"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "spam_model_info"
            for s in family.samples if s.value == 1}


def test_prefix_labels_score_as_whole_answers_on_prefork_and_threads(worker_factory, models, trained, tmp_path):
    """``정상 아님`` (spam) / ``정상`` (ham): comparing the labels' tokens alone keeps every message below
    0.5; the workers score the answers ending the turn, as full forward passes of the merged weights do."""
    examples = trained.heldout[:8]
    texts = [e.text for e in examples]
    expected = prefix_adapter.reference_scores(trained, texts)
    labels_alone = prefix_adapter.reference_scores(trained, texts, whole=False)
    assert max(labels_alone) < 0.5  # the pinned reading: nothing is ever spam
    assert any(s >= 0.5 for s, e in zip(expected, examples, strict=True) if e.label == "spam")

    metrics_port = free_port()
    env = models.env(PRELOAD_MODELS="exaone", EXAONE_MODEL=str(trained.base), EXAONE_ADAPTER_DIR=str(trained.adapter),
                     SNAPSHOT_DIR=str(tmp_path / "snapshots"))
    seen = {}
    for pool, concurrency in (("prefork", 2), ("threads", 4)):
        extra = {"METRICS_PORT": str(metrics_port)} if pool == "prefork" else {}
        worker = worker_factory({**env, **extra}, pool=pool, concurrency=concurrency, name=f"prefix-{pool}")
        with client_for(worker) as client:
            wait_until_serving(worker, client)
            wait_for_snapshots(client, concurrency if pool == "prefork" else 1)  # each pool's scores from one path
            singles = [h.get(timeout=60) for h in [client.submit(t, model="exaone") for t in texts]]
            batch = client.submit_batch(texts, model="exaone").get(timeout=60)
            precisions = {pid: figures["exaone"] for pid, figures in serving_figures(client, "precision").items()}
        for results in (singles, batch):
            assert [r["spam_score"] for r in results] == pytest.approx(expected, abs=1e-4), pool
            assert [r["label"] for r in results] == ["spam" if s >= 0.5 else "ham" for s in expected]
            assert {r["precision"] for r in results} == {"float32"}
        (version,) = {r["model_version"] for r in singles + batch}
        assert set(precisions.values()) == {"float32"} and len(precisions) == (concurrency if pool == "prefork" else 1)
        if pool == "prefork":
            info = _info_samples(metrics_port)
            assert {("exaone", "float32", str(pid)) for pid in precisions} <= set(info), info
        seen[pool] = (version, [r["spam_score"] for r in singles])
        worker.stop()
    assert seen["prefork"][0] == seen["threads"][0]
    assert seen["prefork"][1] == pytest.approx(seen["threads"][1], abs=1e-6)
