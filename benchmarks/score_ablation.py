"""What the score-ablation benchmarks share: one fit, every term's raw value, re-scaling.

``ucr_score_terms.py`` and ``nab_score_terms.py`` fit the product's default model once
per series and then re-score it under variants of the fused score. This module computes
the raw terms of a fitted model (every term in ``SCORE_TERMS``, used by the default or
not) on the normal windows it was calibrated on, and puts raw terms on the common scale
as ``AnomalyLLM.calibrate`` does, or as the alternatives being ablated do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from stream_detector.model import (
    DEFAULT_SCORE_TERMS,
    GRAIN_TERMS,
    MODEL_FREE_TERMS,
    SCORE_TERMS,
    TWO_SIDED_TERMS,
    AnomalyLLM,
    instance_norm,
    spread_floor,
)
from trainer.anomalyllm_detector import RECENT_EVERY, AnomalyLLMDetector, with_recent_refills
from trainer.train import MAX_CALIBRATION_WINDOWS, thin

SCALINGS = ("extreme", "robust-z")
FLOORS = ("errors", "relative")
# The model's floors with the level term's unit also at least k times the channel's spread
# over the normal windows (``ModelConfig.level_unit_sigmas``): a level change must be
# large, not only new.
LEVEL_FLOORS = {"level-sigma1": 1.0, "level-sigma2": 2.0, "level-sigma3": 3.0}
# Every subset of the terms before stop 37's second steps term and the grain terms (stop
# 42's noise, stop 43's quiet), and the default: 128 subsets, where every subset of all
# ten would multiply the variants by eight.
_SUBSET_TERMS = tuple(term for term in SCORE_TERMS if term not in ("short_steps", *GRAIN_TERMS))
SUBSETS = [
    terms
    for size in range(1, len(_SUBSET_TERMS) + 1)
    for terms in itertools.combinations(_SUBSET_TERMS, size)
] + [DEFAULT_SCORE_TERMS]


def raw_terms(model, windows: np.ndarray, names=SCORE_TERMS) -> tuple[np.ndarray, np.ndarray]:
    """The model's raw terms of windows (N, 1, L), single channel, and where in the window
    each lies. (T, N) and (T, N)"""
    with torch.inference_mode():
        parts = [
            model.raw_terms(torch.from_numpy(windows[start : start + 256]), names)
            for start in range(0, len(windows), 256)
        ]
    values = torch.cat([part.values[:, :, 0] for part in parts], dim=1).numpy()
    return values, torch.cat([part.offsets[:, :, 0] for part in parts], dim=1).numpy()


def recurring_raw_terms(
    model: AnomalyLLM,
    windows: np.ndarray,
    stride: int,
    train_end: int,
    rows: int,
    names: tuple[str, ...] = SCORE_TERMS,
) -> tuple[np.ndarray, np.ndarray]:
    """`raw_terms` of a series' windows (N, 1, L), cut every ``stride`` rows from row 0 of
    a series of ``rows``, with the model's recent bank refilled as the harness's detector
    refills it (`trainer.anomalyllm_detector.with_recent_refills`: at ``train_end`` and
    every ``RECENT_EVERY`` rows after), and as it was again afterwards. (T, N) and (T, N)"""
    if not model.config.recurs:
        return raw_terms(model, windows, names)
    refills = (train_end, RECENT_EVERY, rows)
    parts = with_recent_refills(
        model, windows, stride, refills, lambda part: raw_terms(model, part, names)
    )
    values, offsets = zip(*parts, strict=True)
    return np.concatenate(values, axis=1), np.concatenate(offsets, axis=1)


def memory_patch_offsets(model: AnomalyLLM, windows: np.ndarray) -> np.ndarray:
    """Where in each window (N, 1, L) the patch-long stretch lies that differs most from
    the nearest memory window, both instance-normalised: where the model placed the
    memory term's cause until stop 37, which places it at the window's centre. (N,)"""
    bank = model.memory[0]  # (M, L)
    offsets = []
    with torch.inference_mode():
        for start in range(0, len(windows), 256):
            part = instance_norm(torch.from_numpy(windows[start : start + 256]).float())[:, 0]
            nearest = (part @ bank.T).argmax(dim=-1)
            residual = (part - bank[nearest]) ** 2  # (B, L)
            offsets.append(model.largest_stretch(residual.unsqueeze(1))[:, 0])
    return torch.cat(offsets).numpy()


@dataclass(frozen=True)
class NormalTerms:
    """A fitted model's terms on the normal windows its score was calibrated on."""

    held: np.ndarray  # (T, H) every term on the held-back windows
    normal: np.ndarray  # (F, N) the model-free terms (`MODEL_FREE_TERMS`) on the bank's
    # floor name ("errors" or one of LEVEL_FLOORS) -> each term's smallest unit (T,)
    floors: dict[str, np.ndarray]

    @classmethod
    def of(cls, detector: AnomalyLLMDetector, train: np.ndarray) -> NormalTerms:
        """Split the windows ``detector.fit(train)`` offered as `calibrate_score` does.

        So the default variant scores what ``AnomalyLLM.score`` does (on UCR series 26
        the largest difference was 0.0).
        """
        model = detector.model
        windows = detector.training_windows(
            train, model.config.window_length, model.config.memory_slots
        )
        held_back = max(1, int(len(windows) * 0.2))
        held = raw_terms(model, thin(windows[-held_back:], MAX_CALIBRATION_WINDOWS))[0]
        normal = raw_terms(model, windows[:-held_back], MODEL_FREE_TERMS)[0]
        bank = torch.from_numpy(windows[:-held_back])
        centre = torch.from_numpy(np.median(held, axis=1)[:, None])
        floors = {
            name: spread_floor(SCORE_TERMS, bank, centre, sigmas)[:, 0].numpy()
            for name, sigmas in {"errors": 0.0, **LEVEL_FLOORS}.items()
        }
        return cls(held, normal, floors)

    def scaled(self, raw: np.ndarray, scaling: str, floor: str) -> np.ndarray:
        """Each term of ``raw`` (T, N) on a common scale.

        ``floor="errors"`` keeps each unit at least `spread_floor`'s (the model's rule);
        ``"relative"`` only at 1e-3 of the term's centre (the previous rule);
        ``"level-sigmaK"`` at least `spread_floor`'s with ``level_unit_sigmas=K``.
        """
        out = np.empty_like(raw)
        for index, name in enumerate(SCORE_TERMS):
            two_sided = name in TWO_SIDED_TERMS
            reference = self.held[index]
            if name in MODEL_FREE_TERMS:
                reference = np.concatenate([reference, self.normal[MODEL_FREE_TERMS.index(name)]])
            median = np.median(reference)
            if scaling == "robust-z":
                centre, unit = median, 1.4826 * np.median(np.abs(reference - median))
            elif two_sided:
                low, high = reference.min(), reference.max()
                centre, unit = (low + high) / 2, (high - low) / 2
            else:
                centre, unit = median, reference.max() - median
            unit = max(unit, 1e-3 * max(abs(centre), 1.0))
            if floor != "relative":
                unit = max(unit, self.floors[floor][index])
            out[index] = (raw[index] - centre) / unit
            if two_sided:
                out[index] = np.abs(out[index])
        return out


def fused(z: np.ndarray, terms: tuple[str, ...]) -> np.ndarray:
    """The fused score of scaled terms ``z`` (T, N): the largest of ``terms``, at least 0."""
    return z[[SCORE_TERMS.index(name) for name in terms]].max(axis=0).clip(min=0)


def fused_peak(z: np.ndarray, offsets: np.ndarray, terms: tuple[str, ...]) -> np.ndarray:
    """Where in each window the largest of ``terms`` lies (`Scores.peak_offset`). (N,)"""
    rows = [SCORE_TERMS.index(name) for name in terms]
    largest = z[rows].argmax(axis=0)
    return offsets[rows][largest, np.arange(z.shape[1])]
