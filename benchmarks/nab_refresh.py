"""NAB with and without the streaming refresh: one fit per file, scored both ways.

The product's default model (``anomalyllm``, causal, as ``python -m trainer nab`` runs
it) is fit once per file on the probationary rows. It then scores the file three times:
as fitted (refresh off); refreshed every ``--every`` rows on the trailing ``--span``
rows minus the alerts the worker's policy raised (`AnomalyLLMDetector.refresh_every`,
which calls the same `trainer.train.refresh` as ``python -m trainer refresh``); and the
same, but an alert open for more than ``--learn-after`` rows is trained on after those
rows, as a change of regime (`AnomalyLLMDetector.refresh_learn_after`). The
peers (windowedGaussian, HalfSpaceTrees) run in the same process. Every score goes
through the harness's path: `trainer.nab.causal_rank` and NAB's three profiles.

    python benchmarks/nab_refresh.py --data ../shared/data/nab --profile quick \\
        --out benchmarks/results/nab_refresh.json

The defaults, a day of 5-minute readings and the week before it, are the nightly
CronJob's cadence and ``--since 7d``; an alert is learnt after a day.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.detectors import get_detector
from trainer.nab import causal_rank, load_corpus, run_detector, score_corpus

PEERS = ("gaussian", "hst")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--files", nargs="+", help="glob patterns (default: every file)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--every", type=int, default=288, help="rows between refreshes")
    parser.add_argument("--span", type=int, default=2016, help="trailing rows a refresh reads")
    parser.add_argument(
        "--learn-after", type=int, default=288, help="rows after which an alert is trained on"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["refresh, alerts left out", "refresh, alerts learnt after --learn-after"],
        help="what to compare with refresh off",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    corpus = load_corpus(args.data, args.files)
    every = {"refresh_every": args.every, "refresh_memory_only": False}
    variants = {
        "refresh off": {"refresh_every": None},
        "refresh, alerts left out": every | {"refresh_learn_after": None},
        "refresh, alerts learnt after --learn-after": every
        | {"refresh_learn_after": args.learn_after},
        "refresh of the memory bank only": every
        | {"refresh_learn_after": None, "refresh_memory_only": True},
    }
    variants = {name: variants[name] for name in ["refresh off", *args.variants]}
    likelihoods: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    seconds = {"fit": 0.0} | {name: 0.0 for name in variants}
    for position, series in enumerate(corpus, start=1):
        values = series.values[:, None]  # [T, 1]
        detector = get_detector("anomalyllm", args.profile, streaming=True, refresh_span=args.span)
        clock = time.perf_counter()
        detector.fit(values[: series.probation])
        seconds["fit"] += time.perf_counter() - clock
        for variant, settings in variants.items():
            for name, value in settings.items():
                setattr(detector, name, value)
            clock = time.perf_counter()
            likelihoods[variant].append(causal_rank(detector.score(values)))
            seconds[variant] += time.perf_counter() - clock
        print(f"[{position}/{len(corpus)}] {series.name}", flush=True)
    windows = [series.windows for series in corpus]
    for peer in PEERS:
        clock = time.perf_counter()
        likelihoods[peer] = run_detector(corpus, peer, profile=args.profile).likelihoods
        seconds[peer] = time.perf_counter() - clock
    results = {}
    for name, scores in likelihoods.items():
        profiles = score_corpus(scores, windows)
        results[name] = {profile: round(result.score, 2) for profile, result in profiles.items()}
    result = {
        "benchmark": "nab: the default model with and without the streaming refresh",
        "profile": args.profile,
        "files": len(corpus),
        "refresh": {
            "every_rows": args.every,
            "span_rows": args.span,
            "learn_after_rows": args.learn_after,
        },
        "scores": results,
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
