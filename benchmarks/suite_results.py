"""Regenerate the committed results of the fuzz and reliability suites.

The suites only write results when ``DETECTOR_RESULTS_DIR`` names a folder, so that an
ordinary test run leaves the working tree unchanged; this sets it and runs them:

    python benchmarks/suite_results.py                  # fuzz and reliability
    python benchmarks/suite_results.py tests/fuzz       # one suite
    python benchmarks/suite_results.py tests/reliability -k oversized

Results go to benchmarks/results/ (``fuzz.json``, ``reliability.json``,
``backlog_1m_samples.json``), one record per scenario, replacing that scenario's old one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(arguments: list[str]) -> int:
    suites = [a for a in arguments if not a.startswith("-")] and arguments
    selected = suites or ["tests/fuzz", "tests/reliability"]
    env = {**os.environ, "DETECTOR_RESULTS_DIR": str(ROOT / "benchmarks" / "results")}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *selected]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
