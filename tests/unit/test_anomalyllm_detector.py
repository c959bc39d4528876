"""The harness's AnomalyLLM detector: window length and where a window's score lands."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.anomalyllm_detector import _nearest_centre_score, choose_window_length

pytestmark = pytest.mark.unit


def test_the_window_is_one_period_of_the_training_data() -> None:
    steps = np.arange(6000)
    noise = 0.05 * np.random.default_rng(0).normal(size=steps.size)
    train = (np.sin(2 * np.pi * steps / 100) + noise)[:, None]
    assert choose_window_length(train) == 104  # 100, rounded up to whole patches of 13


def test_a_window_without_a_period_falls_back_and_a_short_part_caps_it() -> None:
    noise = np.random.default_rng(1).normal(size=(6000, 1))
    assert choose_window_length(noise) == 128
    assert choose_window_length(noise[:100]) == 48  # at most half the training part


def test_each_point_takes_the_score_of_the_window_centred_nearest() -> None:
    # Windows of 40 points every 10 points: centres at 20, 30, 40, 50.
    scores = np.array([0.0, 0.0, 5.0, 0.0])
    points = _nearest_centre_score(scores, np.array([20, 30, 40, 50]), 70)
    assert int(np.argmax(points)) == 36  # the first point nearer 40 than 30
    assert points[36:46].tolist() == [5.0] * 10  # a tie (45) goes to the earlier window
    assert points[46] == 0.0 and points[0] == 0.0 and points[69] == 0.0
