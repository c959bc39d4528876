"""The batcher groups due windows by model, stacks them, and flushes on size or deadline."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.batcher import Batcher
from stream_detector.windows import Window

pytestmark = pytest.mark.unit

SHAPES = {"pumps": (1, 8), "fans": (2, 8)}


def window(sensor_id: str, end_ts_ms: int, channels: int = 1, length: int = 8) -> Window:
    values = np.full((channels, length), end_ts_ms, dtype=np.float32)
    return Window(sensor_id, values, end_ts_ms - length + 1, end_ts_ms)


def model_for(sensor_id: str) -> str:
    return sensor_id.split("-")[0] + "s"


def make(batch_size: int = 3, deadline_ms: int = 50) -> Batcher:
    return Batcher(batch_size, deadline_ms, model_for)


def test_a_window_dates_its_readings_between_its_first_and_last() -> None:
    regular = Window("pump-1", np.zeros((1, 8), dtype=np.float32), 1000, 1700)
    assert [regular.ts_at(offset) for offset in (0, 3, 7)] == [1000, 1300, 1700]
    assert (regular.ts_at(-2), regular.ts_at(99)) == (1000, 1700)  # clamped to the window


def test_full_batches_leave_at_once_and_the_rest_waits_for_the_deadline() -> None:
    batcher = make()
    batcher.add([window("pump-1", t) for t in range(10, 15)], SHAPES.get, now_s=0.0)

    (full,) = batcher.ready(now_s=0.0)
    assert full.model_name == "pumps"
    assert full.values.shape == (3, 1, 8) and full.values.dtype == np.float32
    assert [item.window.end_ts_ms for item in full.items] == [10, 11, 12]
    assert len(batcher) == 2
    assert batcher.seconds_to_deadline(now_s=0.02) == pytest.approx(0.03)

    assert batcher.ready(now_s=0.049) == []
    (late,) = batcher.ready(now_s=0.05)
    assert [item.window.end_ts_ms for item in late.items] == [13, 14]
    assert len(batcher) == 0 and batcher.seconds_to_deadline(now_s=1.0) is None


def test_windows_are_grouped_by_model_in_arrival_order() -> None:
    batcher = make(batch_size=10)
    batcher.add(
        [window("pump-1", 1), window("fan-1", 1, channels=2), window("pump-2", 2)],
        SHAPES.get,
        now_s=0.0,
    )
    batches = {batch.model_name: batch for batch in batcher.ready(now_s=0.0, flush_all=True)}
    assert [i.window.sensor_id for i in batches["pumps"].items] == ["pump-1", "pump-2"]
    assert batches["fans"].values.shape == (1, 2, 8)


def test_a_zero_deadline_flushes_every_time() -> None:
    batcher = make(batch_size=100, deadline_ms=0)
    batcher.add([window("pump-1", 1)], SHAPES.get, now_s=5.0)
    assert len(batcher.ready(now_s=5.0)) == 1


def test_windows_that_do_not_fit_their_model_are_rejected_with_a_reason() -> None:
    batcher = make()
    rejected = batcher.add(
        [
            window("fan-1", 1, channels=1),  # fans have two channels
            window("pump-1", 2, length=16),
            window("valve-1", 3),  # no model loaded
            window("pump-2", 4),
        ],
        SHAPES.get,
        now_s=0.0,
    )
    assert [(r.window.sensor_id, r.code) for r in rejected] == [
        ("fan-1", "wrong_channels"),
        ("pump-1", "wrong_length"),
        ("valve-1", "no_model"),
    ]
    assert "expects 2" in rejected[0].reason
    assert len(batcher) == 1


def test_kafka_timestamps_travel_with_the_window() -> None:
    batcher = make(deadline_ms=0)
    batcher.add([window("pump-1", 7)], SHAPES.get, now_s=0.0, ingest_ts_ms={("pump-1", 7): 99})
    (batch,) = batcher.ready(now_s=0.0)
    assert batch.items[0].ingest_ts_ms == 99


def test_clear_forgets_queued_windows() -> None:
    batcher = make()
    batcher.add([window("pump-1", 1)], SHAPES.get, now_s=0.0)
    batcher.clear()
    assert len(batcher) == 0 and batcher.ready(now_s=10.0, flush_all=True) == []
