"""Ablation of the default score on NAB: one fit per file, every subset of terms.

Fits the product's default model (``anomalyllm``, causal, as ``python -m trainer nab``
runs it) once per file on the probationary rows, computes every term's raw value for
each scored window and for the normal windows it was calibrated on, then re-scores the
corpus under each variant: which terms are fused (every subset of ``SCORE_TERMS``) and
the smallest unit a term may have (``errors``, the model's, or ``relative``, the
previous rule). Each variant goes through the harness's path: the latest window's score
per row, `trainer.nab.causal_rank`, and NAB's three profiles.

    python benchmarks/nab_score_terms.py --data ../shared/data/nab --profile quick \\
        --out benchmarks/results/nab_score_terms.json

``--tail-readings stride`` makes the tail and point terms weigh the newest ``stride``
readings of each window (the readings that arrived since the previous scored window)
instead of the harness's newest 16 (``16``: the worker's default stride, at most the
window length - 1).

``--decisions`` also scores the variants of ``DECISION_VARIANTS`` the way the product
decides (`trainer.nab.decision_results`: the alerts the worker's default policy opens,
its running-quantile threshold swept as NAB sweeps a detector's threshold);
``--decision-variants`` names other keys. The unit floors ``level-sigmaK`` keep the
level term's unit at least K times the channel's spread (`score_ablation.LEVEL_FLOORS`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.score_ablation import FLOORS, LEVEL_FLOORS, SUBSETS, NormalTerms, fused, raw_terms
from stream_detector.config import AlertPolicy
from stream_detector.model import DEFAULT_SCORE_TERMS
from trainer.anomalyllm_detector import (
    MAX_SCORING_STRIDE,
    choose_window_length,
    latest_window_score,
)
from trainer.detectors import get_detector
from trainer.nab import DetectorRun, causal_rank, decision_results, load_corpus, score_corpus
from trainer.train import sliding_windows

DEFAULT_KEY = f"{'+'.join(DEFAULT_SCORE_TERMS)}|errors"
# Scored by the worker's alert policy too (--decisions): the default before the point
# term, each of its terms off, the tail or the point term on, and the best likelihood
# subset of an earlier ablation.
DECISION_VARIANTS = (
    "discrepancy+memory+level+scale|errors",
    "memory+level+scale|errors",
    "discrepancy+level+scale|errors",
    "discrepancy+memory+scale|errors",
    "discrepancy+memory+level|errors",
    "discrepancy+memory+level+scale+tail|errors",
    "discrepancy+memory+level+scale+point|errors",
    "discrepancy+level|errors",
    "memory+level+scale+point|errors",
    "discrepancy+level+scale+point|errors",
    "discrepancy+memory+scale+point|errors",
    "discrepancy+memory+level+point|errors",
    "point|errors",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--files", nargs="+", help="glob patterns (default: every file)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--tail-readings", choices=("16", "stride"), default="16")
    parser.add_argument("--decisions", action="store_true", help="see the module docstring")
    parser.add_argument(
        "--decision-variants",
        nargs="+",
        default=DECISION_VARIANTS,
        help="'terms|unit floor' keys to decide (default: DECISION_VARIANTS)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    corpus = load_corpus(args.data, args.files)
    floors = (*FLOORS, *LEVEL_FLOORS)
    variants = list(itertools.product(SUBSETS, floors))
    points: dict[str, list[np.ndarray]] = {f"{'+'.join(t)}|{f}": [] for t, f in variants}
    decision_rows: list[np.ndarray] = []
    for position, series in enumerate(corpus, start=1):
        values = series.values[:, None]  # [T, 1]
        detector = get_detector("anomalyllm", args.profile, streaming=True)
        train = values[: series.probation]
        length = detector.window_length or choose_window_length(train)
        total = len(values) - length + 1
        stride = min(MAX_SCORING_STRIDE, max(1, math.ceil(total / detector.max_scored_windows)))
        if args.tail_readings == "stride":
            detector.model_settings["tail_readings"] = stride
        detector.fit(train)
        normal = NormalTerms.of(detector, train)
        assert detector.model.config.window_length == length
        raw = raw_terms(detector.model, sliding_windows(values, length, stride))[0]
        ends = np.arange(raw.shape[1]) * stride + length - 1
        decision_rows.append(ends)
        scalings = {floor: normal.scaled(raw, "extreme", floor) for floor in floors}
        for terms, floor in variants:
            score = fused(scalings[floor], terms)
            points[f"{'+'.join(terms)}|{floor}"].append(
                latest_window_score(score, ends, len(values))
            )
        print(f"[{position}/{len(corpus)}] {series.name} window {length}", flush=True)
    windows = [series.windows for series in corpus]
    results = {}
    for key, scores in points.items():
        profiles = score_corpus([causal_rank(score) for score in scores], windows)
        results[key] = {name: round(result.score, 2) for name, result in profiles.items()}
    ranked = dict(sorted(results.items(), key=lambda item: -item[1]["standard"]))
    decisions = {}
    if args.decisions:
        for key in args.decision_variants:
            run = DetectorRun(
                corpus, [], {}, True, points[key], decision_rows, [None] * len(corpus)
            )
            best = decision_results(run, AlertPolicy())["quantile"]
            decisions[key] = {name: round(best[name]["score"], 2) for name in best}
            print("decisions", key, decisions[key], flush=True)
    result = {
        "benchmark": "nab score ablation (one fit per file, variants of the score)",
        "profile": args.profile,
        "files": len(corpus),
        "default": DEFAULT_KEY,
        "key": "terms|unit floor",
        "tail_readings": args.tail_readings,
        "scores": ranked,
        "decisions_default_policy_running_quantile": decisions,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(dict(list(ranked.items())[:15]), indent=1))
    print("default", DEFAULT_KEY, results[DEFAULT_KEY])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
