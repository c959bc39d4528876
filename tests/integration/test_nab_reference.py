"""The NAB scorer reproduces the published NAB v1.1 scoreboard from published detector outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.shared_data import DATA_DIR, REPO_ROOT
from trainer import nab

NAB_DIR = DATA_DIR / "nab"
DETECTORS = ["numenta", "randomCutForest", "windowedGaussian"]

pytestmark = pytest.mark.skipif(
    not (NAB_DIR / "reference").is_dir(),
    reason=f"NAB data not found at {NAB_DIR} (set DETECTOR_DATA_DIR to the shared data folder)",
)


@pytest.fixture(scope="module")
def corpus() -> list[nab.NabSeries]:
    return nab.load_corpus(NAB_DIR)


@pytest.fixture(scope="module")
def reference_scores(corpus: list[nab.NabSeries]) -> dict[str, list[np.ndarray]]:
    return {
        detector: nab.load_reference_scores(NAB_DIR / "reference" / detector, corpus)
        for detector in DETECTORS
    }


def published(file_name: str) -> dict:
    return json.loads((NAB_DIR / file_name).read_text())


def test_corpus_is_the_full_nab_v1_1(corpus: list[nab.NabSeries]) -> None:
    assert len(corpus) == 58
    assert sum(len(series.windows) for series in corpus) == 116


def test_profiles_match_nab_cost_matrices() -> None:
    for profile, entry in published("reference/profiles.json").items():
        cost = entry["CostMatrix"]
        assert nab.PROFILES[profile] == nab.CostMatrix(
            tp_weight=cost["tpWeight"], fp_weight=cost["fpWeight"], fn_weight=cost["fnWeight"]
        )


@pytest.mark.parametrize("detector", DETECTORS)
def test_optimised_scores_reproduce_the_scoreboard(
    corpus: list[nab.NabSeries], reference_scores: dict[str, list[np.ndarray]], detector: str
) -> None:
    windows = [series.windows for series in corpus]
    results = nab.score_corpus(reference_scores[detector], windows)
    for profile, expected in published("scoreboard.json")[detector].items():
        assert results[profile].score == pytest.approx(expected, abs=0.5), profile


# windowedGaussian's entries in thresholds.json disagree with its own scoreboard entry.
@pytest.mark.parametrize("detector", ["numenta", "randomCutForest"])
def test_raw_scores_at_published_thresholds_match_nab(
    corpus: list[nab.NabSeries], reference_scores: dict[str, list[np.ndarray]], detector: str
) -> None:
    windows = [series.windows for series in corpus]
    for profile, expected in published("reference/thresholds.json")[detector].items():
        sweep = nab.sweep_thresholds(reference_scores[detector], windows, nab.PROFILES[profile])
        raw = sweep.raw_scores[sweep.index_at(expected["threshold"])]
        assert raw == pytest.approx(expected["score"], abs=1e-6), profile


def test_cli_scores_a_reference_detector(tmp_path: Path) -> None:
    out = tmp_path / "numenta.json"
    command = [sys.executable, "-m", "trainer", "nab", "--data", str(NAB_DIR)]
    command += ["--reference", str(NAB_DIR / "reference" / "numenta"), "--out", str(out)]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "reward_low_FP_rate" in completed.stdout
    results = json.loads(out.read_text())
    for profile, expected in published("scoreboard.json")["numenta"].items():
        assert results[profile] == pytest.approx(expected, abs=0.5)
    assert results["detector"] == "numenta" and len(results["files"]) == 58
