"""Baseline detectors and the registry."""

from __future__ import annotations

import numpy as np
import pytest
from river.anomaly import HalfSpaceTrees

from trainer import detectors
from trainer.detectors import (
    DetectorInputError,
    DetectorUnavailableError,
    DiscordDetector,
    HalfSpaceTreesDetector,
    UnknownDetectorError,
    WindowedGaussianDetector,
    dominant_period,
    get_detector,
)
from trainer.evaluate import ucr_hit, ucr_location

pytestmark = pytest.mark.unit

PERIOD = 50
TRAIN_END = 2000
SPIKE_AT = 2600  # 0-based


def _sine(length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    return np.sin(2 * np.pi * time / PERIOD) + 0.05 * rng.standard_normal(length)


def _spiked_series() -> np.ndarray:
    """A noisy sine, [3000, 1], with one obvious spike after the training part."""
    values = _sine(3000)
    values[SPIKE_AT] += 4.0
    return values[:, None].astype(np.float32)


def test_dominant_period_finds_the_sine_period() -> None:
    assert dominant_period(_sine(5000), 8, 1000) == PERIOD
    assert dominant_period(np.ones(500), 8, 100) is None


@pytest.mark.slow  # stumpy compiles with numba on first use (about a minute)
def test_discord_locates_an_obvious_spike() -> None:
    series = _spiked_series()
    detector = DiscordDetector()
    detector.fit(series[:TRAIN_END])

    scores = detector.score(series)

    assert detector.settings()["m"] == PERIOD
    location = ucr_location(scores, TRAIN_END)
    assert abs(location - (SPIKE_AT + 1)) <= PERIOD // 2
    assert ucr_hit(location, SPIKE_AT + 1, SPIKE_AT + 1)


@pytest.mark.slow
def test_discord_skipping_the_training_prefix_changes_nothing() -> None:
    import stumpy

    series = _spiked_series()
    detector = DiscordDetector(m=40)
    detector.fit(series[:TRAIN_END])

    scores = detector.score(series)

    values = series[:, 0].astype(np.float64)
    full = stumpy.stump(values, 40, T_B=values[:TRAIN_END], ignore_trivial=False)[:, 0]
    starts = np.clip(np.arange(series.shape[0]) - 20, 0, full.size - 1)
    np.testing.assert_allclose(scores, full[starts].astype(np.float64), atol=1e-5)


def test_hst_locates_an_obvious_spike() -> None:
    series = _spiked_series()
    # With the default 16 features the spike is one of 16 and normal points of the sine's
    # sparse middle score as high; 4 features keep it visible.
    detector = HalfSpaceTreesDetector(window=4)
    detector.fit(series[:TRAIN_END])

    location = ucr_location(detector.score(series), TRAIN_END)

    assert ucr_hit(location, SPIKE_AT + 1, SPIKE_AT + 1)


def test_hst_learning_only_the_last_windows_equals_learning_everything() -> None:
    series = _spiked_series()
    detector = HalfSpaceTreesDetector(window=4, window_size=100)
    detector.fit(series[:TRAIN_END])

    reference = HalfSpaceTrees(n_trees=10, height=8, window_size=100, seed=0)
    features = detector._features(series[:, 0].astype(np.float64)).tolist()
    for row in features[:TRAIN_END]:
        reference.learn_one(dict(enumerate(row)))
    expected = []
    for row in features:
        expected.append(reference.score_one(dict(enumerate(row))))
        reference.learn_one(dict(enumerate(row)))

    np.testing.assert_allclose(detector.score(series), expected)


@pytest.mark.parametrize("make", [HalfSpaceTreesDetector, WindowedGaussianDetector])
def test_streaming_detectors_are_causal_and_repeatable(make: type) -> None:
    series = _spiked_series()
    detector = make()
    detector.fit(series[:TRAIN_END])

    whole = detector.score(series)

    assert detector.causal
    np.testing.assert_allclose(detector.score(series[:2700]), whole[:2700])
    np.testing.assert_allclose(detector.score(series), whole)


def test_windowed_gaussian_is_the_z_score_against_the_window_before() -> None:
    rng = np.random.default_rng(1)
    train = rng.standard_normal((50, 1))
    series = rng.standard_normal((30, 1))
    detector = WindowedGaussianDetector(window=10)
    detector.fit(train)

    scores = detector.score(series)

    stream = np.concatenate([train[-10:, 0], series[:, 0]])
    for t in (0, 5, 29):
        window = stream[t : t + 10]
        expected = abs(stream[t + 10] - window.mean()) / window.std()
        assert scores[t] == pytest.approx(expected, rel=1e-6)


def test_windowed_gaussian_locates_an_obvious_spike() -> None:
    series = _spiked_series()
    detector = WindowedGaussianDetector()
    detector.fit(series[:TRAIN_END])

    assert ucr_location(detector.score(series), TRAIN_END) == SPIKE_AT + 1


def test_detectors_reject_unusable_input() -> None:
    detector = HalfSpaceTreesDetector(channel=3)
    with pytest.raises(DetectorInputError, match="channel 3"):
        detector.fit(np.zeros((100, 2)))
    with pytest.raises(DetectorInputError, match="fit"):
        WindowedGaussianDetector().score(np.zeros((10, 1)))
    with pytest.raises(DetectorInputError, match="too few"):
        DiscordDetector().fit(np.zeros((6, 1)))


def test_registry_builds_detectors_with_profiles() -> None:
    assert set(detectors.DETECTORS) >= {"anomalyllm", "discord", "hst", "gaussian"}
    quick = get_detector("hst", profile="quick")
    assert quick.settings()["n_trees"] == 5
    assert get_detector("hst", profile="quick", n_trees=7).settings()["n_trees"] == 7
    assert get_detector("discord").name == "discord"
    level_unit = get_detector("anomalyllm-l2", profile="quick").settings()
    assert level_unit["level_unit_sigmas"] == 2.0
    assert get_detector("anomalyllm", profile="quick").settings()["level_unit_sigmas"] == 0.0


def test_registry_errors_say_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(detectors.DETECTORS, "missing", "trainer.no_such_module:Missing")
    monkeypatch.setitem(detectors.DETECTORS, "plain", "trainer.detectors:DiscordDetector")
    monkeypatch.setattr(DiscordDetector, "profiles", {})
    with pytest.raises(UnknownDetectorError, match="choose from"):
        get_detector("nope")
    with pytest.raises(DetectorUnavailableError, match=r"trainer\.no_such_module"):
        get_detector("missing")
    with pytest.raises(ValueError, match="no 'quick' profile"):
        get_detector("plain", profile="quick")
    with pytest.raises(ValueError, match="bad settings"):
        get_detector("hst", trees=3)
    with pytest.raises(ValueError, match="unknown profile"):
        get_detector("hst", profile="fast")
