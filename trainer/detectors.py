"""Detectors evaluated side by side in one harness: AnomalyLLM and its baselines.

Every detector reads a series of shape ``[T, C]`` and returns one float per time
step (high = anomalous). ``fit`` sees only anomaly-free training data.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Detector(Protocol):
    """What the evaluation harness needs from a detector."""

    name: str
    causal: bool  # True when score[t] depends only on series[: t + 1]

    def fit(self, train: np.ndarray) -> None:
        """Learn from anomaly-free data of shape [T, C]."""

    def score(self, series: np.ndarray) -> np.ndarray:
        """Return a float per time step of ``series`` ([T, C] -> [T])."""

    def settings(self) -> dict[str, Any]:
        """The hyper-parameters, recorded in every result file."""
