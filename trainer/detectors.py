"""Detectors evaluated side by side in one harness: AnomalyLLM and its baselines.

Every detector reads a series of shape ``[T, C]`` and returns one float per time
step (high = anomalous). ``fit`` sees only anomaly-free training data.
"""

from __future__ import annotations

import copy
import importlib
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from river.anomaly import HalfSpaceTrees


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


class RowScores(NamedTuple):
    """A float per time step and, per time step, the row where the cause of its score lies
    (a windowed detector's evidence may lie up to a window before the row it decides at;
    a point detector's is the row itself)."""

    score: np.ndarray  # (T,) float32
    evidence: np.ndarray  # (T,) int64


def score_rows(detector: Detector, series: np.ndarray) -> RowScores:
    """``detector.score(series)`` with where each score's cause lies: the detector's own
    ``score_rows`` where it has one, else every row its own evidence."""
    scored = getattr(detector, "score_rows", None)
    if scored is not None:
        return scored(series)
    return RowScores(detector.score(series), np.arange(len(series)))


class UnknownDetectorError(ValueError):
    """The registry has no detector of that name."""


class DetectorUnavailableError(ImportError):
    """A registered detector's module cannot be imported (not written yet or missing deps)."""


class DetectorInputError(ValueError):
    """A detector was given data it cannot use (wrong shape, too short, not fitted)."""


def _column(series: np.ndarray, channel: int, detector: str) -> np.ndarray:
    """Column ``channel`` of a ``[T, C]`` array as float64 ``[T]``."""
    series = np.asarray(series)
    if series.ndim != 2 or series.shape[0] == 0:
        raise DetectorInputError(
            f"{detector}: expected a non-empty [T, C] array, not {series.shape}"
        )
    if not 0 <= channel < series.shape[1]:
        raise DetectorInputError(
            f"{detector}: channel {channel} not in a series of {series.shape[1]} columns"
        )
    return series[:, channel].astype(np.float64)


def dominant_period(values: np.ndarray, min_period: int, max_period: int) -> int | None:
    """The dominant period of ``values`` by autocorrelation, or None if there is none.

    Among the local maxima of the autocorrelation with lag in ``[min_period, max_period]``
    and correlation above 0.2, take the shortest lag whose peak reaches 90% of the highest
    one: the highest peak alone would often pick a multiple of the true period.
    """
    centred = values - values.mean()
    n = centred.size
    max_period = min(max_period, n // 2)
    if max_period <= min_period or not np.any(centred):
        return None
    spectrum = np.fft.rfft(centred, 2 * n)
    acf = np.fft.irfft(spectrum * np.conj(spectrum))[: max_period + 2]
    acf = acf / acf[0]
    lags = np.arange(min_period, max_period + 1)
    is_peak = (acf[lags] > acf[lags - 1]) & (acf[lags] >= acf[lags + 1]) & (acf[lags] > 0.2)
    peaks = lags[is_peak]
    if peaks.size == 0:
        return None
    highest = acf[peaks].max()
    return int(peaks[acf[peaks] >= 0.9 * highest][0])


class DiscordDetector:
    """Matrix-profile discords (stumpy), the UCR archive's classic strong baseline.

    The score of a point is the z-normalised distance from the length-``m`` subsequence
    centred on it to its nearest neighbour. With ``join="train"`` (the usual setting for the
    archive) neighbours come from the training data only (an AB-join), so anything that
    never happened in training stands out; ``join="self"`` is the classic self-join discord
    over the scored series. ``m`` defaults to the dominant period of the training data
    (``dominant_period``), or ``default_m`` when it has none. Not causal: the score of a
    point sees ``m // 2`` points ahead.
    """

    name = "discord"
    causal = False
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"quick": {"max_reference": 20_000}}

    def __init__(
        self,
        m: int | None = None,
        join: str = "train",
        min_m: int = 16,
        max_m: int = 1000,
        default_m: int = 100,
        max_reference: int | None = None,
        channel: int = 0,
    ) -> None:
        if join not in ("train", "self"):
            raise ValueError(f"join must be 'train' or 'self', not {join!r}")
        if m is not None and m < 4:
            raise ValueError(f"m must be at least 4, not {m}")
        if not 4 <= min_m <= default_m <= max_m:
            raise ValueError("need 4 <= min_m <= default_m <= max_m")
        if max_reference is not None and max_reference < 2 * min_m:
            raise ValueError(f"max_reference must be at least 2 * min_m, not {max_reference}")
        self.m = m
        self.join = join
        self.min_m = min_m
        self.max_m = max_m
        self.default_m = default_m
        self.max_reference = max_reference  # AB-join against only the last N training points
        self.channel = channel
        self._fitted_m: int | None = None
        self._reference: np.ndarray | None = None

    def fit(self, train: np.ndarray) -> None:
        """Choose ``m`` from the training data and keep it as the join reference."""
        values = _column(train, self.channel, self.name)
        if self.max_reference is not None:
            values = values[-self.max_reference :]
        if self.m is not None:
            m = self.m
        else:
            m = dominant_period(values, self.min_m, self.max_m) or self.default_m
        m = min(m, values.size // 2)
        if m < 4:
            raise DetectorInputError(f"{self.name}: {values.size} training points are too few")
        self._fitted_m = m
        self._reference = values

    def score(self, series: np.ndarray) -> np.ndarray:
        """Nearest-neighbour distance of the subsequence centred on each point ([T, C] -> [T])."""
        if self._reference is None or self._fitted_m is None:
            raise DetectorInputError(f"{self.name}: call fit before score")
        import stumpy  # here, not at the top: importing it (numba) takes seconds

        values = _column(series, self.channel, self.name)
        m = self._fitted_m
        if values.size < m:
            raise DetectorInputError(
                f"{self.name}: series of {values.size} points is shorter than m={m}"
            )
        distances = np.zeros(values.size - m + 1)  # (T - m + 1,) one per subsequence start
        if self.join == "self":
            distances[:] = stumpy.stump(values, m)[:, 0]
        else:
            first = self._first_unseen_start(values)
            if first < distances.size:
                profile = stumpy.stump(values[first:], m, T_B=self._reference, ignore_trivial=False)
                distances[first:] = profile[:, 0]
        starts = np.clip(np.arange(values.size) - m // 2, 0, distances.size - 1)
        return distances[starts]

    def _first_unseen_start(self, values: np.ndarray) -> int:
        """Where subsequences stop being part of the reference, when ``values`` starts with it.

        A subsequence that is part of the reference has distance 0 to itself, so it need not
        be joined: this skips the training prefix the UCR harness scores along with the rest.
        """
        reference = self._reference
        if reference is None or values.size < reference.size:
            return 0
        if not np.array_equal(values[: reference.size], reference):
            return 0
        return reference.size - self._fitted_m + 1

    def settings(self) -> dict[str, Any]:
        """Constructor settings; ``m`` is the fitted value once ``fit`` has run."""
        return {
            "m": self._fitted_m if self._fitted_m is not None else self.m,
            "join": self.join,
            "min_m": self.min_m,
            "max_m": self.max_m,
            "default_m": self.default_m,
            "max_reference": self.max_reference,
            "channel": self.channel,
        }


class SelfJoinDiscordDetector(DiscordDetector):
    """The classic discord: the whole series joined with itself (``join="self"``)."""

    name = "discord-self"

    def __init__(self, **settings: Any) -> None:
        super().__init__(**{"join": "self", **settings})


class HalfSpaceTreesDetector:
    """River's Half-Space Trees on the last ``window`` values, streaming and causal.

    Values are scaled by the training range (so training data lies in [0, 1], River's
    default feature limits). Every point is scored, then learned (``score_one`` then
    ``learn_one``). River is pure Python; 10 trees of height 8 (River's defaults) cost
    about 40 µs per point, 20k points in about a second.
    """

    name = "hst"
    causal = True
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"quick": {"n_trees": 5, "height": 6}}

    def __init__(
        self,
        window: int = 16,
        n_trees: int = 10,
        height: int = 8,
        window_size: int = 250,
        seed: int = 0,
        channel: int = 0,
    ) -> None:
        if window < 1 or n_trees < 1 or height < 1 or window_size < 1:
            raise ValueError("window, n_trees, height and window_size must be positive")
        self.window = window
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.seed = seed
        self.channel = channel
        self._low = 0.0
        self._span = 1.0
        self._model: HalfSpaceTrees | None = None

    def _features(self, values: np.ndarray) -> np.ndarray:
        """Scaled windows ending at each point, the first padded with the first value."""
        scaled = (values - self._low) / self._span
        padded = np.concatenate([np.full(self.window - 1, scaled[0]), scaled])
        return sliding_window_view(padded, self.window)  # (T, window)

    def fit(self, train: np.ndarray) -> None:
        """Learn the training range and the tree masses from anomaly-free data."""
        values = _column(train, self.channel, self.name)
        self._low = float(values.min())
        span = float(values.max()) - self._low
        self._span = span if span > 0 else 1.0
        # Imported here: river is an evaluation extra, not needed by the trainer image.
        from river.anomaly import HalfSpaceTrees

        model = HalfSpaceTrees(
            n_trees=self.n_trees,
            height=self.height,
            window_size=self.window_size,
            seed=self.seed,
        )
        # HST's state after learning is the masses of the last full window plus the points
        # since: learning only that suffix gives exactly the state learning everything gives.
        features = self._features(values)
        keep = self.window_size + features.shape[0] % self.window_size
        keys = range(self.window)
        for row in features[-keep:].tolist():
            model.learn_one(dict(zip(keys, row, strict=True)))
        self._model = model

    def score(self, series: np.ndarray) -> np.ndarray:
        """Score then learn each point in turn; the fitted model itself is left unchanged."""
        if self._model is None:
            raise DetectorInputError(f"{self.name}: call fit before score")
        model = copy.deepcopy(self._model)
        keys = range(self.window)
        scores = np.empty(series.shape[0], dtype=np.float64)
        for index, row in enumerate(
            self._features(_column(series, self.channel, self.name)).tolist()
        ):
            features = dict(zip(keys, row, strict=True))
            scores[index] = model.score_one(features)
            model.learn_one(features)
        return scores

    def settings(self) -> dict[str, Any]:
        """The hyper-parameters."""
        return {
            "window": self.window,
            "n_trees": self.n_trees,
            "height": self.height,
            "window_size": self.window_size,
            "seed": self.seed,
            "channel": self.channel,
            "scaling": "training min-max",
        }


class WindowedGaussianDetector:
    """Causal rolling z-score: ``|x[t] - mean| / std`` over the ``window`` points before t.

    Like NAB's windowedGaussian (which reports the Gaussian tail probability of the same
    z, so the same ranking). The stream is taken to continue from the end of the training
    data, whose last ``window`` points fill the first windows.
    """

    name = "gaussian"
    causal = True
    profiles: ClassVar[dict[str, dict[str, Any]]] = {"quick": {}}  # already cheap

    def __init__(self, window: int = 1000, channel: int = 0) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2, not {window}")
        self.window = window
        self.channel = channel
        self._history: np.ndarray | None = None

    def fit(self, train: np.ndarray) -> None:
        """Keep the last ``window`` training points as the history the stream starts from."""
        values = _column(train, self.channel, self.name)
        if values.size < 2:
            raise DetectorInputError(f"{self.name}: need at least 2 training points")
        self._history = values[-self.window :]

    def score(self, series: np.ndarray) -> np.ndarray:
        """The z-score of each point against the window before it ([T, C] -> [T])."""
        if self._history is None:
            raise DetectorInputError(f"{self.name}: call fit before score")
        values = _column(series, self.channel, self.name)
        stream = np.concatenate([self._history, values])
        stream = stream - self._history.mean()  # centred, so the running sums lose less
        sums = np.concatenate([[0.0], np.cumsum(stream)])
        squares = np.concatenate([[0.0], np.cumsum(stream * stream)])
        ends = np.arange(self._history.size, stream.size)  # window for stream[t] is [start, t)
        starts = np.maximum(ends - self.window, 0)
        counts = ends - starts
        mean = (sums[ends] - sums[starts]) / counts
        variance = np.maximum((squares[ends] - squares[starts]) / counts - mean * mean, 0.0)
        std = np.sqrt(variance) + 1e-9
        return np.abs(stream[self._history.size :] - mean) / std

    def settings(self) -> dict[str, Any]:
        """The hyper-parameters."""
        return {"window": self.window, "channel": self.channel}


DETECTORS: dict[str, str] = {
    "anomalyllm": "trainer.anomalyllm_detector:AnomalyLLMDetector",
    "anomalyllm-fixed-edges": "trainer.anomalyllm_detector:AnomalyLLMFixedEdgesDetector",
    "anomalyllm-bounded-edges": "trainer.anomalyllm_detector:AnomalyLLMBoundedEdgesDetector",
    "anomalyllm-global": "trainer.anomalyllm_detector:AnomalyLLMGlobalDetector",
    "anomalyllm-l2": "trainer.anomalyllm_detector:AnomalyLLMLevelUnitDetector",
    "anomalyllm-paper": "trainer.anomalyllm_detector:AnomalyLLMPaperDetector",
    "discord": "trainer.detectors:DiscordDetector",
    "discord-self": "trainer.detectors:SelfJoinDiscordDetector",
    "gaussian": "trainer.detectors:WindowedGaussianDetector",
    "hst": "trainer.detectors:HalfSpaceTreesDetector",
}
PROFILES = ("default", "quick")


def detector_class(name: str) -> type:
    """The class registered as ``name``, imported on first use."""
    if name not in DETECTORS:
        raise UnknownDetectorError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
    module_name, class_name = DETECTORS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DetectorUnavailableError(
            f"detector {name!r} needs module {module_name} which cannot be imported: {error}"
        ) from error
    try:
        return getattr(module, class_name)
    except AttributeError as error:
        raise DetectorUnavailableError(f"{module_name} defines no {class_name}") from error


def get_detector(
    name: str, profile: str = "default", streaming: bool = False, **settings: Any
) -> Detector:
    """A new detector: its class's settings for ``profile``, overridden by ``settings``.

    A detector class lists what differs from its defaults per profile in a class attribute,
    ``profiles = {"quick": {...}}``; asking for a profile it does not list is an error, so
    a "quick" run never silently uses the default settings. ``streaming=True`` applies the
    class's ``streaming_settings`` (what makes it causal), for streaming benchmarks.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    cls = detector_class(name)
    profiles: dict[str, dict[str, Any]] = getattr(cls, "profiles", {})
    if profile != "default" and profile not in profiles:
        raise ValueError(
            f"detector {name!r} defines no {profile!r} profile: add it to {cls.__name__}.profiles"
        )
    try:
        streaming_settings = getattr(cls, "streaming_settings", {}) if streaming else {}
        return cls(**{**profiles.get(profile, {}), **streaming_settings, **settings})
    except TypeError as error:
        raise ValueError(f"bad settings for detector {name!r}: {error}") from error
