"""Candidate score terms and window scales on UCR series, without training a network.

The default score's memory, level, scale and point terms read no network, so they can be
tried on many series in minutes: this script builds the default model's bank and
calibration (`trainer.train.calibrate_score`, as `trainer fit` does) on a tiny random
backbone, leaves the discrepancy out (it is the one term a network gives, and on the UCR
development set the default without it finds 28 of 42, one more than with it), and scores
each series under these variants, judged by the UCR rule:

- ``baseline``: memory, level, scale and point, as the model fuses them;
- ``scales``: the same at half and at twice the window as well (one bank and calibration
  per length; each point takes the largest of the scales' scores);
- ``left_join``: the memory term also matches the series' own earlier windows (those
  ending before the scored one starts), as a streaming bank that learnt every window
  it saw would;
- ``roughness``: a two-sided term, the log spread of the window's first differences (raw
  units), normal range from the bank and held-back windows like level and scale;
- ``relative_roughness``: the same, divided by the window's spread (a shape statistic);
- ``difference_memory``: the memory term on first differences (one-sided, its unit from
  the held-back windows as the memory term's);
- ``difference_memory_only``: that term instead of the memory term;
- ``tail_probability``: the four terms fused on another common scale: each window's
  surprisal -log10 P(a normal window is at least as extreme), from the term's normal
  windows (the empirical distribution, and above its 90th percentile a generalised Pareto
  tail fitted to the excesses, as `trainer.thresholds` fits the score's tail), so a term
  whose normal values have a heavy tail and a term calibrated on more windows are put on
  one footing;
- ``level_sigma1``, ``level_sigma2``, ``level_sigma3``: the baseline with the level term's
  unit at least 1, 2 or 3 times the channel's spread over the normal windows
  (``ModelConfig.level_unit_sigmas``), a model of its own;
- ``edges``: the baseline's terms measured from the series' own edges of normal, window
  by window (`stream_detector.alerts.adapt_terms` with the default ``AlertPolicy``, as
  the worker and the harness's ``anomalyllm`` do; the baseline keeps the trained edges);
- ``edges_q95``, ``edges_q999``: the same edges at the running 0.95 or 0.999 quantile;
- ``edges_ratio_max``: each term divided by its edge instead of shifted down by its rise,
  the edge being the largest value the term has learnt so far (a window scores by how
  far it breaks its term's record; level and scale learn only values up to 2, as in the
  default);
- ``edges_scales``: the edges at each of the three window lengths of ``scales``, each
  point taking the largest of their scores;
- ``edges_top2``: with the edges, a window's score is its largest term plus half its
  second largest (the terms agreeing count);
- ``steps``, ``edges_steps``: the baseline, and ``edges``, with the model's "steps" term
  fused as well (`AnomalyLLM._steps_distance`: the changes between the window's newest
  readings against the nearest stretch of the bank's, in the channel's units; a model of
  its own, calibrated like the others; the default since stop 30);
- ``edges_steps_eighth``: ``edges_steps`` with the steps term over the newest eighth of
  the window instead of a quarter (``ModelConfig.steps_fraction``);
- ``edges_steps_two_lengths``: ``edges_steps`` with a second steps term, over the newest
  eighth, fused as a seventh term (its own calibration and edge);
- ``edges_steps_q95``, ``edges_steps_two_lengths_q95``: those two with the edges at the
  running 0.95 quantile (``AlertPolicy.term_quantile``; the default is 0.99);
- ``edges_steps_memory_centre``: ``edges_steps`` with a window whose largest term is the
  memory placed at its centre instead of the stretch that differs most from the nearest
  bank window (stop 36);
- ``edges_steps_two_lengths_memory_centre``: both of the last stop's near misses at once:
  the second steps term of ``edges_steps_two_lengths`` and the memory windows placed at
  their centre (stop 37; the default since, and every other variant places them as the
  model did before: at the patch-long stretch that differs most from the nearest bank
  window, `benchmarks.score_ablation.memory_patch_offsets`);
- ``default``: the product's default of stops 39 to 41 as one model, as `trainer fit`
  builds it (both steps terms, the memory at the window's centre, the default's edges,
  and since stop 39 the memory term's recurrence, its recent windows refilled as the
  harness's detector refills them, `benchmarks.score_ablation.recurring_raw_terms`),
  less the discrepancy;
- ``default_without_recurrence``: stop 37's default, the same without the recurrence: it
  finds what ``edges_steps_two_lengths_memory_centre`` finds, series for series;
- ``default_neighbourhood``: the default with each window's score raised by a quarter of
  the mean score of the windows within half a window length around it (stop 41: a
  labelled stretch's neighbours are raised with it, a lone window's are not);
- ``default_noise``: the default with stop 42's noise term (the log of the window's
  median absolute second difference, two-sided, calibrated as the scale term is; the
  product's ``noise``): a smoothed, interpolated or frozen signal, or a noisier one;
- ``default_quiet``: the default with the one-sided ``quiet`` term instead (stop 43, the
  product's default since: the same grain, counted only where it falls below its normal
  range, minus the log of the median absolute second difference, calibrated as the
  point term is): a smoothed, interpolated or frozen signal alone;
- ``default_noise_centre``, ``default_quiet_centre``: those two with their grain term's
  cause at the window's centre, as stops 42 and 43 placed it (stop 44 places it at the
  window's patch-long stretch of finest grain, or coarsest where the noise term is above
  its normal middle);
- ``edges_steps_newest_shape``: ``edges_steps`` plus a seventh term, the memory term of
  the window's newest quarter alone: its z-normalised readings against the nearest of
  the bank windows' stretches as long (every eighth of a stretch apart, at most 20,000),
  one-sided, its unit from the held-back windows as the memory term's;
- ``edges_steps_forecast``: ``edges_steps`` plus a forecast term: an autoregressive model
  of order 32 (at most half the window; ridge least squares on the bank's windows, in
  units of the bank's spread) predicts each of the newest quarter's readings from the
  window's readings before it, and the term is the root-mean-square error, one-sided,
  its unit from the held-back windows.

Each point takes the score of the window whose peak lies nearest
(`trainer.anomalyllm_detector`), as the harness does. It ran before any of these was
built into the product (the level units: with their model option, stop 25). Two became
the default: ``edges_steps`` in stop 30 and ``edges_steps_two_lengths_memory_centre`` in
stop 37 (README, "Candidate terms" and "The level term's unit").

    python benchmarks/ucr_candidate_terms.py --data ../shared/data/ucr --ids 1 9 14 ... 250 \\
        --out benchmarks/results/ucr_candidate_terms_dev.json

``--variants`` scores only those named (and the baseline), ``--peer`` runs a harness
detector on the same series in the same run, and without ``--ids`` every series in the
folder is scored (the whole archive: README, "The whole archive, without a network").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import uniform_filter1d
from scipy.stats import genpareto

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.score_ablation import memory_patch_offsets, raw_terms, recurring_raw_terms
from stream_detector.alerts import SensorAlertState, adapt_terms, edge_rise
from stream_detector.config import AlertPolicy
from stream_detector.devtools.tiny import tiny_config
from stream_detector.model import (
    GRAIN_TERMS,
    MODEL_FREE_TERMS,
    AnomalyLLM,
    WindowScores,
    instance_norm,
)
from trainer.anomalyllm_detector import (
    MAX_SCORING_STRIDE,
    PATCHES_PER_WINDOW,
    AnomalyLLMDetector,
    choose_window_length,
    nearest_peak_score,
)
from trainer.data import load_ucr
from trainer.detectors import get_detector
from trainer.evaluate import evaluate_ucr_series, select_ucr, ucr_hit, ucr_location
from trainer.train import calibrate_score, profile, sliding_windows

TERMS = ("memory", "level", "scale", "point")
SCALES = (0.5, 1.0, 2.0)
MAX_SCORED_WINDOWS = 1024  # the quick profile's, as in the harness
# The default's variants are rows of one model with both grain terms (``GRAIN_TERMS``):
# each term is calibrated and learns its edge on its own, so a model of fewer terms has
# the same rows.
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "scales": ("scales",),
    "left_join": ("left_join",),
    "roughness": ("roughness",),
    "relative_roughness": ("relative_roughness",),
    "difference_memory": ("difference_memory",),
    "difference_memory_only": ("difference_memory", "-memory"),
    "tail_probability": ("tail_probability",),
    "edges": ("edges",),
    "edges_q95": ("edges", "q95"),
    "edges_q999": ("edges", "q999"),
    "edges_ratio_max": ("ratio_max",),
    "edges_scales": ("edges", "scales"),
    "edges_top2": ("edges", "top2"),
    "steps": ("steps",),
    "edges_steps": ("edges", "steps"),
    "edges_steps_eighth": ("edges", "steps", "eighth"),
    "edges_steps_two_lengths": ("edges", "steps", "two_lengths"),
    "edges_steps_q95": ("edges", "steps", "q95"),
    "edges_steps_two_lengths_q95": ("edges", "steps", "two_lengths", "q95"),
    "edges_steps_memory_centre": ("edges", "steps", "memory_centre"),
    "edges_steps_two_lengths_memory_centre": ("edges", "steps", "two_lengths", "memory_centre"),
    "default": ("edges", "default"),
    "default_without_recurrence": ("edges", "default", "-recurrence"),
    "default_neighbourhood": ("edges", "default", "neighbourhood"),
    "default_noise": ("edges", "default", "noise"),
    "default_quiet": ("edges", "default", "quiet"),
    "default_noise_centre": ("edges", "default", "noise", "grain_centre"),
    "default_quiet_centre": ("edges", "default", "quiet", "grain_centre"),
    "edges_steps_newest_shape": ("edges", "steps", "newest_shape"),
    "edges_steps_forecast": ("edges", "steps", "forecast"),
}
EDGE_QUANTILES = {"q95": 0.95, "q999": 0.999}
# The baseline as a model of its own with ``level_unit_sigmas`` at these values.
LEVEL_UNITS = {"level_sigma1": 1.0, "level_sigma2": 2.0, "level_sigma3": 3.0}
VARIANTS.update({name: (name,) for name in LEVEL_UNITS})
MAX_SURPRISAL = 300.0
# ``default_neighbourhood``: a window's score plus this share of the mean score of the
# windows within this many window lengths around it (the default's edges).
NEIGHBOURHOOD_WEIGHT = 0.25
NEIGHBOURHOOD_SPAN = 0.5
TAIL_FROM = 0.9  # the quantile of the normal values above which the Pareto tail is fitted


class Scored:
    """One window length's calibrated terms (T, N), their peaks, and what built them."""

    def __init__(
        self,
        values: np.ndarray,
        train_end: int,
        length: int,
        level_unit_sigmas: float = 0.0,
        terms: tuple[str, ...] = TERMS,
        steps_fraction: int = 4,
        memory_at_patch: bool = True,
        recurring: bool = False,
    ) -> None:
        self.terms = terms
        config = tiny_config(
            level_unit_sigmas=level_unit_sigmas,
            window_length=length,
            patch_length=length // PATCHES_PER_WINDOW,
            patch_stride=length // PATCHES_PER_WINDOW,
            score_terms=terms,
            steps_fraction=steps_fraction,
            tail_readings=min(MAX_SCORING_STRIDE, length - 1),
        )
        torch.manual_seed(0)
        self.model = AnomalyLLM.from_config(config).eval()
        train = values[:train_end]
        offered = AnomalyLLMDetector(profile_name="quick").training_windows(
            train, length, config.memory_slots
        )
        fraction = profile("quick").validation_fraction
        calibrate_score(self.model, offered, fraction)
        held = max(1, int(len(offered) * fraction))
        self.bank, self.held = offered[:-held], offered[-held:]
        self.length = length
        total = len(values) - length + 1
        self.stride = min(MAX_SCORING_STRIDE, max(1, math.ceil(total / MAX_SCORED_WINDOWS)))
        self.windows = sliding_windows(values, length, self.stride)
        if recurring:
            self.raw, self.peaks = recurring_raw_terms(
                self.model, self.windows, self.stride, train_end, len(values), self.terms
            )
        else:
            self.raw, self.peaks = raw_terms(self.model, self.windows, self.terms)  # (T, N) each
        # Every variant but ``memory_centre`` and ``default`` places the memory term as the
        # defaults before stop 37 did, so their rows reproduce.
        if memory_at_patch and "memory" in self.terms:
            self.peaks[self.terms.index("memory")] = memory_patch_offsets(self.model, self.windows)
        with torch.inference_mode():
            z = self.model.scaled_terms(torch.from_numpy(self.raw).unsqueeze(-1))
        self.z = z[:, :, 0].numpy()
        # The normal windows each term is calibrated on (`AnomalyLLM.calibrate`): the
        # held-back ones, and the bank's too for the terms nothing was fitted for.
        held = raw_terms(self.model, self.held, self.terms)[0]
        free = tuple(term for term in self.terms if term in MODEL_FREE_TERMS)
        bank = raw_terms(self.model, self.bank, free)[0]
        self.normal = [
            np.concatenate([held[row], bank[free.index(term)]]) if term in free else held[row]
            for row, term in enumerate(self.terms)
        ]

    def points(self, z: np.ndarray, peaks: np.ndarray, size: int) -> np.ndarray:
        """Fused window scores as one score per point (each window's at its peak)."""
        largest = z.argmax(axis=0)
        score = np.clip(z.max(axis=0), 0, None)
        starts = np.arange(z.shape[1]) * self.stride
        return nearest_peak_score(score, starts + peaks[largest, np.arange(z.shape[1])], size)

    def with_edges(
        self, quantile: float | None = None, top2: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Window scores and peaks with each term measured from the series' own edges of
        normal, as the harness's detector measures them (`AnomalyLLMDetector.with_edges`),
        at another running ``quantile`` if given; ``top2``: plus half the second largest
        adapted term (the same edges, replayed once with ``stream_detector.alerts``)."""
        settings = {} if quantile is None else {"term_quantile": quantile}
        detector = AnomalyLLMDetector(edge_settings=settings)
        if top2:
            adapted = self.adapted_terms(detector.edge_policy)
            ranked = np.sort(np.clip(adapted, 0, None), axis=0)
            largest = adapted.argmax(axis=0)  # the term adapt_terms takes the score from
            peaks = self.peaks[largest, np.arange(adapted.shape[1])]
            return ranked[-1] + 0.5 * ranked[-2], peaks
        return edge_scores(detector, self.z, self.peaks, self.terms)

    def adapted_terms(self, policy: AlertPolicy) -> np.ndarray:
        """Each term less its edge's rise before the window, as ``adapt_terms`` measures
        it. (T, N)"""
        state, rows = SensorAlertState("series"), []
        for index, terms in enumerate(self.z.T.tolist()):
            rises = [
                edge_rise(sketch, policy.fallback_warmup_windows) for sketch in state.term_sketches
            ] or [0.0] * len(terms)
            rows.append([max(0.0, term) - rise for term, rise in zip(terms, rises, strict=True)])
            state = adapt_terms(
                state, terms, names=self.terms, ts_ms=index, threshold=None, policy=policy
            )[0]
        return np.asarray(rows).T

    def ratio_to_record(self) -> np.ndarray:
        """Each term over the largest value it has learnt before the window (at least 1; 1
        until 200 windows have warmed it up; level and scale learn only values up to 2).
        (T, N)"""
        policy = AlertPolicy()
        values = np.clip(self.z, 0, None)
        rows = []
        for row, term in enumerate(self.terms):
            learnt = values[row].copy()
            if term in policy.bounded_terms:
                learnt[learnt > policy.term_learn_limit] = -np.inf
            record = np.concatenate([[-np.inf], np.maximum.accumulate(learnt)[:-1]])
            count = np.concatenate([[0], np.cumsum(np.isfinite(learnt))[:-1]])
            edge = np.where(count >= policy.fallback_warmup_windows, np.maximum(record, 1), 1)
            rows.append(values[row] / edge)
        return np.stack(rows)

    def left_join_memory(self) -> np.ndarray:
        """The memory term's unit-scaled value with the series' earlier windows in the bank."""
        rows = instance_norm(torch.from_numpy(self.windows[:, 0, :]).float().unsqueeze(1))[:, 0]
        dots = (rows @ rows.T).numpy()
        starts = np.arange(len(self.windows)) * self.stride
        earlier = np.searchsorted(starts, starts - self.length, side="right")
        distance = np.full(len(self.windows), np.inf)
        for index, count in enumerate(earlier.tolist()):
            if count:
                nearest = dots[index, :count].max()
                distance[index] = math.sqrt(max(0.0, 2 * (self.length - nearest)) / self.length)
        row = self.terms.index("memory")
        centre, unit = self.model.term_centre[row, 0].item(), self.model.term_spread[row, 0].item()
        return (np.minimum(self.raw[row], distance) - centre) / unit

    def roughness(self, relative: bool) -> np.ndarray:
        """Log spread of first differences, from the middle of its normal range in units of
        half the range (at least three sampling errors, as the scale term)."""

        def of(windows: np.ndarray) -> np.ndarray:
            values = windows[:, 0, :].astype(np.float64)
            spread = np.log(np.diff(values, axis=1).std(axis=1) + 1e-8)
            return spread - np.log(values.std(axis=1) + 1e-8) if relative else spread

        normal = np.concatenate([of(self.bank), of(self.held)])
        low, high = normal.min(), normal.max()
        unit = max((high - low) / 2, 3 / math.sqrt(2 * self.length))
        return np.abs(of(self.windows) - (low + high) / 2) / unit

    def newest_shape_memory(self) -> np.ndarray:
        """The memory term of each window's newest quarter alone (z-normalised), from the
        held-back windows' median in units of their largest excess."""
        size = self.length // 4
        bank = _z_normalised(_stretches(self.bank[:, 0, :], size, max(1, size // 8), 20_000))

        def distance(windows: np.ndarray) -> np.ndarray:
            return _nearest_distance(_z_normalised(windows[:, 0, -size:]), bank)

        return _from_held(distance(self.windows), distance(self.held), 1e-6)

    def forecast_error(self, order: int = 32) -> np.ndarray:
        """The root-mean-square error of an autoregressive forecast of each window's newest
        quarter, from the held-back windows' median in units of their largest excess."""
        order = min(order, self.length // 2)
        values = self.bank[:, 0, :].astype(np.float64)
        middle, spread = values.mean(), values.std() + 1e-9
        lags = _stretches((values - middle) / spread, order + 1, 1, 50_000)
        design = np.c_[lags[:, :-1], np.ones(len(lags))]
        weights = np.linalg.solve(
            design.T @ design + 1e-3 * len(design) * np.eye(order + 1), design.T @ lags[:, -1]
        )
        newest = max(self.length // 4, 1)

        def error(windows: np.ndarray) -> np.ndarray:
            scaled = (windows[:, 0, :].astype(np.float64) - middle) / spread
            lagged = sliding_window_view(scaled[:, -newest - order :], order + 1, axis=1)
            predicted = lagged[..., :-1] @ weights[:-1] + weights[-1]
            return np.sqrt(((lagged[..., -1] - predicted) ** 2).mean(axis=1))

        return _from_held(error(self.windows), error(self.held), 1e-6)

    def difference_memory(self) -> np.ndarray:
        """Distance of the window's z-normalised first differences to the nearest bank
        window's, from the held-back windows' median in units of their largest excess."""

        def normalised(windows: np.ndarray) -> np.ndarray:
            return _z_normalised(np.diff(windows[:, 0, :].astype(np.float32), axis=1))

        bank = normalised(self.bank)

        def distance(windows: np.ndarray) -> np.ndarray:
            return _nearest_distance(normalised(windows), bank)

        return _from_held(distance(self.windows), distance(self.held), 1e-3)

    def surprisal(self) -> np.ndarray:
        """-log10 of each term's normal tail probability at every scored window (at most
        ``MAX_SURPRISAL``; ties there are broken by the term's unit-scaled value). (T, N)"""
        rows = []
        for row, normal in enumerate(self.normal):
            two_sided = bool(self.model.two_sided[row].item())
            middle = (normal.min() + normal.max()) / 2 if two_sided else np.median(normal)
            reference = np.sort(np.abs(normal - middle) if two_sided else normal - middle)
            values = np.abs(self.raw[row] - middle) if two_sided else self.raw[row] - middle
            surprisal = np.minimum(-log10_tail_probability(reference, values), MAX_SURPRISAL)
            rows.append(surprisal + 1e-3 * np.clip(self.z[row], 0, None))
        return np.stack(rows)


def _stretches(rows: np.ndarray, size: int, step: int, limit: int) -> np.ndarray:
    """At most ``limit`` stretches of ``size`` readings of the rows (N, L), starting every
    ``step`` readings, evenly spread over all of them. (S, size)"""
    per_row = (rows.shape[1] - size) // step + 1
    chosen = np.linspace(0, len(rows) * per_row - 1, min(limit, len(rows) * per_row))
    row, start = np.divmod(chosen.astype(int), per_row)
    return rows[row[:, None], start[:, None] * step + np.arange(size)]


def _z_normalised(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return (rows - rows.mean(1, keepdims=True)) / (rows.std(1, keepdims=True) + 1e-5)


def _nearest_distance(rows: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Distance of each z-normalised row (N, S) to its nearest in the z-normalised bank
    (M, S), per reading, as the memory term measures it. (N,)"""
    nearest = np.concatenate(
        [(rows[i : i + 512] @ bank.T).max(axis=1) for i in range(0, len(rows), 512)]
    )
    size = rows.shape[1]
    return np.sqrt(np.clip(2 * (size - nearest), 0, None) / size)


def _from_held(values: np.ndarray, held: np.ndarray, smallest_unit: float) -> np.ndarray:
    """``values`` from the median of the held-back windows' in units of their largest
    excess (at least ``smallest_unit``), as a one-sided term is calibrated."""
    middle = np.median(held)
    return (values - middle) / max(held.max() - middle, smallest_unit)


def edge_scores(
    detector: AnomalyLLMDetector, z: np.ndarray, peaks: np.ndarray, names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Window scores and peaks of the calibrated terms ``z`` (T, N) measured from the
    series' own edges of normal, as ``detector`` measures them."""
    windows = z.shape[1]
    trained = WindowScores(np.zeros(windows), np.zeros(windows), z.T, peaks.T)
    scored = detector.with_edges(trained, names=names)[0]
    return scored.score, scored.peak_offset


def log10_tail_probability(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """log10 P(a normal value >= each of ``values``): empirical up to the ``TAIL_FROM``
    quantile of the sorted normal ``reference``, a generalised Pareto tail above it."""
    size = len(reference)
    empirical = np.log10((size - np.searchsorted(reference, values, side="left") + 1) / (size + 1))
    start = reference[int(TAIL_FROM * (size - 1))]
    excesses = reference[reference > start] - start
    if len(excesses) < 10 or excesses.max() <= 0:
        return empirical
    shape, _, scale = genpareto.fit(excesses, floc=0)
    with np.errstate(divide="ignore"):
        log_sf = genpareto.logsf(np.maximum(values - start, 0), shape, 0, scale)
    tail = math.log10(1 - TAIL_FROM) + log_sf / math.log(10)
    return np.where(values > start, np.maximum(tail, -MAX_SURPRISAL), empirical)


def scaled_length(base: int, factor: float, train_rows: int) -> int:
    """``base`` times ``factor``, a multiple of the patch count, within the harness's limits."""
    length = math.ceil(base * factor / PATCHES_PER_WINDOW) * PATCHES_PER_WINDOW
    half = train_rows // 2 // PATCHES_PER_WINDOW * PATCHES_PER_WINDOW
    return max(min(length, 512, half), 2 * PATCHES_PER_WINDOW)


def series_hits(
    values: np.ndarray, train_end: int, begin: int, end: int, variants: list[str]
) -> dict[str, bool]:
    """Whether each of ``variants`` finds the series' anomaly; builds only what they need."""
    base_length = choose_window_length(values[:train_end])
    built: dict[object, Any] = {}

    def scored(factor: float) -> Scored:
        if factor not in built:
            length = scaled_length(base_length, factor, train_end)
            built[factor] = Scored(values, train_end, length)
        return built[factor]

    def steps_model(fraction: int) -> Scored:
        if ("steps", fraction) not in built:
            length = scored(1.0).length
            built["steps", fraction] = Scored(
                values, train_end, length, terms=(*TERMS, "steps"), steps_fraction=fraction
            )
        return built["steps", fraction]

    def extra(key: str) -> np.ndarray:
        if key not in built:
            one = scored(1.0)
            built[key] = {
                "left_join": one.left_join_memory,
                "roughness": lambda: one.roughness(relative=False),
                "relative_roughness": lambda: one.roughness(relative=True),
                "difference_memory": one.difference_memory,
                "newest_shape": lambda: steps_model(4).newest_shape_memory(),
                "forecast": lambda: steps_model(4).forecast_error(),
            }[key]()
        return built[key]

    size = len(values)
    hits = {}
    for name in variants:
        changes = VARIANTS[name]
        if "default" in changes:
            recurring = "-recurrence" not in changes
            if ("default", recurring) not in built:
                built["default", recurring] = Scored(
                    values,
                    train_end,
                    scored(1.0).length,
                    terms=(*TERMS, "steps", "short_steps", *GRAIN_TERMS),
                    memory_at_patch=False,
                    recurring=recurring,
                )
            base = built["default", recurring]
        elif "steps" in changes:
            base = steps_model(8 if "eighth" in changes else 4)
        else:
            base = scored(1.0)
        z, peaks, names = base.z.copy(), base.peaks, base.terms
        if "default" in changes:  # a term a model of the variant's own would have
            rows = [row for row, term in enumerate(names) if term not in GRAIN_TERMS]
            rows += [names.index(term) for term in GRAIN_TERMS if term in changes]
            z, peaks, names = z[rows], peaks[rows], tuple(names[row] for row in rows)
        centre = np.full(z.shape[1], base.length // 2)
        if "grain_centre" in changes:
            peaks = peaks.copy()
            peaks[[row for row, term in enumerate(names) if term in GRAIN_TERMS]] = centre
        if "left_join" in changes:
            z[TERMS.index("memory")] = extra("left_join")
        if "-memory" in changes:
            keep = [row for row, term in enumerate(TERMS) if term != "memory"]
            z, peaks = z[keep], peaks[keep]
        added = [key for key in changes if key in ("roughness", "relative_roughness")]
        added += ["difference_memory"] if "difference_memory" in changes else []
        if added:
            z = np.vstack([z, *(extra(key)[None] for key in added)])
            peaks = np.vstack([peaks, *(centre[None] for _ in added)])
        if "tail_probability" in changes:
            z = base.surprisal()
        if "memory_centre" in changes:
            peaks = peaks.copy()
            peaks[TERMS.index("memory")] = centre
        if "edges" in changes:
            quantile = next((EDGE_QUANTILES[key] for key in changes if key in EDGE_QUANTILES), None)
            if "two_lengths" in changes:
                eighth = steps_model(8)
                z = np.vstack([z, eighth.z[-1:]])
                peaks = np.vstack([peaks, eighth.peaks[-1:]])
                names = (*base.terms, "steps")
                settings = {} if quantile is None else {"term_quantile": quantile}
                detector = AnomalyLLMDetector(edge_settings=settings)
                score, peak = edge_scores(detector, z, peaks, names)
            elif {"memory_centre", "newest_shape", "forecast"} & set(changes):
                newest = [key for key in ("newest_shape", "forecast") if key in changes]
                z = np.vstack([z, *(extra(key)[None] for key in newest)])
                # Their cause lies in the newest quarter: its centre.
                quarter = np.full((len(newest), z.shape[1]), base.length - base.length // 8)
                names = (*base.terms, *newest)
                score, peak = edge_scores(
                    AnomalyLLMDetector(), z, np.vstack([peaks, quarter]), names
                )
            elif "default" in changes:
                score, peak = edge_scores(AnomalyLLMDetector(), z, peaks, names)
            else:
                score, peak = base.with_edges(quantile, top2="top2" in changes)
            if "neighbourhood" in changes:
                span = max(1, round(NEIGHBOURHOOD_SPAN * base.length / base.stride))
                score = score + NEIGHBOURHOOD_WEIGHT * uniform_filter1d(score, span, mode="nearest")
            points = nearest_peak_score(score, np.arange(len(score)) * base.stride + peak, size)
            if "scales" in changes:
                for factor in (0.5, 2.0):
                    other = scored(factor)
                    score, peak = other.with_edges()
                    starts = np.arange(len(score)) * other.stride
                    points = np.maximum(points, nearest_peak_score(score, starts + peak, size))
        elif "ratio_max" in changes:
            points = base.points(base.ratio_to_record(), peaks, size)
        elif name in LEVEL_UNITS:
            level = Scored(values, train_end, base.length, LEVEL_UNITS[name])
            points = level.points(level.z, level.peaks, size)
        else:
            points = base.points(z, peaks, size)
        if "scales" in changes and "edges" not in changes:
            others = (scored(f).points(scored(f).z, scored(f).peaks, size) for f in (0.5, 2.0))
            points = np.maximum.reduce([points, *others])
        hits[name] = ucr_hit(ucr_location(points, train_end), begin, end)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", nargs="+", help="UCR ids or ranges (default: every series)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="the variants to score (default: all; the baseline always)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        help="a detector to run on the same series in the same run, e.g. discord",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = ["baseline", *(name for name in args.variants if name != "baseline")]
    started = time.perf_counter()
    records = []
    for entry in select_ucr(args.data, args.ids):
        series = load_ucr(entry.path)
        values = series.values.astype(np.float32).reshape(len(series.values), -1)
        hits = series_hits(
            values, series.train_end, series.anomaly_begin, series.anomaly_end, variants
        )
        peers = {
            name: evaluate_ucr_series(get_detector(name), series, {})["hit"] for name in args.peer
        }
        records.append({"id": series.id, "hits": hits, "peers": peers})
        found = [name for name, hit in (hits | peers).items() if hit]
        print(series.id, " ".join(found), flush=True)
    baseline = [record["id"] for record in records if record["hits"]["baseline"]]
    result = {
        "benchmark": "ucr candidate terms (network-free: memory, level, scale, point and more)",
        "series": len(records),
        "hits": {name: sum(r["hits"][name] for r in records) for name in variants},
        "peer_hits": {name: sum(r["peers"][name] for r in records) for name in args.peer},
        "changes_against_baseline": {
            name: {
                "gained": [r["id"] for r in records if r["hits"][name] and r["id"] not in baseline],
                "lost": [r["id"] for r in records if not r["hits"][name] and r["id"] in baseline],
            }
            for name in variants
            if name != "baseline"
        },
        "wall_s": round(time.perf_counter() - started, 1),
        "records": records,
    }
    print(json.dumps(result["hits"] | result["peer_hits"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
