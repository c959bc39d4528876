"""Ablation of the fused score's terms on UCR series: one fit, every subset of terms.

Fits ``anomalyllm-fused`` with all four terms (discrepancy, memory, level, scale) once per
series, then scores the series with each subset of the terms, fused as the model fuses
them (the largest standardised term), and judges each by the UCR rule. The subsets share
the fitted networks, memory bank and term statistics, so they differ in the fusion only:

    python benchmarks/ucr_score_terms.py --data ../shared/data/ucr --ids 1 9 14 \\
        --profile quick --out benchmarks/results/ucr_score_terms.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_detector.model import _TWO_SIDED, SCORE_TERMS
from trainer.anomalyllm_detector import _mean_over_covering
from trainer.data import load_ucr
from trainer.detectors import get_detector
from trainer.evaluate import select_ucr, ucr_hit, ucr_location
from trainer.train import sliding_windows


def standardised_terms(detector, series: np.ndarray, stride: int) -> np.ndarray:
    """Each term's standardised value per window (T, W), as ``fused_score`` computes it."""
    model = detector.model
    windows = sliding_windows(series, model.config.window_length, stride)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(windows), 256):
            raw, _ = model.raw_terms(torch.from_numpy(windows[start : start + 256]))
            z = (raw - model.term_centre.unsqueeze(1)) / model.term_spread.unsqueeze(1)
            rows.append(z.amax(dim=2))  # (T, B): single-channel series
    z = torch.cat(rows, dim=1).numpy()
    for index, name in enumerate(SCORE_TERMS):
        if name in _TWO_SIDED:
            z[index] = np.abs(z[index])
    return z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", nargs="+", required=True)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    subsets = [
        terms
        for size in range(1, len(SCORE_TERMS) + 1)
        for terms in itertools.combinations(SCORE_TERMS, size)
    ]
    records = []
    for entry in select_ucr(args.data, args.ids):
        series = load_ucr(entry.path)
        detector = get_detector("anomalyllm-fused", profile=args.profile, score_terms=SCORE_TERMS)
        detector.fit(series.values[: series.train_end])
        length = detector.model.config.window_length
        z = standardised_terms(detector, series.values, args.stride)
        starts = np.arange(z.shape[1]) * args.stride
        hits = {}
        for terms in subsets:
            fused = z[[SCORE_TERMS.index(name) for name in terms]].max(axis=0).clip(min=0)
            points = _mean_over_covering(fused, starts, length, len(series.values))
            location = ucr_location(points, series.train_end)
            hits["+".join(terms)] = ucr_hit(location, series.anomaly_begin, series.anomaly_end)
        records.append({"id": series.id, "window_length": length, "hits": hits})
        print(series.id, {k: v for k, v in hits.items() if "+" not in k}, flush=True)
    totals = {
        "+".join(terms): sum(r["hits"]["+".join(terms)] for r in records) for terms in subsets
    }
    result = {
        "benchmark": "ucr score-term ablation",
        "profile": args.profile,
        "stride": args.stride,
        "series": len(records),
        "hits": totals,
        "records": records,
    }
    print(json.dumps(totals, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
