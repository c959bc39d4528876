"""How each term's edge of normal may learn, on NAB: one fit per file, every variant.

Fits the product's default model (``anomalyllm``, causal, as ``python -m trainer nab``
runs it) once per file on the probationary rows and scores its windows' terms once. Each
variant then measures the terms from the file's own edges of normal
(`AnomalyLLMDetector.with_edges` with the variant's ``edge_settings``, the
`AlertPolicy` fields of `stream_detector.alerts.adapt_terms`) and is scored as
``trainer nab --decisions alerts`` scores the default (`trainer.nab.decision_results`):
the alerts the worker's policy opens under its running quantile (swept as NAB sweeps a
detector's threshold), and under ``trainer``'s fitted threshold, adaptive and fixed.

    python benchmarks/nab_edge_variants.py --data ../shared/data/nab --profile quick \\
        --out benchmarks/results/nab_edge_variants.json

The machine-temperature integration test takes the same settings from the environment,
for example ``DETECTOR_ALERTS__TERM_LEARN_LIMIT=4 DETECTOR_ALERTS__BOUNDED_TERMS=
'["discrepancy","memory","level","scale","point"]' pytest
tests/integration/test_machine_temperature.py``.
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
from stream_detector.model import DEFAULT_SCORE_TERMS
from trainer.anomalyllm_detector import AnomalyLLMDetector, latest_window_score
from trainer.detectors import get_detector
from trainer.nab import DetectorRun, decision_results, load_corpus, warmup_windows

EVERY_TERM = list(DEFAULT_SCORE_TERMS)
# Variant -> the AlertPolicy fields its edges run with (None: the trained edges).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "default: level and scale bounded at 2, quantile 0.99": {},
    "every term bounded at 2, quantile 0.995 (stop 27)": {
        "bounded_terms": EVERY_TERM,
        "term_quantile": 0.995,
    },
    "level and scale bounded at 2, quantile 0.995 (48c84f2)": {"term_quantile": 0.995},
    "level and scale bounded at 2, quantile 0.98": {"term_quantile": 0.98},
    "level and scale bounded at 2, quantile 0.95": {"term_quantile": 0.95},
    "every term bounded at 3, quantile 0.995": {
        "bounded_terms": EVERY_TERM,
        "term_learn_limit": 3.0,
        "term_quantile": 0.995,
    },
    "every term bounded at 4, quantile 0.995": {
        "bounded_terms": EVERY_TERM,
        "term_learn_limit": 4.0,
        "term_quantile": 0.995,
    },
    "level bounded at 2, quantile 0.995": {"bounded_terms": ["level"], "term_quantile": 0.995},
    "no term bounded, quantile 0.995": {"bounded_terms": [], "term_quantile": 0.995},
    "trained edges (anomalyllm-fixed-edges)": None,
}
MODES = {"quantile": "worker's running quantile", "trained_adaptive": "trainer's, adaptive"}
MODES |= {"trained": "trainer's, fixed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--files", nargs="+", help="glob patterns (default: every file)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    corpus = load_corpus(args.data, args.files)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in VARIANTS}
    decision_rows, thresholds = [], []
    for position, series in enumerate(corpus, start=1):
        values = series.values[:, None]  # [T, 1]
        detector = get_detector("anomalyllm", args.profile, streaming=True)
        assert isinstance(detector, AnomalyLLMDetector)
        detector.fit(values[: series.probation])
        rows = detector.decision_rows(len(values))
        detector.term_warmup_windows = warmup_windows(rows, series.probation)
        stride = int(rows[1] - rows[0]) if len(rows) > 1 else 1
        trained = detector.window_scores(values, stride, adapted=False)
        for name, settings in VARIANTS.items():
            scored = trained
            if settings is not None:
                detector.edge_policy = AlertPolicy(**settings)
                scored = detector.with_edges(trained, threshold=detector.threshold)[0]
            scores[name].append(latest_window_score(scored.score, rows, len(values)))
        decision_rows.append(rows)
        thresholds.append(detector.threshold)
        print(f"[{position}/{len(corpus)}] {series.name}", flush=True)
    results = {}
    for name, raw in scores.items():
        run = DetectorRun(corpus, [], {}, True, raw, decision_rows, thresholds)
        decided = decision_results(run, AlertPolicy())
        results[name] = {
            mode: {profile: round(decided[mode][profile]["score"], 2) for profile in decided[mode]}
            for mode in MODES
        }
        print(name, json.dumps(results[name]), flush=True)
    result = {
        "benchmark": "nab edge variants (one fit per file, how each term's edge may learn)",
        "profile": args.profile,
        "files": len(corpus),
        "modes": MODES,
        "variants": VARIANTS,
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
