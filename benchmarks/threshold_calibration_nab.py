"""Does threshold calibration hit its target false-alarm rate on real data? (NAB)

Each NAB file goes through the retraining job's own data path (``trainer.sources``:
labelled anomaly windows plus one window of margin are excluded, windows never cross a
gap) and is split in time: the oldest 40% of the normal readings train, the next 30%
calibrate (``trainer.thresholds.pot_threshold`` at risk level q per window), the newest
30% are the held-back normal stretches on which the achieved false-alarm rate (share of
windows above the threshold) is measured. Windows every reading (stride 1).

Scores (cheap on purpose; the real SmolLM2 model is too costly for 58 files here):
- ``tiny``: the unit tests' tiny AnomalyLLM (random 2-block GPT-2 teacher), trained with
  the quick profile on the training part;
- ``zscore``: |last reading - mean of the window's others| / their std, no training.

    python benchmarks/threshold_calibration_nab.py --nab /work/shared/data/nab
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_detector.devtools.tiny import tiny_config
from stream_detector.model import AnomalyLLM
from trainer import sources, train
from trainer.jobs import score_windows
from trainer.thresholds import ThresholdConfig, pot_threshold

RESULTS = Path(__file__).parent / "results" / "threshold_calibration_nab.json"
WINDOW = 32
TINY = tiny_config(window_length=WINDOW)


def zscore(windows: np.ndarray) -> np.ndarray:
    """How far each window's last reading lies from the rest of the window, in stds."""
    history, last = windows[:, 0, :-1], windows[:, 0, -1]
    return np.abs(last - history.mean(axis=1)) / (history.std(axis=1) + 1e-6)


def score_file(path: Path, risk_levels: list[float], score: str) -> dict[str, Any] | None:
    data = sources.read_files([path], window_length=WINDOW)
    splits = sources.split_windows(data, WINDOW, 1, calibration_fraction=0.3, holdout_fraction=0.3)
    (sensor,) = data.series
    calibration, holdout = splits.calibration[sensor], splits.holdout[sensor]
    if len(calibration.end_ts_ms) < 200 or len(holdout.end_ts_ms) < 200:
        return None
    if score == "tiny":
        torch.manual_seed(0)
        model = AnomalyLLM.from_config(TINY)
        model = train.fit(
            splits.train, TINY, train.profile("quick"), model=model, progress=False
        ).model
        cal_scores, hold_scores = (
            score_windows([model], w.windows, torch.device("cpu"))[0]
            for w in (calibration, holdout)
        )
    else:
        cal_scores, hold_scores = zscore(calibration.windows), zscore(holdout.windows)
    result: dict[str, Any] = {
        "file": str(path.relative_to(path.parents[1])),
        "calibration_windows": len(cal_scores),
        "holdout_windows": len(hold_scores),
    }
    for q in risk_levels:
        estimate = pot_threshold(cal_scores, ThresholdConfig(risk_level=q))
        result[f"q={q:g}"] = {
            "method": estimate.method,
            "threshold": round(estimate.threshold, 5),
            "above": int((hold_scores > estimate.threshold).sum()),
            "false_alarm_rate": round(float((hold_scores > estimate.threshold).mean()), 6),
        }
    return result


def _pooled(files: list[dict[str, Any]], key: str, method: str) -> dict[str, Any]:
    """Files whose threshold came from ``method``: how many, and their pooled rate."""
    chosen = [f for f in files if f[key]["method"] == method]
    windows = sum(f["holdout_windows"] for f in chosen)
    above = sum(f[key]["above"] for f in chosen)
    return {
        "files": len(chosen),
        "pooled_false_alarm_rate": round(above / windows, 6) if windows else None,
    }


def summarise(files: list[dict[str, Any]], risk_levels: list[float]) -> dict[str, Any]:
    summary = {}
    windows = sum(f["holdout_windows"] for f in files)
    for q in risk_levels:
        key = f"q={q:g}"
        rates = np.array([f[key]["false_alarm_rate"] for f in files])
        summary[key] = {
            "target": q,
            "pooled_false_alarm_rate": round(sum(f[key]["above"] for f in files) / windows, 6),
            "median_file_rate": round(float(np.median(rates)), 6),
            "files_within_2x_of_target": int(((rates <= 2 * q) & (rates >= q / 2)).sum()),
            "files_at_or_below_target": int((rates <= q).sum()),
            "files_above_10x_target": int((rates > 10 * q).sum()),
            "by_method": {m: _pooled(files, key, m) for m in ("pot", "quantile")},
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nab", type=Path, required=True, help="NAB folder (data/, labels/)")
    parser.add_argument("--score", choices=["tiny", "zscore"], action="append")
    parser.add_argument("--risk-levels", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labelled = json.loads((args.nab / sources.NAB_WINDOWS).read_text())
    paths = [args.nab / "data" / name for name in sorted(labelled)]
    results: dict[str, Any] = {
        "window_length": WINDOW,
        "stride": 1,
        "split": {"train": 0.4, "calibration": 0.3, "holdout_normal": 0.3},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads},
        "scores": {},
    }
    for score in args.score or ["tiny", "zscore"]:
        started = time.perf_counter()
        files = [r for p in paths if (r := score_file(p, args.risk_levels, score)) is not None]
        results["scores"][score] = {
            "files": len(files),
            "seconds": round(time.perf_counter() - started, 1),
            "summary": summarise(files, args.risk_levels),
            "per_file": files,
        }
        print(score, json.dumps(results["scores"][score]["summary"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
