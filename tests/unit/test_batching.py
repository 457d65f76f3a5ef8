"""The batcher coalesces concurrent callers and hands every caller its own scores."""

from __future__ import annotations

import threading
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from worker.serving.batching import Batcher
from worker.serving.score import Score


class SlowScorer:
    """Scores a text by its length, slowly enough that callers pile up behind a pass."""

    name = "slow"

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def score(self, texts: list[str]) -> list[Score]:
        self.calls.append(len(texts))
        time.sleep(0.05)
        if self.fail_on in texts:
            raise RuntimeError("boom")
        return [Score(len(t) / 100, False) for t in texts]


def _run_concurrently(batcher: Batcher, texts: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}

    def call(text: str) -> None:
        try:
            out[text] = batcher.score([text])[0].spam_score
        except RuntimeError as exc:
            out[text] = exc

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_concurrent_callers_share_passes_and_get_their_own_scores():
    scorer = SlowScorer()
    batcher = Batcher(scorer, max_batch=8, max_wait_s=0.01, in_flight=lambda: 20)
    texts = ["x" * n for n in range(1, 21)]
    out = _run_concurrently(batcher, texts)
    assert out == {t: len(t) / 100 for t in texts}
    assert sum(scorer.calls) == 20 and max(scorer.calls) <= 8
    assert len(scorer.calls) < 20, "some passes carried several callers"


def test_a_lone_caller_does_not_wait_for_company():
    batcher = Batcher(SlowScorer(), max_batch=8, max_wait_s=5.0, in_flight=lambda: 1)
    start = time.perf_counter()
    assert batcher.score(["abc"])[0].spam_score == pytest.approx(0.03)
    assert time.perf_counter() - start < 1.0


def test_a_failed_pass_fails_its_callers_only():
    scorer = SlowScorer(fail_on="bad")
    batcher = Batcher(scorer, max_batch=1, max_wait_s=0.0)
    out = _run_concurrently(batcher, ["bad", "good"])
    assert isinstance(out["bad"], RuntimeError) and out["good"] == pytest.approx(0.04)
    assert batcher.score(["again"])[0].spam_score == pytest.approx(0.05)  # the batcher thread lives on


def test_a_failed_pass_is_scored_again_one_text_at_a_time():
    """One text that breaks a shared forward pass fails its own caller only."""
    scorer = SlowScorer(fail_on="bad")
    batcher = Batcher(scorer, max_batch=8, max_wait_s=5.0, in_flight=lambda: 4)  # the four share the first pass
    out = _run_concurrently(batcher, ["bad", "good", "fine", "okay"])
    assert isinstance(out["bad"], RuntimeError)
    assert {t: out[t] for t in ("good", "fine", "okay")} == pytest.approx({"good": 0.04, "fine": 0.04, "okay": 0.04})
    assert scorer.calls[0] > 1 and scorer.calls[-scorer.calls[0]:] == [1] * scorer.calls[0], scorer.calls


def test_a_caller_past_its_deadline_fails_clearly_and_the_batcher_serves_the_next():
    scorer = SlowScorer()  # 50 ms a pass
    batcher = Batcher(scorer, max_batch=1, max_wait_s=0.0)
    start = time.perf_counter()
    with pytest.raises(SoftTimeLimitExceeded, match=r"ran past its time limit \(TASK_TIME_LIMIT_S\) waiting for "
                                                    r"slow to score 20 text\(s\); 1[5-8] not yet started were dropped"):
        batcher.score([f"t{i}" for i in range(20)], deadline=time.monotonic() + 0.12)
    assert time.perf_counter() - start < 0.5
    start = time.perf_counter()
    assert batcher.score(["next"])[0].spam_score == pytest.approx(0.04)
    assert time.perf_counter() - start < 0.5, "the dropped texts were scored anyway"
    assert sum(scorer.calls) <= 5


def test_a_deadline_that_is_not_reached_changes_nothing():
    batcher = Batcher(SlowScorer(), max_batch=4, max_wait_s=0.0)
    got = batcher.score(["ab", "abc"], deadline=time.monotonic() + 5)
    assert [s.spam_score for s in got] == pytest.approx([0.02, 0.03])
