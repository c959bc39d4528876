"""``python -m trainer ucr`` end to end on two real archive series with the discord baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.shared_data import DATA_DIR, REPO_ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # stumpy's numba compilation alone takes about a minute
    pytest.mark.skipif(
        not (DATA_DIR / "ucr").is_dir(),
        reason=f"UCR archive not found at {DATA_DIR / 'ucr'} (set DETECTOR_DATA_DIR)",
    ),
]


def test_ucr_command_locates_two_real_anomalies(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "trainer", "ucr", "--data", str(DATA_DIR / "ucr")]
    command += ["--detector", "discord", "--ids", "26", "118", "--out", str(out)]

    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert result["detector"] == "discord"
    assert [row["id"] for row in result["series"]] == [26, 118]
    # Both are easy for a matrix-profile discord: a regression would show up here.
    assert result["accuracy"] == 1.0
    assert all(row["fit_s"] is not None and row["score_s"] is not None for row in result["series"])
