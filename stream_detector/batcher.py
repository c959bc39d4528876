"""From due windows to inference batches: group by model, stack, flush on size or deadline.

Pure: no I/O and no clock of its own (callers pass ``now_s``, a monotonic time). Windows
keep their arrival order within a model, so a sensor's windows are scored oldest first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from stream_detector.windows import Window

# Model name -> (channels, window_length) of the version being served; None = no model.
ShapeLookup = Callable[[str], tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class QueuedWindow:
    """A due window waiting for its batch."""

    window: Window
    model_name: str
    enqueued_s: float
    # When its newest reading entered Kafka (epoch ms), for end-to-end latency; None if unknown.
    ingest_ts_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """Windows of one model, stacked for one forward pass."""

    model_name: str
    items: tuple[QueuedWindow, ...]
    values: np.ndarray  # (B, C, L) float32

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class RejectedWindow:
    """A window its model cannot score; it goes to the dead-letter topic with ``reason``."""

    window: Window
    model_name: str
    reason: str  # "<code>: <detail>", like InvalidReading.reason

    @property
    def code(self) -> str:
        """The stable part of ``reason``, for metrics labels."""
        return self.reason.split(":", 1)[0]


class Batcher:
    """Queues due windows per model and hands out full batches, or all of them when late.

    A model's queue is flushed in batches of at most ``batch_size`` windows once it holds
    a full batch, and completely once its oldest window has waited ``deadline_ms``.
    """

    def __init__(self, batch_size: int, deadline_ms: int, model_for: Callable[[str], str]) -> None:
        if batch_size < 1 or deadline_ms < 0:
            raise ValueError(
                f"need batch_size >= 1 and deadline_ms >= 0, got {batch_size}, {deadline_ms}"
            )
        self.batch_size = batch_size
        self.deadline_s = deadline_ms / 1000
        self._model_for = model_for
        self._queues: dict[str, deque[QueuedWindow]] = {}

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def add(
        self,
        windows: Iterable[Window],
        shape_of: ShapeLookup,
        now_s: float,
        ingest_ts_ms: Mapping[tuple[str, int], int] | None = None,
    ) -> list[RejectedWindow]:
        """Queue windows for their models; return those whose model cannot score them.

        ``ingest_ts_ms`` maps (sensor_id, end_ts_ms) to the Kafka timestamp of that reading.
        """
        rejected = []
        for window in windows:
            model_name = self._model_for(window.sensor_id)
            shape = shape_of(model_name)
            reason = _mismatch(window, model_name, shape)
            if reason is not None:
                rejected.append(RejectedWindow(window, model_name, reason))
                continue
            ingest = (ingest_ts_ms or {}).get((window.sensor_id, window.end_ts_ms))
            self._queues.setdefault(model_name, deque()).append(
                QueuedWindow(window, model_name, now_s, ingest)
            )
        return rejected

    def ready(self, now_s: float, flush_all: bool = False) -> list[Batch]:
        """Take the batches due now: full ones, and everything of a model past its deadline."""
        batches = []
        for model_name, queue in self._queues.items():
            late = bool(queue) and now_s - queue[0].enqueued_s >= self.deadline_s
            while len(queue) >= self.batch_size or (queue and (late or flush_all)):
                items = tuple(queue.popleft() for _ in range(min(self.batch_size, len(queue))))
                values = np.stack([item.window.values for item in items]).astype(
                    np.float32, copy=False
                )
                batches.append(Batch(model_name, items, values))
        self._queues = {name: queue for name, queue in self._queues.items() if queue}
        return batches

    def seconds_to_deadline(self, now_s: float) -> float | None:
        """How long until the oldest queued window is due; None when nothing is queued."""
        oldest = [queue[0].enqueued_s for queue in self._queues.values() if queue]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self.deadline_s - now_s)

    def clear(self) -> None:
        """Forget every queued window (after losing the partitions they came from)."""
        self._queues.clear()


def _mismatch(window: Window, model_name: str, shape: tuple[int, int] | None) -> str | None:
    if shape is None:
        return f"no_model: model {model_name!r} has no version loaded"
    channels, length = window.values.shape
    expected_channels, expected_length = shape
    if channels != expected_channels:
        return (
            f"wrong_channels: window has {channels} channels, model {model_name!r} "
            f"expects {expected_channels}"
        )
    if length != expected_length:
        return (
            f"wrong_length: window has {length} readings, model {model_name!r} "
            f"expects {expected_length}"
        )
    return None
