"""File sources: CSV (with NAB labels where the file lies in a NAB folder), UCR and .npz
files, and the incidents file."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stream_detector.series_files import nab_windows_for, read_csv, sensor_name
from trainer.data import DataFormatError, DataNotFoundError, load_npz, load_ucr, parse_ucr_name
from trainer.sources.series import (
    DEFAULT_FILE_INTERVAL_MS,
    DEFAULT_MAX_READINGS_PER_SENSOR,
    Span,
    TrainingData,
    apply_spans,
    build_series,
    consistent_channels,
    parse_time_ms,
)


def read_files(
    paths: Sequence[Path],
    *,
    window_length: int,
    columns: Sequence[str] | None = None,
    interval_ms: int = DEFAULT_FILE_INTERVAL_MS,
    max_readings_per_sensor: int = DEFAULT_MAX_READINGS_PER_SENSOR,
    margin_windows: float = 1.0,
    incidents: Sequence[Span] = (),
) -> TrainingData:
    """Read CSV, NAB, UCR and npz files; one sensor per file (or per ``sensor_id`` value).

    - CSV (``.csv``, ``.csv.gz``): header row; ``timestamp``/``ts``/``time`` (ISO-8601 or
      epoch ms) is optional, a ``sensor_id`` column is optional. A NAB file (inside a NAB
      folder with ``labels/combined_windows.json``) gets its labelled windows as
      incidents: excluded from training, checked by the gate.
    - UCR archive files (``NNN_UCR_Anomaly_...txt``): the labelled anomaly is an incident.
    - ``.npz`` with one array ``[T]`` or ``[T, C]``.
    Files without timestamps get one reading every ``interval_ms`` from the epoch.
    """
    if not paths:
        raise DataNotFoundError("--from-files needs at least one file")
    dropped: Counter[str] = Counter()
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labelled: list[Span] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"no such file: {path}")
        name = path.name
        if name.endswith((".csv", ".csv.gz")):
            found = {
                sensor_id: (rows.ts_ms, rows.values)
                for sensor_id, rows in read_csv(path, list(columns or []), interval_ms).items()
            }
            nab = nab_windows_for(path)
            if nab is not None and len(found) == 1:
                (sensor_id,) = found
                labelled += [Span(sensor_id, start, end, "label") for start, end in nab[1]]
        elif name.endswith(".npz"):
            values = load_npz(path)
            found = {sensor_name(path): (np.arange(len(values)) * interval_ms, values)}
        elif name.endswith((".txt", ".txt.gz")):
            parse_ucr_name(path)  # a clear error for a .txt that is not a UCR series
            ucr = load_ucr(path)
            sensor_id = sensor_name(path)
            found = {sensor_id: (np.arange(len(ucr.values)) * interval_ms, ucr.values)}
            labelled.append(
                Span(
                    sensor_id,
                    (ucr.anomaly_begin - 1) * interval_ms,
                    (ucr.anomaly_end - 1) * interval_ms,
                    "label",
                )
            )
        else:
            raise DataFormatError(
                f"{path}: unknown file type; --from-files reads .csv[.gz], .npz and UCR "
                "archive .txt[.gz] files"
            )
        for sensor_id, (ts_ms, values) in found.items():
            if sensor_id in raw:
                raise DataFormatError(f"sensor {sensor_id!r} comes from two files; rename one")
            if len(ts_ms) > max_readings_per_sensor:
                dropped["over_cap_oldest"] += len(ts_ms) - max_readings_per_sensor
                ts_ms, values = ts_ms[-max_readings_per_sensor:], values[-max_readings_per_sensor:]
            raw[sensor_id] = (np.asarray(ts_ms, np.int64), np.asarray(values, np.float32))
    series = {
        sensor_id: build_series(sensor_id, ts_ms, values, dropped)
        for sensor_id, (ts_ms, values) in raw.items()
    }
    series = consistent_channels(series, dropped)
    data = TrainingData(
        series=series,
        source={"kind": "files", "files": [str(p) for p in paths]},
        incidents=[s for s in [*labelled, *incidents] if s.sensor_id in series],
        dropped=dropped,
    )
    return apply_spans(data, margin_windows, window_length)


def read_incidents(path: Path) -> list[Span]:
    """Labelled incidents: a JSON list of ``[sensor, start, end]`` (or objects with
    ``sensor_id``, ``start``, ``end``); times are epoch ms or ISO-8601."""
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataNotFoundError(f"--incidents: no such file {path}") from None
    except json.JSONDecodeError as error:
        raise DataFormatError(f"--incidents {path}: not JSON ({error})") from error
    if not isinstance(entries, list):
        raise DataFormatError(f"--incidents {path}: expected a JSON list of [sensor, start, end]")
    spans = []
    for number, entry in enumerate(entries):
        if isinstance(entry, dict):
            entry = [entry.get("sensor_id"), entry.get("start"), entry.get("end")]
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise DataFormatError(
                f"--incidents {path}: entry {number} must be [sensor, start, end], got {entry!r}"
            )
        start, end = parse_time_ms(entry[1]), parse_time_ms(entry[2])
        if end < start:
            raise DataFormatError(f"--incidents {path}: entry {number} ends before it starts")
        spans.append(Span(entry[0], start, end, "incident"))
    return spans
