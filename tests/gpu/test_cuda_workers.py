"""Real CUDA workers answering through Redis (bench/gpu_check.sh): a prefork worker whose two
children each use CUDA (fork safety: nothing in the main process touched it), and the batching
GPU worker (threads pool), whose concurrent tasks share forward passes on the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from tests.integration.helpers import client_for, wait_until_serving

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = [f"무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요 {i}" for i in range(24)]


def _stats(client) -> dict:
    deadline = time.monotonic() + 10
    while True:  # the figures are published every half second
        stats = next(iter((client.app.control.inspect(timeout=2).stats() or {}).values()), {})
        if any(k.endswith(".device") for k in stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def test_prefork_worker_with_two_cuda_children(worker_factory, models):
    worker = worker_factory(models.env(DEVICE="cuda", TORCH_DTYPE="bfloat16"), pool="prefork", concurrency=2,
                            name="cuda-prefork")
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    handles = [client.submit(t, m) for t in TEXTS for m in ("koelectra", "exaone")]
    results = [h.get(timeout=120) for h in handles]
    assert all(0.0 <= r["spam_score"] <= 1.0 for r in results)
    stats = _stats(client)
    devices = {k: v for k, v in stats.items() if k.endswith(".device")}
    children = {k.split(".")[0] for k in devices}
    assert len(children) == 2 and set(devices.values()) == {"cuda:0"}, stats
    assert "Cannot re-initialize CUDA" not in worker.log()
    client.close()


def test_batching_gpu_worker_shares_forward_passes(worker_factory, models):
    worker = worker_factory(models.env(DEVICE="cuda", TORCH_DTYPE="bfloat16", PRELOAD_MODELS="exaone",
                                       BATCH_WAIT_MS="20"), pool="threads", concurrency=16, name="cuda-threads")
    client = client_for(worker, timeout=120)
    wait_until_serving(worker, client)
    handles = [client.submit(t, "exaone") for t in TEXTS]
    assert all(0.0 <= h.get(timeout=120)["spam_score"] <= 1.0 for h in handles)
    stats = _stats(client)
    assert max(v for k, v in stats.items() if k.endswith(".forward_batch_max")) > 1, stats
    assert any(v == "cuda:0" for k, v in stats.items() if k.endswith(".device")), stats
    client.close()
