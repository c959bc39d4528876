"""Training to convergence (issue 12, lever 2): the default model fitted on UCR series with
more optimiser steps, and what the steps change.

Each series is fitted once per training setting, as the harness's ``anomalyllm`` fits it
(the default model, SmolLM2 with six blocks, the memory bank and calibration of `trainer
fit`), and scored at the UCR runs' resolution (at most 1,024 windows, stride at most 16):

- ``quick``: the profile of the UCR runs (4 epochs over at most 128 windows, 16 steps);
- ``default``: `trainer fit`'s profile (8 epochs over at most 192 windows, 40 steps);
- ``long``: 40 epochs over at most 512 windows (up to 520 steps), stopped when the
  validation loss (the last fifth of the training part's windows) has not improved for 5
  epochs, and the best epoch's weights kept, as every profile does.

Per series and setting it records the training and validation loss per epoch, where
training stopped, the seconds, and two UCR hits: the default score (each term from its
own edge of normal, what ``anomalyllm`` scores) and the paper's teacher-student
discrepancy alone (the one term that training changes; the memory, level, scale and
point terms read no network).

    python benchmarks/ucr_convergence.py --data ../shared/data/ucr \\
        --ids 1 31 63 95 123 154 184 223 250 --out benchmarks/results/ucr_convergence.json

The results are written after every series (``complete`` says whether all were done).
The committed ones ran as two processes side by side, one core each, over the first five
and the last four of those series (``ucr_convergence_first.json``,
``ucr_convergence_second.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.score_ablation import raw_terms
from trainer import train
from trainer.anomalyllm_detector import AnomalyLLMDetector, nearest_peak_score
from trainer.data import load_ucr
from trainer.evaluate import select_ucr, ucr_hit, ucr_location
from trainer.train import TrainConfig, sliding_windows

MAX_SCORED_WINDOWS = 1024  # the quick profile's, as in the UCR runs
SETTINGS = {
    "quick": train.PROFILES["quick"],
    "default": train.PROFILES["default"],
    "long": TrainConfig(epochs=40, max_train_windows=512, patience=5),
}


def fit_and_score(series, name: str) -> dict[str, object]:
    """Fit the default model under training setting ``name`` and score the series."""
    train.PROFILES.setdefault(name, SETTINGS[name])
    detector = AnomalyLLMDetector(profile_name=name, max_scored_windows=MAX_SCORED_WINDOWS)
    started = time.perf_counter()
    detector.fit(series.values[: series.train_end])
    fit_s = time.perf_counter() - started
    model, result = detector.model, detector.result
    hits = {"default": _hit(detector.score(series.values), series)}
    stride = detector._stride(len(series.values))  # the harness's, as `score` used
    windows = sliding_windows(series.values, model.config.window_length, stride)
    raw, offsets = raw_terms(model, windows, ("discrepancy",))
    with torch.inference_mode():
        row = model.config.score_terms.index("discrepancy")
        centre, unit = model.term_centre[row, 0].item(), model.term_spread[row, 0].item()
    starts = np.arange(len(windows)) * stride
    size = len(series.values)
    points = nearest_peak_score((raw[0] - centre) / unit, starts + offsets[0], size)
    hits["discrepancy"] = _hit(points, series)
    return {
        **result.summary(),
        "steps_per_epoch": -(-result.train_windows // SETTINGS[name].batch_size),
        "train_loss": [round(value, 5) for value in result.train_loss],
        "validation_loss": [round(value, 5) for value in result.validation_loss],
        "fit_s": round(fit_s, 1),
        "hits": hits,
    }


def _hit(points: np.ndarray, series) -> bool:
    return ucr_hit(ucr_location(points, series.train_end), series.anomaly_begin, series.anomaly_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", nargs="+", required=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    records = []
    entries = select_ucr(args.data, args.ids)
    for entry in entries:
        series = load_ucr(entry.path)
        runs = {name: fit_and_score(series, name) for name in args.settings}
        records.append({"id": series.id, "runs": runs})
        print(
            series.id,
            *(
                f"{name}: epochs {run['epochs_run']} best {run['best_epoch']} "
                f"val {run['best_validation_loss']:.4f} {run['fit_s']} s {run['hits']}"
                for name, run in runs.items()
            ),
            sep="\n  ",
            flush=True,
        )
        result = summary(records, args.settings, time.perf_counter() - started)
        result["complete"] = len(records) == len(entries)
        if args.out:  # after every series: a long run stopped early keeps what it finished
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["hits"], indent=2))


def summary(records: list[dict], settings: list[str], wall_s: float) -> dict[str, object]:
    return {
        "benchmark": "ucr convergence (the default model under three training lengths)",
        "settings": {name: dataclasses.asdict(SETTINGS[name]) for name in settings},
        "series": len(records),
        "hits": {
            name: {
                score: sum(record["runs"][name]["hits"][score] for record in records)
                for score in ("default", "discrepancy")
            }
            for name in settings
        },
        "wall_s": round(wall_s, 1),
        "records": records,
    }


if __name__ == "__main__":
    main()
