"""AnomalyLLM as a `Detector` for the evaluation harness (one model per series)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from stream_detector.alerts import SensorAlertState, adapt_terms
from stream_detector.config import AlertPolicy
from stream_detector.model import (
    DEFAULT_SCORE_TERMS,
    SCORE_TERMS,
    SMOLLM2,
    AnomalyLLM,
    ModelConfig,
    WindowScores,
)
from trainer.detectors import RowScores, dominant_period
from trainer.thresholds import REPLAY_ROW_MS, AlertReplay, ThresholdConfig, pot_threshold
from trainer.train import TrainResult, fit, profile, refresh, sliding_windows

PATCHES_PER_WINDOW = 8
MIN_WINDOW, MAX_WINDOW = 32, 512
DEFAULT_WINDOW = 128  # when the training data has no dominant period
# The finest scoring stride used: well inside the UCR rule's ±100 points.
MAX_SCORING_STRIDE = 16
# Rows between the refreshes that refill a recurring model's recent bank, as a
# ``trainer refresh --recent-only`` CronJob would (README, "Recurring shapes").
RECENT_EVERY = 1000

T = TypeVar("T")


def choose_window_length(train: np.ndarray) -> int:
    """One period of the training data, a multiple of the patch count.

    One period is what a matrix-profile discord compares, and it beat two periods on the
    UCR development set (README, ablation). At most half the training data, so a short
    training part still yields enough windows for the prototypes and the held-back split.
    """
    values = train[:, 0].astype(np.float64)
    period = dominant_period(values, MIN_WINDOW // 2, MAX_WINDOW)
    length = min(max(period or DEFAULT_WINDOW, MIN_WINDOW), MAX_WINDOW)
    length = int(math.ceil(length / PATCHES_PER_WINDOW) * PATCHES_PER_WINDOW)
    half = len(train) // 2 // PATCHES_PER_WINDOW * PATCHES_PER_WINDOW
    return max(min(length, half), 2 * PATCHES_PER_WINDOW)


class AnomalyLLMDetector:
    """Trains teacher and student on the training part, scores windows of the series.

    The model is the product's default (``ModelConfig``: the fused score); the subclasses
    below are the ablations. Windows are scored every ``MAX_SCORING_STRIDE`` points or
    closer, and the "tail" and "point" terms look at the newest ``MAX_SCORING_STRIDE``
    readings of a window, as ``trainer fit`` sets them to the worker's stride. Non-causal
    mode (UCR, MSL) gives each point the score of the window whose peak
    (``Scores.peak_offset``: where in the window its largest term's cause lies) lies
    nearest to it, so a peak lands where the unusual stretch is; causal mode (NAB,
    streaming) gives each point the score of the latest window that ends at or before it,
    as the worker does.

    ``refresh_every`` (causal mode only) scores the way the product runs with a
    ``trainer refresh`` CronJob: every ``refresh_every`` rows after the training part the
    model is refreshed (`trainer.train.refresh`: prototypes, memory bank and calibration)
    on the trailing ``refresh_span`` rows, minus the alerts the worker's policy raised at
    the threshold ``trainer`` calibrates (peaks over threshold on the held-back windows),
    and the windows that end after that row are scored by the refreshed model. An alert
    open for more than ``refresh_learn_after`` rows is a change of regime: the rows after
    those are read (None: never). ``refresh_memory_only`` refills only the memory bank.
    The promotion gate is not modelled: every refresh is taken.

    Window scores are the worker's: each window's terms are measured from the series' own
    edges of normal, window by window in time order (`stream_detector.alerts.adapt_terms`,
    the default ``AlertPolicy`` with the fields in ``edge_settings`` changed), unless
    ``adapt_term_units`` is off. The edges warm up on ``term_warmup_windows`` windows
    (None: the policy's ``fallback_warmup_windows``); the NAB runner sets it to the
    windows of the probationary part, as it warms up the alert threshold's quantile there.
    """

    name = "anomalyllm"
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": {"profile_name": "quick", "max_scored_windows": 1024}
    }
    streaming_settings: ClassVar[dict[str, Any]] = {"causal": True}

    def __init__(
        self,
        profile_name: str = "default",
        causal: bool = False,
        backbone: str = SMOLLM2,
        backbone_layers: int = 6,
        window_length: int | None = None,
        max_scored_windows: int = 2048,
        batch_size: int = 256,
        device: str = "cpu",
        seed: int = 0,
        channel: int | None = None,
        refresh_every: int | None = None,
        refresh_span: int | None = None,
        refresh_learn_after: int | None = None,
        refresh_memory_only: bool = False,
        recent_every: int = RECENT_EVERY,
        adapt_term_units: bool = True,
        term_warmup_windows: int | None = None,
        edge_settings: Mapping[str, Any] | None = None,
        **model_settings: Any,
    ) -> None:
        unknown = set(model_settings) - {
            "normalisation",
            "score_terms",
            "memory_size",
            "tail_readings",
            "level_unit_sigmas",
            "recurrence",
        }
        if unknown:
            raise TypeError(f"unexpected settings {sorted(unknown)}")
        self.causal = causal
        self.model_settings = model_settings
        self.profile_name = profile_name
        self.backbone = backbone
        self.backbone_layers = backbone_layers
        self.window_length = window_length
        self.max_scored_windows = max_scored_windows
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.channel = channel
        if refresh_every is not None and (refresh_every < 1 or not causal):
            raise ValueError("refresh_every needs causal scoring and at least one row")
        self.refresh_every = refresh_every
        self.refresh_span = refresh_span
        self.refresh_learn_after = refresh_learn_after
        self.refresh_memory_only = refresh_memory_only
        if recent_every < 1:
            raise ValueError("recent_every must be at least one row")
        self.recent_every = recent_every
        self.adapt_term_units = adapt_term_units
        self.term_warmup_windows = term_warmup_windows
        self.edge_policy = AlertPolicy(**(edge_settings or {}))
        self.model: AnomalyLLM | None = None
        self.result: TrainResult | None = None
        self.training_rows = 0
        self.threshold: float | None = None

    def settings(self) -> dict[str, Any]:
        train_config = dataclasses.asdict(profile(self.profile_name, seed=self.seed))
        model_config = ModelConfig(**self.model_settings)
        return {
            "profile": self.profile_name,
            "train": train_config,
            "backbone": self.backbone,
            "backbone_layers": self.backbone_layers,
            "window_length": self.window_length
            or "1 x dominant period, 32..512, at most half the training part",
            "patches_per_window": PATCHES_PER_WINDOW,
            "causal": self.causal,
            "channel": "all" if self.channel is None else self.channel,
            "normalisation": model_config.normalisation,
            "score_terms": list(model_config.score_terms),
            "memory_size": model_config.memory_size if model_config.fused else 0,
            "tail_readings": self.model_settings.get(
                "tail_readings", f"min({MAX_SCORING_STRIDE}, window_length - 1)"
            ),
            "level_unit_sigmas": model_config.level_unit_sigmas,
            "recurrence": model_config.recurrence if model_config.recurs else 0,
            "recent_every": self.recent_every,
            "max_scored_windows": self.max_scored_windows,
            "max_scoring_stride": MAX_SCORING_STRIDE,
            "refresh_every": self.refresh_every,
            "refresh_span": self.refresh_span or "the training part's length",
            "refresh_learn_after": self.refresh_learn_after,
            "refresh_memory_only": self.refresh_memory_only,
            "adapt_term_units": self.adapt_term_units and model_config.fused,
            "term_warmup_windows": self.term_warmup_windows
            or "the policy's fallback_warmup_windows; trainer nab: the probationary windows",
            "term_quantile": self.edge_policy.term_quantile,
            "term_learn_limit": self.edge_policy.term_learn_limit,
            "bounded_terms": list(self.edge_policy.bounded_terms),
        }

    def _columns(self, series: np.ndarray) -> np.ndarray:
        """The columns the model reads: one (``channel``) or all. (T, C)"""
        if self.channel is None:
            return series
        if not 0 <= self.channel < series.shape[1]:
            raise ValueError(
                f"{self.name}: channel {self.channel} not in a series of {series.shape[1]} columns"
            )
        return series[:, [self.channel]]

    def fit(self, train: np.ndarray) -> None:
        train = self._columns(train)
        length = self.window_length or choose_window_length(train)
        patch = length // PATCHES_PER_WINDOW
        model_config = ModelConfig(
            channels=train.shape[1],
            window_length=length,
            patch_length=patch,
            patch_stride=patch,
            backbone=self.backbone,
            backbone_layers=self.backbone_layers,
            **{"tail_readings": min(MAX_SCORING_STRIDE, length - 1), **self.model_settings},
        )
        train_config = profile(self.profile_name, seed=self.seed)
        windows = self.training_windows(train, length, model_config.memory_slots)
        self.result = fit(windows, model_config, train_config, device=self.device, progress=False)
        self.model = self.result.model
        self.training_rows = len(train)
        if self.causal:  # what a refresh starts from
            self.threshold = self._threshold(self.model, windows)

    def _threshold(self, model: AnomalyLLM, windows: np.ndarray) -> float:
        """``trainer``'s threshold: peaks over threshold on the held-back windows' scores."""
        held_back = self.held_back(windows)
        return pot_threshold(
            model.score_windows(held_back, self.batch_size).score, ThresholdConfig()
        ).threshold

    def held_back(self, windows: np.ndarray) -> np.ndarray:
        """The newest of the training ``windows`` that the profile holds back (at least one)."""
        fraction = profile(self.profile_name, seed=self.seed).validation_fraction
        return windows[-max(1, int(len(windows) * fraction)) :]

    def training_windows(self, train: np.ndarray, length: int, memory_slots: int) -> np.ndarray:
        """The windows ``fit`` offers the model, in time order. (N, C, L)

        A fused model's memory bank draws on every window offered (every shift where the
        training part is short); the networks train on an evenly thinned subset of them
        (``TrainConfig.max_train_windows``).
        """
        step = self._offered_step(len(train) - length, memory_slots)
        return sliding_windows(train, length, step)

    def _offered_step(self, shifts: int, memory_slots: int) -> int:
        """The stride that offers ``fit`` or a refresh enough of ``shifts`` window starts:
        every one when they are few, else about the bank's size (and twice the windows
        the networks train on)."""
        max_train_windows = profile(self.profile_name, seed=self.seed).max_train_windows
        return max(1, shifts // max(memory_slots, max_train_windows * 2))

    def window_scores(self, series: np.ndarray, stride: int, adapted: bool = True) -> WindowScores:
        """Scores of windows starting at 0, stride, 2*stride, ... (``adapted=False``: from
        the trained edges, before ``with_edges``)."""
        if self.model is None:
            raise RuntimeError("fit() must run before score()")
        windows = sliding_windows(self._columns(series), self.model.config.window_length, stride)
        if self.refresh_every is not None:
            return self._refreshed_scores(windows, stride, self._columns(series))
        scored = self._recent_scores(self.model, windows, stride, len(series))
        return self.with_edges(scored, threshold=self.threshold)[0] if adapted else scored

    def _recent_scores(
        self, model: AnomalyLLM, windows: np.ndarray, stride: int, rows: int
    ) -> WindowScores:
        """The windows' scores, the recent bank refilled every ``recent_every`` rows where
        the model recurs (else scored as they are)."""
        if not model.config.recurs:
            return model.score_windows(windows, self.batch_size)
        parts = with_recent_refills(
            model,
            windows,
            stride,
            (self.training_rows, self.recent_every, rows),
            lambda part: model.score_windows(part, self.batch_size),
        )
        return WindowScores(*(np.concatenate(field) for field in zip(*parts, strict=True)))

    def with_edges(
        self,
        scored: WindowScores,
        edges: SensorAlertState | None = None,
        threshold: float | None = None,
        names: Sequence[str] | None = None,
    ) -> tuple[WindowScores, SensorAlertState]:
        """The scores the worker decides on (see the class), from the ``edges`` before the
        first window (None: none learnt yet) beside the fitted ``threshold`` (another one
        starts new edges, as in the worker), and the edges after them. ``names``: the
        terms' (None: the fitted model's, else the default score's)."""
        edges = edges or SensorAlertState("series")
        if not self.adapt_term_units or scored.terms.shape[1] == 0:
            return scored, edges
        if names is None:
            names = DEFAULT_SCORE_TERMS if self.model is None else self.model.config.score_terms
        policy = self.edge_policy
        if self.term_warmup_windows is not None:
            policy = policy.model_copy(update={"fallback_warmup_windows": self.term_warmup_windows})
        score = np.empty(len(scored.score), dtype=np.float32)
        offset = np.empty(len(scored.score), dtype=np.int64)
        for index, terms in enumerate(scored.terms.tolist()):
            edges, score[index], term = adapt_terms(
                edges, terms, names=names, ts_ms=index, threshold=threshold, policy=policy
            )
            offset[index] = scored.term_offsets[index, term]
        return scored._replace(score=score, peak_offset=offset), edges

    def _refreshed_scores(
        self, windows: np.ndarray, stride: int, series: np.ndarray
    ) -> WindowScores:
        """Window scores with a refresh every ``refresh_every`` rows (see the class)."""
        assert self.model is not None and self.threshold is not None
        model, threshold = copy.deepcopy(self.model), self.threshold
        length = model.config.window_length
        ends = np.arange(len(windows)) * stride + length - 1
        replay = AlertReplay(AlertPolicy())
        scores = np.zeros(len(windows), dtype=np.float32)
        offsets = np.zeros(len(windows), dtype=np.int64)
        first, edges = 0, None
        for cut in [*range(self.training_rows, len(series), self.refresh_every), len(series)]:
            last = int(np.searchsorted(ends, cut))  # windows ending before row `cut`
            scored, edges = self.with_edges(
                model.score_windows(windows[first:last], self.batch_size), edges, threshold
            )
            scores[first:last], offsets[first:last] = scored.score, scored.peak_offset
            for end, score, offset in zip(
                ends[first:last].tolist(),
                scores[first:last].tolist(),
                offsets[first:last].tolist(),
                strict=True,
            ):
                evidence = end - (length - 1) + offset
                replay.add(end * REPLAY_ROW_MS, score, threshold, evidence * REPLAY_ROW_MS)
            first = last
            if cut == len(series) or cut == self.training_rows:
                continue
            recent = self._refresh_windows(
                series, cut, replay.spans(open_until_ms=cut * REPLAY_ROW_MS)
            )
            if len(recent) >= 2 * model.config.prototypes:
                fraction = profile(self.profile_name).validation_fraction
                refresh(model, recent, fraction, memory_only=self.refresh_memory_only)
                threshold = self._threshold(model, recent)
            known = int(np.searchsorted(ends, cut - length))
            fill_recent(model, windows[:known], ends[:known])
        empty = np.zeros((len(scores), 0), dtype=np.float32)
        return WindowScores(scores, offsets, empty, empty.astype(np.int64))

    def _refresh_windows(
        self, series: np.ndarray, cut: int, alerts: list[tuple[int, int]]
    ) -> np.ndarray:
        """The windows a refresh at row ``cut`` reads: the trailing span, minus the alerts,
        each widened by a window on both sides (as `trainer.sources` does)."""
        assert self.model is not None
        length = self.model.config.window_length
        start = max(0, cut - (self.refresh_span or self.training_rows))
        normal = np.ones(cut - start, dtype=bool)
        for begin_ms, end_ms in alerts:
            first, last = (
                begin_ms // REPLAY_ROW_MS - length - start,
                end_ms // REPLAY_ROW_MS + length - start,
            )
            if self.refresh_learn_after is not None:
                last = min(last, first + 2 * length + self.refresh_learn_after)
            normal[max(first, 0) : max(last + 1, 0)] = False
        edges = np.flatnonzero(np.diff(np.concatenate([[0], normal.view(np.int8), [0]])))
        pieces = [
            series[start + a : start + b] for a, b in zip(edges[::2], edges[1::2], strict=True)
        ]
        pieces = [piece for piece in pieces if len(piece) >= length]
        if not pieces:
            return np.zeros((0, series.shape[1], length), dtype=np.float32)
        shifts = sum(len(piece) - length for piece in pieces)
        step = self._offered_step(shifts, self.model.config.memory_slots)
        return np.concatenate([sliding_windows(piece, length, step) for piece in pieces])

    def _stride(self, size: int) -> int:
        """The scoring stride for a series of ``size`` rows."""
        assert self.model is not None
        total = size - self.model.config.window_length + 1
        return min(MAX_SCORING_STRIDE, max(1, math.ceil(total / self.max_scored_windows)))

    def decision_rows(self, size: int) -> np.ndarray:
        """The rows where a scored window ends (causal mode): where the worker decides."""
        if self.model is None:
            raise RuntimeError("fit() must run before decision_rows()")
        length = self.model.config.window_length
        return np.arange(length - 1, size, self._stride(size))

    def score(self, series: np.ndarray) -> np.ndarray:
        return self.score_rows(series).score

    def score_rows(self, series: np.ndarray) -> RowScores:
        """Each row's score and, causally, the row where the cause of its window lies."""
        if self.model is None:
            raise RuntimeError("fit() must run before score()")
        length = self.model.config.window_length
        rows = np.arange(len(series))
        if len(series) < length:
            return RowScores(np.zeros(len(series), dtype=np.float32), rows)
        stride = self._stride(len(series))
        scored = self.window_scores(series, stride)
        starts = np.arange(len(scored.score)) * stride
        if self.causal:
            latest = _latest_window(starts + length - 1, len(series))
            score = _at_latest(scored.score, latest, 0.0).astype(np.float32)
            return RowScores(score, _at_latest(starts + scored.peak_offset, latest, rows))
        score = nearest_peak_score(scored.score, starts + scored.peak_offset, len(series))
        return RowScores(score, rows)


def fill_recent(model: AnomalyLLM, windows: np.ndarray, ends: np.ndarray) -> None:
    """The model's recent bank from a series' windows (N, C, L) ending at rows ``ends``."""
    model.fill_recent(torch.from_numpy(windows), torch.from_numpy(ends))


def with_recent_refills(
    model: AnomalyLLM,
    windows: np.ndarray,
    stride: int,
    refills: tuple[int, int, int],
    score: Callable[[np.ndarray], T],
) -> list[T]:
    """``score`` of each stretch of a series' windows (N, C, L), cut every ``stride`` rows
    from row 0, with the model's recent bank refilled before it as `recent_cuts` says
    (``refills``: its ``start``, ``every`` and ``rows``); the bank as it was afterwards."""
    (start, every, rows), length = refills, model.config.window_length
    ends = np.arange(len(windows)) * stride + length - 1
    fitted = model.recent_memory, model.recent_place
    parts = []
    try:
        for first, last, known in recent_cuts(ends, start, every, rows, length):
            fill_recent(model, windows[:known], ends[:known])
            parts.append(score(windows[first:last]))
    finally:
        model.recent_memory, model.recent_place = fitted
    return parts


def recent_cuts(
    ends: np.ndarray, start: int, every: int, rows: int, length: int
) -> list[tuple[int, int, int]]:
    """How windows ending at rows ``ends`` (sorted) are scored with a recent bank refilled
    at rows ``start``, ``start + every``, ... before ``rows``: for each stretch of windows
    ``(first, last, known)``, windows ``first:last`` are scored with the first ``known``
    windows in the bank. A refill at row ``cut`` scores the windows that end at or after
    it and takes those that end at least a window's length before it (at ``cut - 1 -
    length`` or earlier), so none of them overlaps a window it scores."""
    cuts = [*range(start, rows, every)]
    bounds = [0, *(int(np.searchsorted(ends, cut)) for cut in cuts), len(ends)]
    known = [0, *(int(np.searchsorted(ends, cut - length, side="left")) for cut in cuts)]
    return [
        (first, last, count)
        for first, last, count in zip(bounds[:-1], bounds[1:], known, strict=True)
        if last > first
    ]


class AnomalyLLMFixedEdgesDetector(AnomalyLLMDetector):
    """The default without the sensor's own edges of normal (``adapt_term_units`` off):
    every term keeps the scale it was trained with."""

    name = "anomalyllm-fixed-edges"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**{"adapt_term_units": False, **settings})


class AnomalyLLMBoundedEdgesDetector(AnomalyLLMDetector):
    """Stop 27's edges: every term's edge bounded at ``term_learn_limit``, at the running
    0.995 quantile: the ablation of ``AlertPolicy.bounded_terms`` and ``term_quantile``."""

    name = "anomalyllm-bounded-edges"

    def __init__(self, **settings: Any) -> None:
        edges = {"bounded_terms": SCORE_TERMS, "term_quantile": 0.995}
        super().__init__(**{"edge_settings": edges, **settings})


class AnomalyLLMPaperDetector(AnomalyLLMDetector):
    """The paper's AnomalyLLM: instance normalisation, teacher-student distance only."""

    name = "anomalyllm-paper"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**{"score_terms": ("discrepancy",), **settings})


class AnomalyLLMGlobalDetector(AnomalyLLMDetector):
    """The paper's score on windows normalised by training statistics (the old demo's)."""

    name = "anomalyllm-global"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**{"score_terms": ("discrepancy",), "normalisation": "global", **settings})


class AnomalyLLMLevelUnitDetector(AnomalyLLMDetector):
    """The default with the level term's unit at least two of the channel's spreads
    (``level_unit_sigmas=2``): the ablation row of README's "The level term's unit"."""

    name = "anomalyllm-l2"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**{"level_unit_sigmas": 2.0, **settings})


def _latest_window(ends: np.ndarray, size: int) -> np.ndarray:
    """For each point, the latest window ending at or before it (-1 before the first)."""
    return np.searchsorted(ends, np.arange(size), side="right") - 1


def _at_latest(values: np.ndarray, latest: np.ndarray, before: float | np.ndarray) -> np.ndarray:
    """Per point, ``values`` of its latest window (`_latest_window`), ``before`` where no
    window has ended yet."""
    return np.where(latest >= 0, values[np.clip(latest, 0, None)], before)


def latest_window_score(scores: np.ndarray, ends: np.ndarray, size: int) -> np.ndarray:
    """Each point gets the score of the latest window ending at or before it."""
    return _at_latest(scores, _latest_window(ends, size), 0.0).astype(np.float32)


def nearest_peak_score(scores: np.ndarray, peaks: np.ndarray, size: int) -> np.ndarray:
    """Each point gets the score of the window whose peak (`Scores.peak_offset`, from the
    window's start) lies nearest to it; where several windows peak at one point, the
    highest. A window whose largest term is the teacher-student distance peaks at its
    centre."""
    order = np.lexsort((-scores, peaks))  # by peak, the highest score first
    peaks, scores = peaks[order], scores[order]
    first = np.concatenate([[True], peaks[1:] != peaks[:-1]])
    peaks, scores = peaks[first], scores[first]
    if len(peaks) == 1:
        return np.full(size, scores[0], dtype=np.float32)
    midpoints = (peaks[:-1] + peaks[1:]) / 2
    return scores[np.searchsorted(midpoints, np.arange(size))].astype(np.float32)
