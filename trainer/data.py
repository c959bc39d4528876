"""Loaders for the evaluation corpora (UCR anomaly archive, NASA MSL) and for training files.

Every loader returns float32 arrays of shape ``[T, C]`` (time first), read-only, so a
series can be shared between detectors without one of them changing it for the next.

Label conventions, stored as the sources give them:

- UCR: ``train_end`` is the number of anomaly-free training points, so the training part
  is ``values[:train_end]``; ``anomaly_begin``/``anomaly_end`` are 1-based and inclusive
  (the archive's own numbering). ``UcrSeries.anomaly_slice`` gives the 0-based slice.
- MSL: each anomaly is an inclusive ``(start, end)`` pair of 0-based indices into ``test``
  (telemanom's ``anomaly_sequences``).
"""

from __future__ import annotations

import ast
import csv
import gzip
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_detector.series_files import DataFormatError

MSL_SPACECRAFT = "MSL"
MSL_LABELS_FILE = "labeled_anomalies.csv"

_UCR_NAME = re.compile(
    r"^(?P<id>\d{3})_UCR_Anomaly_(?P<name>.+)_(?P<train_end>\d+)_(?P<begin>\d+)_(?P<end>\d+)"
    r"\.txt(?:\.gz)?$"
)


class DataNotFoundError(FileNotFoundError):
    """A requested data file, series or channel does not exist."""


@dataclass(frozen=True, eq=False)
class UcrFile:
    """The labels carried by a UCR archive file name."""

    id: int
    name: str
    train_end: int
    anomaly_begin: int  # 1-based, inclusive
    anomaly_end: int  # 1-based, inclusive
    path: Path


@dataclass(frozen=True, eq=False)
class UcrSeries:
    """One UCR archive series with its labels (see the module docstring for conventions)."""

    id: int
    name: str
    values: np.ndarray  # (T, 1) float32
    train_end: int
    anomaly_begin: int  # 1-based, inclusive
    anomaly_end: int  # 1-based, inclusive

    @property
    def anomaly_slice(self) -> slice:
        """The labelled anomaly as a 0-based, end-exclusive slice of ``values``."""
        return slice(self.anomaly_begin - 1, self.anomaly_end)


@dataclass(frozen=True, eq=False)
class MslChannel:
    """One NASA MSL telemetry channel: column 0 is the value, the rest command flags."""

    channel: str
    train: np.ndarray  # (T_train, 55) float32
    test: np.ndarray  # (T_test, 55) float32
    anomalies: tuple[tuple[int, int], ...]  # inclusive 0-based (start, end) into test


def parse_ucr_name(path: Path | str) -> UcrFile:
    """Read id, name and labels from an archive file name; raise DataFormatError if malformed."""
    path = Path(path)
    match = _UCR_NAME.match(path.name)
    if match is None:
        raise DataFormatError(
            f"{path.name!r} is not a UCR archive name: expected "
            "'NNN_UCR_Anomaly_<name>_<train_end>_<begin>_<end>.txt[.gz]'"
        )
    train_end, begin, end = (int(match[key]) for key in ("train_end", "begin", "end"))
    if not 0 < train_end < begin <= end:
        raise DataFormatError(
            f"{path.name!r}: labels must satisfy 0 < train_end < begin <= end, "
            f"got train_end={train_end}, begin={begin}, end={end}"
        )
    return UcrFile(int(match["id"]), match["name"], train_end, begin, end, path)


def _read_floats(path: Path) -> np.ndarray:
    """All whitespace-separated numbers of a (possibly gzipped) text file, flattened."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            tokens = handle.read().split()
        values = np.asarray(tokens, dtype=np.float64)
    except (OSError, EOFError, ValueError) as error:
        raise DataFormatError(f"{path}: not a text file of numbers ({error})") from error
    if values.size == 0:
        raise DataFormatError(f"{path}: no values")
    if not np.all(np.isfinite(values)):
        raise DataFormatError(f"{path}: contains NaN or infinite values")
    return values


def _frozen(values: np.ndarray) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    values.flags.writeable = False
    return values


def load_ucr(path: Path | str) -> UcrSeries:
    """Load one archive series; values on one line or one per line are both accepted."""
    label = parse_ucr_name(path)
    if not label.path.is_file():
        raise DataNotFoundError(f"no such UCR series file: {label.path}")
    values = _read_floats(label.path)
    if label.anomaly_end > values.size:
        raise DataFormatError(
            f"{label.path.name}: anomaly ends at {label.anomaly_end} "
            f"but the series has only {values.size} values"
        )
    return UcrSeries(
        id=label.id,
        name=label.name,
        values=_frozen(values[:, None]),
        train_end=label.train_end,
        anomaly_begin=label.anomaly_begin,
        anomaly_end=label.anomaly_end,
    )


def list_ucr(data_dir: Path | str, ids: Iterable[int] | None = None) -> list[UcrFile]:
    """The archive-named files in ``data_dir``, sorted by id, optionally only ``ids``.

    Files that do not carry an archive name (``INDEX.tsv``, notes) are ignored; asking for
    an id that is not there raises DataNotFoundError.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataNotFoundError(f"UCR data folder not found: {data_dir}")
    by_id: dict[int, UcrFile] = {}
    for path in sorted(data_dir.iterdir()):
        if not _UCR_NAME.match(path.name):
            continue
        label = parse_ucr_name(path)
        if label.id in by_id:
            raise DataFormatError(
                f"two files with id {label.id}: {by_id[label.id].path.name}, {path.name}"
            )
        by_id[label.id] = label
    if ids is None:
        return [by_id[key] for key in sorted(by_id)]
    wanted = sorted(set(ids))
    missing = [key for key in wanted if key not in by_id]
    if missing:
        raise DataNotFoundError(f"UCR ids not found in {data_dir}: {missing}")
    return [by_id[key] for key in wanted]


def _msl_labels(data_dir: Path) -> dict[str, tuple[tuple[int, int], ...]]:
    """The MSL rows of ``labeled_anomalies.csv``: channel -> inclusive (start, end) ranges."""
    labels_path = data_dir / MSL_LABELS_FILE
    if not labels_path.is_file():
        raise DataNotFoundError(f"MSL labels not found: {labels_path}")
    labels: dict[str, tuple[tuple[int, int], ...]] = {}
    with labels_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("spacecraft") != MSL_SPACECRAFT:
                continue
            try:
                ranges = ast.literal_eval(row["anomaly_sequences"])
                labels[row["chan_id"]] = tuple(
                    (int(start), int(end)) for start, end in sorted(ranges)
                )
            except (KeyError, ValueError, SyntaxError, TypeError) as error:
                raise DataFormatError(
                    f"{labels_path}: bad anomaly_sequences for {row.get('chan_id')!r} ({error})"
                ) from error
    return labels


def list_msl(data_dir: Path | str) -> list[str]:
    """The MSL channels that have both a ``<chan>.npz`` file and labels, sorted."""
    data_dir = Path(data_dir)
    labels = _msl_labels(data_dir)
    return sorted(channel for channel in labels if (data_dir / f"{channel}.npz").is_file())


def load_msl(data_dir: Path | str, channel: str) -> MslChannel:
    """Load one MSL channel's train and test arrays and its labelled anomaly ranges."""
    data_dir = Path(data_dir)
    labels = _msl_labels(data_dir)
    if channel not in labels:
        raise DataNotFoundError(f"no MSL labels for channel {channel!r} in {data_dir}")
    path = data_dir / f"{channel}.npz"
    train, test = load_npz(path, "train"), load_npz(path, "test")
    if train.shape[1] != test.shape[1]:
        raise DataFormatError(
            f"{channel}: train has {train.shape[1]} columns but test has {test.shape[1]}"
        )
    for start, end in labels[channel]:
        if not 0 <= start <= end < test.shape[0]:
            raise DataFormatError(
                f"{channel}: anomaly ({start}, {end}) lies outside test [0, {test.shape[0]})"
            )
    return MslChannel(channel, train, test, labels[channel])


def _as_2d(values: np.ndarray, source: str) -> np.ndarray:
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise DataFormatError(
            f"{source}: expected a non-empty [T] or [T, C] array, not {values.shape}"
        )
    if not np.issubdtype(values.dtype, np.number):
        raise DataFormatError(f"{source}: expected numbers, got dtype {values.dtype}")
    if not np.all(np.isfinite(values)):
        raise DataFormatError(f"{source}: contains NaN or infinite values")
    return _frozen(values)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, by name."""
    if not path.is_file():
        raise DataNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataFormatError(f"{path}: not a readable .npz file ({error})") from error


def load_npz(path: Path | str, key: str | None = None) -> np.ndarray:
    """One array of an ``.npz`` file as float32 ``[T, C]``; ``key`` is optional if it holds one."""
    path = Path(path)
    arrays = _read_npz(path)
    if key is None:
        if len(arrays) != 1:
            raise DataFormatError(f"{path}: holds arrays {sorted(arrays)}; name the one to load")
        (key,) = arrays
    if key not in arrays:
        raise DataFormatError(f"{path}: no array {key!r}; it has {sorted(arrays)}")
    return _as_2d(arrays[key], f"{path}[{key}]")
