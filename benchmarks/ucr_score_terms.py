"""Ablation of the default score on UCR series: one fit per series, every choice on and off.

Fits the product's default model (``anomalyllm``) once per series, computes every
term's raw value (``SCORE_TERMS``, in the default or not) for every scored window and
for the normal windows it was calibrated on, then re-scores the series under each
variant and judges it by the UCR rule. The variants share the fitted networks and
memory bank, so they differ only in:

- which terms are fused (every subset of discrepancy, memory, level, scale, tail, point,
  steps, and the default with short_steps);
- how a term is put on the common scale: ``extreme`` (the model's: 1 is the most extreme
  normal window) or ``robust-z`` (median and 1.4826 MAD, the previous default);
- the smallest unit a term may have: ``errors`` (the model's: three sampling errors of a
  window, `stream_detector.model.spread_floor`) or ``relative`` (1e-3 of the term's
  centre, the previous floor);
- how window scores become point scores: ``peak`` (the harness's rule: the window whose
  peak, ``Scores.peak_offset``, lies nearest: where its largest term's cause lies) or
  ``mean`` (the mean over covering windows, an earlier rule);
- the alert path's k-of-n confirmation applied to the score (the k-th largest of the
  last n windows), off (1 of 1) or the worker's default (3 of 5).

These variants keep the trained scale of every term (``anomalyllm-fixed-edges``). The
default (``DEFAULT_KEY``) also measures each term from the series' own edges of normal,
window by window (`stream_detector.alerts.adapt_terms`, as the worker and the harness's
detector do); ``edges`` records both, and the default with each of stop 37's changes off
measured the same way (``EDGE_ROWS``; stop 37's changes off and the grain term off
as well, so their rows reproduce), without the memory term's recurrence
(``adapted_without_recurrence``, stop 39: the recent windows never filled), and with the
grain term's cause at the window's centre (``adapted_grain_centre``, stops 42 and 43);
the default variant is exactly what the harness's ``anomalyllm`` computes, its recent
windows refilled as the harness refills them
(`benchmarks.score_ablation.recurring_raw_terms`).
``--peer`` runs other detectors (``discord``, ``discord-self``) on the same series in the
same run; ``--jobs N`` fits N series at a time, each in a process of its own with one torch
thread (the records keep the order of ``--ids``). With ``--out``, each series' record is
also appended to ``<out>.partial.jsonl`` as it is finished, and a run started again with
the same arguments skips the series recorded there (the file is removed once the result
is written; ``wall_s`` adds the time the earlier runs took to record them).

    python benchmarks/ucr_score_terms.py --data ../shared/data/ucr --ids 1 9 14 ... 250 \\
        --profile quick --peer discord --peer discord-self \\
        --out benchmarks/results/ucr_score_terms_dev.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.score_ablation import (
    FLOORS,
    SCALINGS,
    SUBSETS,
    NormalTerms,
    fused,
    fused_peak,
    memory_patch_offsets,
    raw_terms,
    recurring_raw_terms,
)
from stream_detector.model import DEFAULT_SCORE_TERMS, GRAIN_TERMS, SCORE_TERMS, WindowScores
from trainer.anomalyllm_detector import MAX_SCORING_STRIDE, nearest_peak_score
from trainer.data import load_ucr
from trainer.detectors import get_detector
from trainer.evaluate import evaluate_ucr_series, select_ucr, ucr_hit, ucr_location
from trainer.train import sliding_windows

MAPPINGS = ("peak", "mean")
CONFIRMATIONS = ((1, 1), (3, 5))
DEFAULT_KEY = f"{'+'.join(DEFAULT_SCORE_TERMS)}|extreme|errors|peak|1of1"
# The default measured from the series' own edges ("adapted"), without its grain term
# (stop 43's quiet; the default of stops 39 to 41) or with stop 42's noise term in its
# place, and from the same fits without it and with each of stop 37's changes off (the
# second steps term; the memory term placed at the window's centre rather than at the
# stretch that differs most from the nearest bank window), with both off (the default of
# stops 30 to 36), without either steps term, and with the grain term's cause at the
# window's centre (stops 42 and 43). Name -> (terms, where the causes lie: as the model
# places them, or with that one change).
_STOP39 = tuple(term for term in DEFAULT_SCORE_TERMS if term not in GRAIN_TERMS)
_WITHOUT_SHORT = tuple(term for term in _STOP39 if term != "short_steps")
EDGE_ROWS = {
    "adapted": (DEFAULT_SCORE_TERMS, "model"),
    "adapted_without_grain": (_STOP39, "model"),
    "adapted_noise_instead": ((*_STOP39, "noise"), "model"),
    "adapted_without_short_steps": (_WITHOUT_SHORT, "model"),
    "adapted_memory_at_patch": (_STOP39, "memory_at_patch"),
    "adapted_stop30": (_WITHOUT_SHORT, "memory_at_patch"),
    "adapted_without_steps": (tuple(t for t in _WITHOUT_SHORT if t != "steps"), "model"),
    "adapted_grain_centre": (DEFAULT_SCORE_TERMS, "grain_centre"),
}


def trained_scores(z: np.ndarray, offsets: np.ndarray, terms: tuple[str, ...]) -> WindowScores:
    """The window scores of ``terms`` fused on their trained scale, as the model gives them."""
    rows = [SCORE_TERMS.index(term) for term in terms]
    return WindowScores(fused(z, terms), fused_peak(z, offsets, terms), z[rows].T, offsets[rows].T)


def confirmed(scores: np.ndarray, k: int, n: int) -> np.ndarray:
    """The k-th largest of the last n window scores: what k-of-n confirmation compares."""
    if n == 1:
        return scores
    padded = np.concatenate([np.full(n - 1, scores[0]), scores])
    return np.sort(np.lib.stride_tricks.sliding_window_view(padded, n), axis=1)[:, n - k]


def point_scores(
    scores: np.ndarray,
    peaks: np.ndarray,
    length: int,
    stride: int,
    size: int,
    mapping: str,
    lag: int,
) -> np.ndarray:
    """Window scores (window i starts at i * stride, peaks at ``peaks[i]`` from its start)
    as one score per point."""
    starts = np.arange(len(scores)) * stride - lag * stride
    if mapping == "peak":
        return nearest_peak_score(scores, starts + peaks, size)
    total, count = np.zeros(size + 1), np.zeros(size + 1)
    first, last = np.clip(starts, 0, size), np.clip(starts + length, 0, size)
    np.add.at(total, first, scores)
    np.add.at(total, last, -scores)
    np.add.at(count, first, 1)
    np.add.at(count, last, -1)
    total, count = np.cumsum(total)[:size], np.cumsum(count)[:size]
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def series_record(path: Path, profile: str, peers: list[str]) -> dict:
    """Fit the default model on one series and judge every variant: its record."""
    variants = itertools.product(SUBSETS, SCALINGS, FLOORS, MAPPINGS, CONFIRMATIONS)
    series = load_ucr(path)
    detector = get_detector("anomalyllm", profile=profile)
    train = series.values[: series.train_end]
    detector.fit(train)
    model = detector.model
    length = model.config.window_length
    normal = NormalTerms.of(detector, train)
    total = len(series.values) - length + 1
    stride = min(MAX_SCORING_STRIDE, max(1, -(-total // detector.max_scored_windows)))
    windows = sliding_windows(series.values, length, stride)
    rows = len(series.values)
    raw, offsets = recurring_raw_terms(model, windows, stride, series.train_end, rows)
    hits = {}
    scalings = {
        (scaling, floor): normal.scaled(raw, scaling, floor)
        for scaling, floor in itertools.product(SCALINGS, FLOORS)
    }
    for terms, scaling, floor, mapping, (k, n) in variants:
        z = scalings[scaling, floor]
        score, peaks = fused(z, terms), fused_peak(z, offsets, terms)
        lag = (n - 1) // 2
        points = point_scores(
            confirmed(score, k, n), peaks, length, stride, len(series.values), mapping, lag
        )
        location = ucr_location(points, series.train_end)
        key = f"{'+'.join(terms)}|{scaling}|{floor}|{mapping}|{k}of{n}"
        hits[key] = ucr_hit(location, series.anomaly_begin, series.anomaly_end)
    z = scalings["extreme", "errors"]
    placed = {"model": offsets, "memory_at_patch": offsets.copy(), "grain_centre": offsets.copy()}
    placed["memory_at_patch"][SCORE_TERMS.index("memory")] = memory_patch_offsets(model, windows)
    placed["grain_centre"][[SCORE_TERMS.index(term) for term in GRAIN_TERMS]] = length // 2
    scored_by = {
        name: detector.with_edges(
            trained_scores(z, placed[placement], terms),
            threshold=detector.threshold,
            names=terms,
        )[0]
        for name, (terms, placement) in EDGE_ROWS.items()
    }
    scored_by["fixed"] = trained_scores(z, offsets, DEFAULT_SCORE_TERMS)
    once = normal.scaled(raw_terms(model, windows)[0], "extreme", "errors")
    scored_by["adapted_without_recurrence"] = detector.with_edges(
        trained_scores(once, offsets, DEFAULT_SCORE_TERMS), threshold=detector.threshold
    )[0]
    edges = {}
    for name, scored in scored_by.items():
        points = point_scores(
            scored.score, scored.peak_offset, length, stride, len(series.values), "peak", 0
        )
        location = ucr_location(points, series.train_end)
        edges[name] = ucr_hit(location, series.anomaly_begin, series.anomaly_end)
    hits[DEFAULT_KEY] = edges["adapted"]
    found = {
        name: evaluate_ucr_series(get_detector(name, profile=profile), series, {})["hit"]
        for name in peers
    }
    print(series.id, length, "default hit" if hits[DEFAULT_KEY] else "default miss", flush=True)
    return {"id": series.id, "window_length": length, "hits": hits, "edges": edges, "peers": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", nargs="+", required=True)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        help="a detector to run on the same series in the same run, e.g. discord",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="series fitted side by side, one process each"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    entries = select_ucr(args.data, args.ids)
    partial = args.out.with_name(args.out.name + ".partial.jsonl") if args.out else None
    done, earlier_s = _recorded(partial, args.profile, args.peer)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    tasks = [(e.path, args.profile, args.peer) for e in entries if e.id not in done]
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            # Spawned, not forked: each process starts its own torch, one thread each.
            pool = stack.enter_context(
                multiprocessing.get_context("spawn").Pool(args.jobs, _one_thread)
            )
            finished = pool.imap_unordered(_series_record, tasks)
        else:
            finished = map(_series_record, tasks)
        for record in finished:
            done[record["id"]] = record
            if partial:
                line = {
                    "profile": args.profile,
                    "peers": args.peer,
                    "run": run,
                    "run_s": round(time.perf_counter() - started, 1),
                }
                with partial.open("a") as file:
                    file.write(json.dumps(line | {"record": record}) + "\n")
    records = [done[entry.id] for entry in entries]
    totals = {key: sum(r["hits"][key] for r in records) for key in records[0]["hits"]}
    result = {
        "benchmark": "ucr score ablation (one fit per series, variants of the score)",
        "profile": args.profile,
        "series": len(records),
        "default": DEFAULT_KEY,
        "key": "terms|scaling|unit floor|point mapping|k-of-n confirmation",
        "hits": dict(sorted(totals.items(), key=lambda item: -item[1])),
        "edges": {name: sum(r["edges"][name] for r in records) for name in records[0]["edges"]},
        "peer_hits": {name: sum(r["peers"][name] for r in records) for name in args.peer},
        "wall_s": round(time.perf_counter() - started + earlier_s, 1),
        "jobs": args.jobs,
        "records": records,
    }
    print(json.dumps(dict(list(result["hits"].items())[:20]), indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        partial.unlink(missing_ok=True)


def _series_record(task: tuple[Path, str, list[str]]) -> dict:
    """`series_record` of one task, with the seconds it took."""
    started = time.perf_counter()
    record = series_record(*task)
    return record | {"wall_s": round(time.perf_counter() - started, 1)}


def _recorded(
    partial: Path | None, profile: str, peers: list[str]
) -> tuple[dict[int, dict], float]:
    """The records that earlier runs with the same profile and peers left in ``partial``
    (by series id), and how long those runs took to record them."""
    if partial is None or not partial.exists():
        return {}, 0.0
    done, runs = {}, {}
    for line in partial.read_text().splitlines():
        entry = json.loads(line)
        if entry["profile"] == profile and entry["peers"] == peers:
            done[entry["record"]["id"]] = entry["record"]
            runs[entry["run"]] = max(runs.get(entry["run"], 0.0), entry["run_s"])
    return done, sum(runs.values())


def _one_thread() -> None:
    torch.set_num_threads(1)


if __name__ == "__main__":
    main()
