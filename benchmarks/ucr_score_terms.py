"""Ablation of the default score on UCR series: one fit per series, every choice on and off.

Fits the product's default model (``anomalyllm``: all four score terms) once per series,
computes each term's raw value for every scored window and for the held-back windows it
was calibrated on, then re-scores the series under each variant and judges it by the UCR
rule. The variants share the fitted networks and memory bank, so they differ only in:

- which terms are fused (every subset of discrepancy, memory, level, scale);
- how a term is put on the common scale: ``extreme`` (the model's: 1 is the most extreme
  normal window) or ``robust-z`` (median and 1.4826 MAD, the previous default);
- how window scores become point scores: ``centre`` (the model's harness rule: the
  window centred nearest) or ``mean`` (the mean over covering windows, the previous rule);
- the alert path's k-of-n confirmation applied to the score (the k-th largest of the
  last n windows), off (1 of 1) or the worker's default (3 of 5).

    python benchmarks/ucr_score_terms.py --data ../shared/data/ucr --ids 1 9 14 ... 250 \\
        --profile quick --out benchmarks/results/ucr_score_terms_dev.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_detector.model import _TWO_SIDED, SCORE_TERMS
from trainer.anomalyllm_detector import MAX_SCORING_STRIDE
from trainer.data import load_ucr
from trainer.detectors import get_detector
from trainer.evaluate import select_ucr, ucr_hit, ucr_location
from trainer.train import MAX_CALIBRATION_WINDOWS, _thin, sliding_windows

SCALINGS = ("extreme", "robust-z")
MAPPINGS = ("centre", "mean")
CONFIRMATIONS = ((1, 1), (3, 5))


def raw_terms(model, windows: np.ndarray, names=SCORE_TERMS) -> np.ndarray:
    """The model's raw terms of windows (N, 1, L), single channel. (T, N)"""
    with torch.inference_mode():
        parts = [
            model.raw_terms(torch.from_numpy(windows[start : start + 256]), names)[0][:, :, 0]
            for start in range(0, len(windows), 256)
        ]
    return torch.cat(parts, dim=1).numpy()


def scaled(raw: np.ndarray, held: np.ndarray, normal: np.ndarray, scaling: str) -> np.ndarray:
    """Each term of ``raw`` (T, N) on a common scale, from normal windows' terms."""
    out = np.empty_like(raw)
    for index, name in enumerate(SCORE_TERMS):
        two_sided = name in _TWO_SIDED
        reference = normal[index - 2] if two_sided else held[index]
        if two_sided:
            reference = np.concatenate([held[index], reference])
        median = np.median(reference)
        if scaling == "robust-z":
            centre, unit = median, 1.4826 * np.median(np.abs(reference - median))
        elif two_sided:
            low, high = reference.min(), reference.max()
            centre, unit = (low + high) / 2, (high - low) / 2
        else:
            centre, unit = median, reference.max() - median
        unit = max(unit, 1e-3 * max(abs(centre), 1.0))
        out[index] = (raw[index] - centre) / unit
        if two_sided:
            out[index] = np.abs(out[index])
    return out


def confirmed(scores: np.ndarray, k: int, n: int) -> np.ndarray:
    """The k-th largest of the last n window scores: what k-of-n confirmation compares."""
    if n == 1:
        return scores
    padded = np.concatenate([np.full(n - 1, scores[0]), scores])
    return np.sort(np.lib.stride_tricks.sliding_window_view(padded, n), axis=1)[:, n - k]


def point_scores(
    scores: np.ndarray, length: int, stride: int, size: int, mapping: str, lag: int
) -> np.ndarray:
    """Window scores (window i starts at i * stride) as one score per point."""
    starts = np.arange(len(scores)) * stride - lag * stride
    if mapping == "centre":
        centres = starts + length // 2
        midpoints = (centres[:-1] + centres[1:]) / 2
        return scores[np.searchsorted(midpoints, np.arange(size))]
    total, count = np.zeros(size + 1), np.zeros(size + 1)
    first, last = np.clip(starts, 0, size), np.clip(starts + length, 0, size)
    np.add.at(total, first, scores)
    np.add.at(total, last, -scores)
    np.add.at(count, first, 1)
    np.add.at(count, last, -1)
    total, count = np.cumsum(total)[:size], np.cumsum(count)[:size]
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", nargs="+", required=True)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    subsets = [
        terms
        for size in range(1, len(SCORE_TERMS) + 1)
        for terms in itertools.combinations(SCORE_TERMS, size)
    ]
    variants = list(itertools.product(subsets, SCALINGS, MAPPINGS, CONFIRMATIONS))
    started = time.perf_counter()
    records = []
    for entry in select_ucr(args.data, args.ids):
        series = load_ucr(entry.path)
        detector = get_detector("anomalyllm", profile=args.profile)
        train = series.values[: series.train_end]
        detector.fit(train)
        model = detector.model
        length = model.config.window_length
        # The windows fit() offered, split as trainer.train.calibrate_score splits them.
        offered = max(model.config.memory_slots, 256)
        windows = sliding_windows(train, length, max(1, (len(train) - length) // offered))
        held_back = max(1, int(len(windows) * 0.2))
        held = raw_terms(model, _thin(windows[-held_back:], MAX_CALIBRATION_WINDOWS))
        normal = raw_terms(model, windows[:-held_back], ("level", "scale"))
        total = len(series.values) - length + 1
        stride = min(MAX_SCORING_STRIDE, max(1, -(-total // detector.max_scored_windows)))
        raw = raw_terms(model, sliding_windows(series.values, length, stride))
        hits = {}
        for terms, scaling, mapping, (k, n) in variants:
            z = scaled(raw, held, normal, scaling)
            fused = z[[SCORE_TERMS.index(name) for name in terms]].max(axis=0).clip(min=0)
            lag = (n - 1) // 2
            points = point_scores(
                confirmed(fused, k, n), length, stride, len(series.values), mapping, lag
            )
            location = ucr_location(points, series.train_end)
            key = f"{'+'.join(terms)}|{scaling}|{mapping}|{k}of{n}"
            hits[key] = ucr_hit(location, series.anomaly_begin, series.anomaly_end)
        records.append({"id": series.id, "window_length": length, "hits": hits})
        default = f"{'+'.join(SCORE_TERMS)}|extreme|centre|1of1"
        print(series.id, length, "default hit" if hits[default] else "default miss", flush=True)
    totals = {key: sum(r["hits"][key] for r in records) for key in records[0]["hits"]}
    result = {
        "benchmark": "ucr score ablation (one fit per series, variants of the score)",
        "profile": args.profile,
        "series": len(records),
        "default": f"{'+'.join(SCORE_TERMS)}|extreme|centre|1of1",
        "key": "terms|scaling|point mapping|k-of-n confirmation",
        "hits": dict(sorted(totals.items(), key=lambda item: -item[1])),
        "wall_s": round(time.perf_counter() - started, 1),
        "records": records,
    }
    print(json.dumps(dict(list(result["hits"].items())[:20]), indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
