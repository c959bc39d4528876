"""Sensor series from CSV files, and NAB's labelled anomaly windows: the one reader that
``trainer fit --from-files``, the NAB harness and the demo share.

A CSV file has a header row. Its time column (``timestamp``, ``ts`` or ``time``: ISO-8601,
UTC when naive, or epoch milliseconds) is optional, as is a ``sensor_id`` column (one
series per value; else the file is one sensor, named after the file). The value columns
are the ones named, or every other column but ``label``. ``.csv.gz`` is read too.

NAB (the Numenta Anomaly Benchmark) labels its files in ``labels/combined_windows.json``,
next to ``data/``: file name inside ``data/`` -> list of [start, end] timestamps.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

DEFAULT_INTERVAL_MS = 60_000
TIME_COLUMNS = ("timestamp", "ts", "time")
NAB_WINDOWS = Path("labels") / "combined_windows.json"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


class DataFormatError(ValueError):
    """A data file or file name does not follow the format its loader expects."""


@dataclass(frozen=True, eq=False)
class CsvSeries:
    """One sensor's rows of a CSV file, in file order."""

    ts_ms: np.ndarray  # (T,) int64
    values: np.ndarray  # (T, C) float64


def parse_time_ms(text: str | int | float) -> int:
    """Epoch milliseconds from a number (epoch ms) or an ISO-8601 string (UTC if naive)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    if isinstance(text, str):
        stripped = text.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", stripped):
            return int(float(stripped))
        try:
            parsed = datetime.fromisoformat(stripped)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return (parsed - _EPOCH) // _ONE_MS
    raise DataFormatError(f"{text!r} is neither epoch milliseconds nor an ISO-8601 time")


def sensor_name(path: Path) -> str:
    """A file's sensor id: its name without data suffixes."""
    name = path.name
    for suffix in (".gz", ".csv", ".npz", ".txt"):
        name = name.removesuffix(suffix)
    return name


def read_csv(
    path: Path, columns: list[str] | None = None, interval_ms: int = DEFAULT_INTERVAL_MS
) -> dict[str, CsvSeries]:
    """sensor -> its rows. Without a time column, row i is at ``i * interval_ms``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        time_column = next((c for c in TIME_COLUMNS if c in header), None)
        value_columns = columns or [
            c for c in header if c not in {time_column, "sensor_id", "label"}
        ]
        missing = [c for c in value_columns if c not in header]
        if missing or not value_columns:
            raise DataFormatError(
                f"{path}: value columns {missing or value_columns} not in the header {header}; "
                "name them with --columns"
            )
        rows: dict[str, list[tuple[int, list[float]]]] = {}
        for line, row in enumerate(reader, start=2):
            try:
                values = [float(row[c]) for c in value_columns]
                ts_ms = parse_time_ms(row[time_column]) if time_column else (line - 2) * interval_ms
            except (TypeError, ValueError) as error:
                raise DataFormatError(f"{path}:{line}: {error}") from error
            if not all(math.isfinite(v) for v in values):
                raise DataFormatError(f"{path}:{line}: NaN or infinite value")
            rows.setdefault(row.get("sensor_id") or sensor_name(path), []).append((ts_ms, values))
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    return {
        sensor: CsvSeries(
            np.array([ts for ts, _ in data], dtype=np.int64),
            np.array([v for _, v in data], dtype=np.float64).reshape(len(data), -1),
        )
        for sensor, data in rows.items()
    }


def read_nab_windows(windows_file: Path) -> dict[str, list[tuple[int, int]]]:
    """NAB's labels: file name inside ``data/`` -> its windows (start, end) in epoch ms."""
    try:
        labels = json.loads(windows_file.read_text())
        return {
            name: [(parse_time_ms(start), parse_time_ms(end)) for start, end in windows]
            for name, windows in labels.items()
        }
    except (ValueError, TypeError, AttributeError) as error:
        raise DataFormatError(f"{windows_file}: not NAB's windows file ({error})") from error


def nab_windows_for(
    path: Path, windows_file: Path | None = None
) -> tuple[str, list[tuple[int, int]]] | None:
    """(NAB name, labelled windows) of a file inside a NAB folder (``data/`` next to
    ``labels/``), or else the entry of ``windows_file`` with the file's name; None when
    neither labels it."""
    resolved = path.resolve()
    for parent in resolved.parents:
        labels = parent / NAB_WINDOWS
        if labels.is_file() and (parent / "data") in resolved.parents:
            name = resolved.relative_to(parent / "data").as_posix()
            windows = read_nab_windows(labels)
            return (name, windows[name]) if name in windows else None
    if windows_file is not None:
        for name, windows in read_nab_windows(windows_file).items():
            if Path(name).name == path.name:
                return name, windows
    return None
