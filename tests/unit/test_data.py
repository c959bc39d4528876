"""Loaders: UCR archive names and files, MSL channels, generic CSV / npz training files."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from stream_detector.series_files import nab_windows_for, read_csv
from tests.shared_data import DATA_DIR
from trainer.data import (
    DataFormatError,
    DataNotFoundError,
    list_msl,
    list_ucr,
    load_msl,
    load_npz,
    load_ucr,
    parse_ucr_name,
)

pytestmark = pytest.mark.unit


def _write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    return path


def test_parse_ucr_name_reads_labels() -> None:
    label = parse_ucr_name("/x/042_UCR_Anomaly_my_series_v2_3000_4100_4200.txt.gz")
    assert (label.id, label.name) == (42, "my_series_v2")
    assert (label.train_end, label.anomaly_begin, label.anomaly_end) == (3000, 4100, 4200)


@pytest.mark.parametrize(
    "name",
    [
        "042_UCR_Anomaly_series_3000_4100.txt",  # a label missing
        "42_UCR_Anomaly_series_3000_4100_4200.txt",  # id not three digits
        "042_UCR_Anomaly_series_3000_4100_4200.csv",
        "042_UCR_Anomaly_series_5000_4100_4200.txt",  # anomaly inside the training part
        "042_UCR_Anomaly_series_3000_4300_4200.txt",  # ends before it begins
    ],
)
def test_parse_ucr_name_rejects_malformed_names(name: str) -> None:
    with pytest.raises(DataFormatError):
        parse_ucr_name(name)


@pytest.mark.parametrize("separator", ["\n", " ", "  \t"])
def test_load_ucr_flattens_any_layout(tmp_path: Path, separator: str) -> None:
    numbers = [float(value) for value in range(10)]
    text = separator.join(str(value) for value in numbers) + "\n"
    path = _write_gz(tmp_path / "007_UCR_Anomaly_toy_4_6_7.txt.gz", text)

    series = load_ucr(path)

    assert series.values.shape == (10, 1) and series.values.dtype == np.float32
    np.testing.assert_array_equal(series.values[:, 0], numbers)
    assert not series.values.flags.writeable
    # 1-based inclusive 6..7 are the 0-based values 5 and 6
    np.testing.assert_array_equal(series.values[series.anomaly_slice, 0], [5.0, 6.0])


def test_load_ucr_rejects_bad_contents(tmp_path: Path) -> None:
    not_numbers = _write_gz(tmp_path / "001_UCR_Anomaly_a_2_3_4.txt.gz", "1 2 x 4\n")
    too_short = _write_gz(tmp_path / "002_UCR_Anomaly_b_2_3_9.txt.gz", "1 2 3 4\n")
    with pytest.raises(DataFormatError, match="numbers"):
        load_ucr(not_numbers)
    with pytest.raises(DataFormatError, match="only 4 values"):
        load_ucr(too_short)
    with pytest.raises(DataNotFoundError):
        load_ucr(tmp_path / "003_UCR_Anomaly_c_2_3_4.txt.gz")


def test_list_ucr_sorts_filters_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("010_UCR_Anomaly_b_2_3_4.txt.gz", "003_UCR_Anomaly_a_2_3_4.txt.gz"):
        _write_gz(tmp_path / name, "1 2 3 4 5\n")
    (tmp_path / "INDEX.tsv").write_text("id\tname\n")

    assert [entry.id for entry in list_ucr(tmp_path)] == [3, 10]
    assert [entry.name for entry in list_ucr(tmp_path, ids=[10])] == ["b"]
    with pytest.raises(DataNotFoundError, match=r"\[4\]"):
        list_ucr(tmp_path, ids=[3, 4])


def test_list_ucr_rejects_duplicate_ids(tmp_path: Path) -> None:
    for name in ("003_UCR_Anomaly_a_2_3_4.txt.gz", "003_UCR_Anomaly_b_2_3_4.txt"):
        (tmp_path / name).write_text("1\n")
    with pytest.raises(DataFormatError, match="two files with id 3"):
        list_ucr(tmp_path)


def _msl_folder(tmp_path: Path, ranges: str = "[[1, 2], [5, 7]]") -> Path:
    rows = [
        ["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"],
        ["A-1", "MSL", ranges, "[point]", "8"],
        ["P-1", "SMAP", "[[0, 1]]", "[point]", "8"],
        ["B-2", "MSL", "[[0, 1]]", "[point]", "8"],  # labelled but no file
    ]
    with (tmp_path / "labeled_anomalies.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    train = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.savez(tmp_path / "A-1.npz", train=train, test=train[:8])
    np.savez(tmp_path / "P-1.npz", train=train, test=train[:8])
    return tmp_path


def test_msl_loads_labelled_channels_with_files(tmp_path: Path) -> None:
    folder = _msl_folder(tmp_path)

    assert list_msl(folder) == ["A-1"]
    channel = load_msl(folder, "A-1")
    assert channel.train.shape == (10, 3) and channel.test.shape == (8, 3)
    assert channel.anomalies == ((1, 2), (5, 7))
    with pytest.raises(DataNotFoundError):
        load_msl(folder, "P-1")  # a SMAP channel


def test_msl_rejects_ranges_outside_test(tmp_path: Path) -> None:
    folder = _msl_folder(tmp_path, ranges="[[5, 8]]")  # test has indices 0..7
    with pytest.raises(DataFormatError, match="outside test"):
        load_msl(folder, "A-1")


def test_one_csv_reader_names_columns_sensors_and_times(tmp_path: Path) -> None:
    path = tmp_path / "sensor.csv"
    path.write_text("timestamp,a,b\n2024-01-01,1.5,2\n2024-01-02,3,4\n")
    (rows,) = read_csv(path, ["b", "a"]).values()
    np.testing.assert_array_equal(rows.values, [[2.0, 1.5], [4.0, 3.0]])
    assert rows.ts_ms.tolist() == [1_704_067_200_000, 1_704_153_600_000]
    assert read_csv(path).keys() == {"sensor"}  # named after the file
    with pytest.raises(DataFormatError, match="'c'"):
        read_csv(path, ["a", "c"])
    path.write_text("sensor_id,a\nx,1\ny,2\nx,3\n")  # no time column: one row a minute
    found = read_csv(path)
    assert found["x"].values[:, 0].tolist() == [1.0, 3.0] and found["x"].ts_ms.tolist() == [
        0,
        120_000,
    ]
    path.write_text("timestamp,a\n2024-01-01,oops\n")
    with pytest.raises(DataFormatError, match=r"sensor\.csv:2"):
        read_csv(path, ["a"])


def test_nab_labels_come_from_the_nab_folder_or_a_named_windows_file(tmp_path: Path) -> None:
    folder = tmp_path / "nab"
    (folder / "data" / "realKnownCause").mkdir(parents=True)
    (folder / "labels").mkdir()
    path = folder / "data" / "realKnownCause" / "machine.csv"
    path.write_text("timestamp,value\n2014-01-01 00:00:00,1\n")
    windows = {
        "realKnownCause/machine.csv": [["2014-01-01 00:00:00.000000", "2014-01-02 00:00:00"]]
    }
    (folder / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    expected = [(1_388_534_400_000, 1_388_620_800_000)]
    assert nab_windows_for(path) == ("realKnownCause/machine.csv", expected)
    elsewhere = tmp_path / "machine.csv"
    elsewhere.write_text(path.read_text())
    assert nab_windows_for(elsewhere) is None
    found = nab_windows_for(elsewhere, folder / "labels" / "combined_windows.json")
    assert found == ("realKnownCause/machine.csv", expected)


def test_load_npz_picks_the_only_array_or_the_named_one(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", values=np.arange(4.0))
    np.savez(tmp_path / "two.npz", train=np.zeros((3, 2)), test=np.ones((2, 2)))

    assert load_npz(tmp_path / "one.npz").shape == (4, 1)
    assert load_npz(tmp_path / "two.npz", "test").shape == (2, 2)
    with pytest.raises(DataFormatError, match="name the one"):
        load_npz(tmp_path / "two.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataFormatError):
        load_npz(tmp_path / "bad.npz")


@pytest.mark.skipif(not (DATA_DIR / "ucr").is_dir(), reason=f"no UCR data at {DATA_DIR / 'ucr'}")
def test_real_one_line_series_matches_the_index() -> None:
    with (DATA_DIR / "ucr" / "INDEX.tsv").open() as handle:
        lengths = {
            int(row["id"]): int(row["length"]) for row in csv.DictReader(handle, delimiter="\t")
        }
    (entry,) = list_ucr(DATA_DIR / "ucr", ids=[204])  # all values on one line

    series = load_ucr(entry.path)

    assert series.values.shape == (lengths[204], 1)
