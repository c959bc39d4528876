"""The worker serves /readyz only once its readiness checks are in place."""

from __future__ import annotations

import threading

import pytest

from stream_detector import worker
from stream_detector.config import Settings
from stream_detector.devtools.services import free_port
from stream_detector.devtools.workers import readiness

pytestmark = pytest.mark.unit


def test_a_worker_still_opening_its_pipeline_is_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opening, release = threading.Event(), threading.Event()

    def open_pipeline_slowly(*args: object) -> None:
        opening.set()
        release.wait(10)
        raise ConnectionError("the broker is not there")

    monkeypatch.setattr(worker, "open_pipeline", open_pipeline_slowly)
    settings = Settings(metrics_port=free_port())
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(settings, threading.Event())
        except ConnectionError as error:
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert opening.wait(10)
        # With no checks registered yet, a served /readyz would answer 200.
        assert readiness(settings.metrics_port, timeout_s=1.0) is not True
    finally:
        release.set()
        thread.join(10)
    assert len(errors) == 1
