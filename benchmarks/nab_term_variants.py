"""Which terms the default fuses, on NAB: one fit per file, every variant decided.

Fits the product's default model (``anomalyllm``, causal, as ``python -m trainer nab``
runs it) once per file on the probationary rows, with ``--extra-terms`` fused as well (by
default both grain terms, ``noise`` and ``quiet``), and scores its windows' terms once.
Each variant is a list of those terms: every term is calibrated and learns its edge of
normal on its own, and the score is the largest, so a variant's rows are what a model of
those terms alone would score. Each variant is then measured from the file's own edges
(`AnomalyLLMDetector.with_edges`) and scored as ``trainer nab --decisions alerts`` scores
the default (`trainer.nab.decision_results`): the alerts the worker's policy opens under
its running quantile (swept as NAB sweeps a detector's threshold), and under
``trainer``'s threshold (peaks over threshold on the variant's own held-back scores),
adaptive and fixed.

    python benchmarks/nab_term_variants.py --data ../shared/data/nab --profile quick \\
        --out benchmarks/results/nab_term_variants.json

Stop 43 compared stop 42's default (with the two-sided ``noise`` term), the same with the
one-sided ``quiet`` term in its place, and with neither (stop 39's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.nab_edge_variants import MODES
from stream_detector.config import AlertPolicy
from stream_detector.model import DEFAULT_SCORE_TERMS, GRAIN_TERMS, SCORE_TERMS
from trainer.anomalyllm_detector import AnomalyLLMDetector, latest_window_score
from trainer.detectors import get_detector
from trainer.nab import DetectorRun, decision_results, load_corpus, warmup_windows
from trainer.thresholds import ThresholdConfig, pot_threshold

# The terms every variant shares: the default's but for the grain's.
_SHARED = tuple(term for term in DEFAULT_SCORE_TERMS if term not in GRAIN_TERMS)
VARIANTS = {
    "default (noise, stop 42)": (*_SHARED, "noise"),
    "default with quiet instead of noise": (*_SHARED, "quiet"),
    "default without noise (stop 39)": _SHARED,
}


def held_back_scores(detector: AnomalyLLMDetector, train: np.ndarray) -> np.ndarray:
    """Each term of the held-back training windows (H, T), as ``trainer``'s threshold
    reads them (`AnomalyLLMDetector._threshold`)."""
    model = detector.model
    windows = detector.training_windows(
        train, model.config.window_length, model.config.memory_slots
    )
    return model.score_windows(detector.held_back(windows), detector.batch_size).terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--files", nargs="+", help="glob patterns (default: every file)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--extra-terms", nargs="+", default=list(GRAIN_TERMS), choices=SCORE_TERMS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    names = (*DEFAULT_SCORE_TERMS, *(t for t in args.extra_terms if t not in DEFAULT_SCORE_TERMS))
    missing = {term for terms in VARIANTS.values() for term in terms} - set(names)
    if missing:
        parser.error(f"the variants need --extra-terms {' '.join(sorted(missing))}")
    columns = {name: [names.index(term) for term in terms] for name, terms in VARIANTS.items()}
    corpus = load_corpus(args.data, args.files)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
    thresholds: dict[str, list[float | None]] = {name: [] for name in VARIANTS}
    decision_rows = []
    for position, series in enumerate(corpus, start=1):
        values = series.values[:, None]  # [T, 1]
        detector = get_detector("anomalyllm", args.profile, streaming=True, score_terms=names)
        assert isinstance(detector, AnomalyLLMDetector)
        train = values[: series.probation]
        detector.fit(train)
        rows = detector.decision_rows(len(values))
        detector.term_warmup_windows = warmup_windows(rows, series.probation)
        stride = int(rows[1] - rows[0]) if len(rows) > 1 else 1
        trained = detector.window_scores(values, stride, adapted=False)
        held = held_back_scores(detector, train)
        for name, kept in columns.items():
            threshold = pot_threshold(held[:, kept].max(axis=1).clip(min=0), ThresholdConfig())
            variant = trained._replace(
                terms=trained.terms[:, kept], term_offsets=trained.term_offsets[:, kept]
            )
            terms = tuple(names[column] for column in kept)
            scored = detector.with_edges(variant, threshold=threshold.threshold, names=terms)[0]
            scores[name].append(latest_window_score(scored.score, rows, len(values)))
            thresholds[name].append(threshold.threshold)
        decision_rows.append(rows)
        print(f"[{position}/{len(corpus)}] {series.name}", flush=True)
    results = {}
    for name, raw in scores.items():
        run = DetectorRun(corpus, [], {}, True, raw, decision_rows, thresholds[name])
        decided = decision_results(run, AlertPolicy())
        results[name] = {
            mode: {
                profile_name: {
                    key: decided[mode][profile_name][key]
                    for key in ("score", "detected_windows", "false_positives")
                }
                for profile_name in decided[mode]
            }
            for mode in MODES
        }
        print(name, json.dumps(results[name]["quantile"]), flush=True)
    result = {
        "benchmark": "nab term variants (one fit per file, which terms the default fuses)",
        "profile": args.profile,
        "files": len(corpus),
        "fitted_terms": list(names),
        "variants": {name: list(terms) for name, terms in VARIANTS.items()},
        "modes": MODES,
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
