"""The worker's alert-policy options on NAB, decided again from saved raw scores.

``python -m trainer nab --detector D --decisions alerts --save-scores D.npz`` keeps each
file's raw scores, the rows where a window ends and the detector's own threshold. This
script replays them through the worker's alert path (`stream_detector.alerts`, via
`trainer.nab.decision_results`) under each policy of ``POLICIES``, declared before the
run, and scores the alerts that open as ``trainer nab --decisions alerts`` does: with the
running-quantile threshold (its level swept, the best kept per profile, as NAB picks any
detector's threshold), and, where the detector has one, its own threshold, fixed and
adaptive (``adapt_fitted_threshold``). No detector is fitted again, so every policy sees
the same scores.

    python benchmarks/nab_alert_policies.py --data ../shared/data/nab \\
        --scores anomalyllm=A.npz --scores hst=H.npz --scores gaussian=G.npz \\
        --out benchmarks/results/nab_alert_policies.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_detector.config import AlertPolicy
from trainer.nab import PROFILES, DetectorRun, decision_results, load_corpus

POLICIES: dict[str, dict[str, Any]] = {
    "every alert confirmed (3 of 5)": {"open_at_once_ratio": None},
    "a window at 4x the threshold opens at once": {"open_at_once_ratio": 4.0},
    "a window at 2x the threshold opens at once (the default)": {"open_at_once_ratio": 2.0},
}


def saved_run(data_dir: Path, path: Path) -> DetectorRun:
    """The raw scores, decision rows and thresholds ``--save-scores`` wrote, with their files."""
    saved = np.load(path)
    names = saved["names"].tolist()
    by_name = {series.name: series for series in load_corpus(data_dir)}
    thresholds = [None if np.isnan(t) else float(t) for t in saved["thresholds"].tolist()]
    return DetectorRun(
        corpus=[by_name[name] for name in names],
        likelihoods=[],
        settings={},
        complete=len(names) == len(by_name),
        raw=[saved[f"raw_{index}"] for index in range(len(names))],
        decision_rows=[saved[f"rows_{index}"] for index in range(len(names))],
        thresholds=thresholds,
    )


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Each threshold's score per profile (and the quantile levels picked)."""
    rows = {
        "running quantile": {p: round(results["quantile"][p]["score"], 2) for p in PROFILES},
        "quantile levels": {p: results["quantile"][p]["level"] for p in PROFILES},
    }
    for key, name in (("trained", "own threshold"), ("trained_adaptive", "own, adaptive")):
        if key in results:
            rows[name] = {p: round(results[key][p]["score"], 2) for p in PROFILES}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--scores", action="append", required=True, help="DETECTOR=PATH of a --save-scores file"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    detectors: dict[str, Any] = {}
    for spec in args.scores:
        name, _, path = spec.partition("=")
        run = saved_run(args.data, Path(path))
        detectors[name] = {"files": len(run.corpus), "complete": run.complete, "policies": {}}
        for policy_name, changes in POLICIES.items():
            results = decision_results(run, AlertPolicy(**changes))
            detectors[name]["policies"][policy_name] = summary(results)
            print(name, policy_name, json.dumps(summary(results)), flush=True)
    result = {
        "benchmark": "nab alert policies (saved raw scores, the worker's alert path)",
        "policies": POLICIES,
        "detectors": detectors,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
