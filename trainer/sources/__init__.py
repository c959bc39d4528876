"""Training data for the retraining job: replayed from the readings topic, or read from files.

Modules: ``series`` (what every source yields, time parsing, gaps, exclusions),
``stream`` (the readings topic), ``files`` (CSV, NAB, UCR, .npz, incidents), ``splits``
(train / calibration / hold-out windows, and the recent windows of every reading).

Every source yields per-sensor series (timestamps, values ``[T, C]``) plus the spans that
must not be trained on: alerts (from ``open`` to ``resolved``, still-open alerts to the end
of the data) and labelled incidents, each widened by a margin of one window length of the
sensor's sampling interval on both sides (an alert starts at the end of the first window
that breached, so the anomaly began up to a window earlier).

Memory: at most ``max_readings_per_sensor`` readings are kept per sensor; when a sensor
has more, its oldest readings are dropped (the newest data is what a retrain is for), and
the report counts them.

Gaps and irregular sampling: a sensor's sampling interval is the median of the
differences between its consecutive timestamps. Its readings are cut into segments
wherever two consecutive readings are more than ``gap_factor`` (default 3) intervals
apart, and wherever an excluded span or a split boundary falls. Windows are taken inside
segments only, so no window crosses a gap, an alert or the train/calibration/hold-out
boundaries; nothing is interpolated. Jitter below the gap factor is kept as it is: the
worker, too, windows readings by count, not by clock time.

Splits (per sensor, by time): the oldest part trains, the next ``calibration_fraction``
calibrates thresholds, the newest ``holdout_fraction`` is held back for the promotion gate.
"""

from stream_detector.series_files import NAB_WINDOWS, parse_time_ms
from trainer.sources.files import read_files, read_incidents
from trainer.sources.series import (
    DEFAULT_FILE_INTERVAL_MS,
    DEFAULT_GAP_FACTOR,
    DEFAULT_MAX_READINGS_PER_SENSOR,
    SensorSeries,
    Span,
    TrainingData,
    exclusion_mask,
    iso,
    median_interval_ms,
    parse_learn_after,
    parse_since,
    segments,
)
from trainer.sources.splits import (
    SensorWindows,
    Splits,
    incident_windows,
    recent_windows,
    split_windows,
)
from trainer.sources.stream import ALERT_LOOKBACK_MS, alert_spans, read_stream

__all__ = [
    "ALERT_LOOKBACK_MS",
    "DEFAULT_FILE_INTERVAL_MS",
    "DEFAULT_GAP_FACTOR",
    "DEFAULT_MAX_READINGS_PER_SENSOR",
    "NAB_WINDOWS",
    "SensorSeries",
    "SensorWindows",
    "Span",
    "Splits",
    "TrainingData",
    "alert_spans",
    "exclusion_mask",
    "incident_windows",
    "iso",
    "median_interval_ms",
    "parse_learn_after",
    "parse_since",
    "parse_time_ms",
    "read_files",
    "read_incidents",
    "read_stream",
    "recent_windows",
    "segments",
    "split_windows",
]
