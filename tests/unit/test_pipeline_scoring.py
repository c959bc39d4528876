"""The pipeline scores in a thread of its own: under a backlog the run loop goes on polling
while a batch is scored, and waits for it only when another batch is ready behind it.
(The whole worker runs against a real broker and Redis in tests/integration.)"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from stream_detector.alerts import Thresholds
from stream_detector.config import Settings
from stream_detector.metrics import Metrics
from stream_detector.pipeline import Pipeline
from stream_detector.publisher import Delivery
from stream_detector.scorer import WindowScore
from stream_detector.windows import Window

pytestmark = pytest.mark.unit

LENGTH, BATCH = 8, 4


class HeldScorer:
    """Scores only while ``release`` is set, and records which batches it was given."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.batches: list[list[float]] = []

    def infer(self, model_name: str, windows: np.ndarray) -> int:
        self.started.release()
        assert self.release.wait(10)
        self.batches.append(windows[:, 0, -1].tolist())
        return len(windows)

    def window_scores(self, scored: int) -> list[WindowScore]:
        return [WindowScore(0.1, 0, (1.0,), LENGTH - 1) for _ in range(scored)]


class ListPublisher:
    """Takes every output at once (``Outbox`` only needs these calls here)."""

    transactional = False

    def __init__(self) -> None:
        self.scores: list[int] = []

    def publish_score(self, record: Any) -> Delivery:
        self.scores.append(record.ts_ms)
        return Delivery("scores", 1)


class WatchingPublisher(ListPublisher):
    """Notes, as the first score is published, whether the scorer began another batch."""

    def __init__(self, scorer: HeldScorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.next_batch_started: bool | None = None

    def publish_score(self, record: Any) -> Delivery:
        if self.next_batch_started is None:
            self.next_batch_started = self.scorer.started.acquire(timeout=2)
        return super().publish_score(record)


def pipeline(scorer: HeldScorer, publisher: ListPublisher) -> Pipeline:
    loaded = SimpleNamespace(
        name="default",
        version="v1",
        thresholds=Thresholds(default=1e9),
        model=SimpleNamespace(config=SimpleNamespace(score_terms=())),
    )
    registry = SimpleNamespace(get=lambda name: loaded, shape_of=lambda name: (1, LENGTH))
    store = SimpleNamespace(get_alert_state=lambda sensor_ids: {})
    return Pipeline(
        Settings(window_length=LENGTH, stride=1, batch_size=BATCH),
        consumer=SimpleNamespace(),  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
        registry=registry,  # type: ignore[arg-type]
        scorer=scorer,  # type: ignore[arg-type]
        metrics=Metrics(),
        store_factory=lambda channels: store,  # type: ignore[arg-type,return-value]
        clock=lambda: 0.0,
    )


def queue(pipeline: Pipeline, ends: range) -> None:
    windows = [
        Window(f"pump-{end}", np.full((1, LENGTH), end, dtype=np.float32), end - LENGTH, end)
        for end in ends
    ]
    pipeline.batcher.add(windows, lambda name: (1, LENGTH), now_s=0.0)


def test_under_a_backlog_the_loop_goes_on_while_a_batch_is_scored() -> None:
    scorer, publisher = HeldScorer(), ListPublisher()
    worker = pipeline(scorer, publisher)
    queue(worker, range(100, 104))  # one full batch

    worker.score_due()  # a full poll: not caught up
    assert scorer.started.acquire(timeout=10)  # the batch is being scored...
    assert publisher.scores == [] and not worker.idle  # ...and the loop has its turn back

    scorer.release.set()
    worker.score_due(flush_all=True)  # caught up: everything is published
    assert publisher.scores == [100, 101, 102, 103] and worker.idle


def test_a_second_ready_batch_makes_the_loop_wait_for_the_first() -> None:
    scorer, publisher = HeldScorer(), ListPublisher()
    worker = pipeline(scorer, publisher)
    queue(worker, range(100, 104))
    worker.score_due()
    assert scorer.started.acquire(timeout=10)

    queue(worker, range(200, 204))  # the next poll readies another batch
    waiting = threading.Thread(target=worker.score_due)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # held until the first batch is scored
    scorer.release.set()
    waiting.join(10)
    assert not waiting.is_alive() and publisher.scores[:4] == [100, 101, 102, 103]
    worker.score_due(flush_all=True)
    assert scorer.batches == [[100, 101, 102, 103], [200, 201, 202, 203]]
    assert publisher.scores == [100, 101, 102, 103, 200, 201, 202, 203] and worker.idle


def test_the_scoring_thread_takes_the_next_batch_while_the_loop_publishes() -> None:
    scorer = HeldScorer()
    publisher = WatchingPublisher(scorer)
    worker = pipeline(scorer, publisher)
    queue(worker, range(100, 104))
    worker.score_due()
    assert scorer.started.acquire(timeout=10)
    queue(worker, range(200, 204))
    scorer.release.set()
    worker.score_due(flush_all=True)
    assert publisher.next_batch_started  # the second batch did not wait for the first's outputs
    assert publisher.scores == [100, 101, 102, 103, 200, 201, 202, 203] and worker.idle


class FailingOnceScorer(HeldScorer):
    """Fails the first batch it is given; holds every later one until ``release``."""

    def infer(self, model_name: str, windows: np.ndarray) -> int:
        if not self.batches:
            self.batches.append(windows[:, 0, -1].tolist())
            raise RuntimeError("the model failed")
        return super().infer(model_name, windows)


def test_work_dropped_on_revoke_is_not_scored_after_it() -> None:
    scorer, publisher = FailingOnceScorer(), ListPublisher()
    worker = pipeline(scorer, publisher)
    queue(worker, range(100, 108))  # two full batches

    # The first fails; its retry queues behind the second (scored, or dropped before it
    # started), and both are dropped.
    worker.on_revoke([])
    scorer.release.set()
    queue(worker, range(200, 204))
    worker.score_due(flush_all=True)  # queued behind whatever still runs

    first, *later = scorer.batches
    assert first == [100, 101, 102, 103] and first not in later
    assert later[-1] == [200, 201, 202, 203] and len(later) <= 2
    assert publisher.scores == [200, 201, 202, 203] and worker.idle
