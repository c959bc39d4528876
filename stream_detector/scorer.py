"""Models in memory: a registry that follows the store's CURRENT pointers, and batch scoring.

``ModelRegistry.refresh`` is called between batches; when a model's CURRENT names a new
version it loads it and swaps it in. A version that fails to load (tampered weights, a
missing file, an incompatible window length) is refused: logged, reported, remembered so
it is not retried every poll, and the version already loaded keeps serving.

On a CPU each loaded model is traced (`trace_scoring`): the traced graph runs without
Python between its operations, so it holds the GIL only to start. The worker scores a
batch on a thread while its loop decodes and appends the next poll; an eagerly run model
takes the GIL back after every one of its hundreds of small operations, and under a busy
loop waits up to a switch interval (5 ms) each time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from stream_detector import store
from stream_detector.alerts import InvalidThresholds, Thresholds
from stream_detector.checkpoint import CheckpointError
from stream_detector.model import AnomalyLLM, Scores

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to score."""

    name: str
    version: str
    model: AnomalyLLM
    thresholds: Thresholds
    # The model's `AnomalyLLM.score`, or its trace (`trace_scoring`).
    score: Callable[[torch.Tensor], Scores]

    @property
    def shape(self) -> tuple[int, int]:
        """(channels, window_length) of the windows it scores."""
        return self.model.config.channels, self.model.config.window_length


class ModelEvent(NamedTuple):
    """A version that ``refresh`` swapped in (``error`` None) or refused.

    ``version`` is None when the store could not be read at all.
    """

    model_name: str
    version: str | None
    error: str | None


class ModelRegistry:
    """The served version of each configured model, following CURRENT in a local store."""

    def __init__(
        self,
        store_root: Path | str,
        model_names: Iterable[str],
        *,
        device: torch.device,
        window_length: int,
        poll_interval_s: float,
        trace: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store_root = store_root  # a path or a URL: kept as given
        self.model_names = tuple(dict.fromkeys(model_names))
        self.device = device
        self.window_length = window_length
        self.trace = trace and device.type == "cpu"
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._next_poll_s = 0.0
        self._models: dict[str, LoadedModel] = {}
        self._shapes: dict[str, tuple[int, int]] = {}  # looked up for every reading
        self._refused: dict[str, str] = {}  # model name -> version that failed to load
        self.pointed: dict[str, str] = {}  # model name -> version CURRENT named at the last poll

    def get(self, model_name: str) -> LoadedModel | None:
        """The version being served, or None when the model has none loaded."""
        return self._models.get(model_name)

    def shape_of(self, model_name: str) -> tuple[int, int] | None:
        """(channels, window_length) of a loaded model, None when none is loaded."""
        return self._shapes.get(model_name)

    @property
    def loaded(self) -> dict[str, str]:
        """Model name -> version for every loaded model."""
        return {name: loaded.version for name, loaded in self._models.items()}

    def refresh(self, force: bool = False) -> list[ModelEvent]:
        """Check every CURRENT pointer (at most once per poll interval unless ``force``)."""
        now = self._clock()
        if not force and now < self._next_poll_s:
            return []
        self._next_poll_s = now + self.poll_interval_s
        events = []
        for name in self.model_names:
            loaded = self._models.get(name)
            try:
                version = store.current_version(self.store_root, name)
            except Exception as error:  # whatever the backend raises, keep serving
                logger.warning(
                    "cannot read the CURRENT pointer of model %s (%s); still serving %s",
                    name,
                    error,
                    loaded.version if loaded else "nothing",
                )
                events.append(ModelEvent(name, None, f"store unreadable: {error}"))
                continue
            if version is not None:
                self.pointed[name] = version
            if version is None or (loaded and loaded.version == version):
                continue
            if self._refused.get(name) == version:
                continue
            events.append(self._load(name, version))
        return events

    def _load(self, name: str, version: str) -> ModelEvent:
        try:
            checkpoint = store.load_version(self.store_root, name, version, self.device)
            thresholds = Thresholds.from_dict(checkpoint.thresholds or {})
            length = checkpoint.model.config.window_length
            if length != self.window_length:
                raise CheckpointError(
                    f"its window_length is {length}, the worker's is {self.window_length}; "
                    "retrain the model or set DETECTOR_WINDOW_LENGTH to match"
                )
        except (CheckpointError, InvalidThresholds, store.ModelStoreError, OSError) as error:
            self._refused[name] = version
            kept = self._models.get(name)
            logger.error(
                "refusing model %s version %s (%s); still serving %s",
                name,
                version,
                error,
                kept.version if kept else "nothing",
            )
            return ModelEvent(name, version, str(error))
        old = self._models.get(name)
        model = checkpoint.model  # in eval mode (`checkpoint.load_checkpoint`)
        score = trace_scoring(model) if self.trace else model.score
        self._models[name] = LoadedModel(name, version, model, thresholds, score)
        self._shapes[name] = self._models[name].shape
        self._refused.pop(name, None)
        logger.info(
            "serving model %s version %s (was %s)", name, version, old.version if old else "none"
        )
        return ModelEvent(name, version, None)


class _ScoreTensors(torch.nn.Module):
    """`AnomalyLLM.score` with its fields as a tuple of tensors, which tracing needs."""

    def __init__(self, model: AnomalyLLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _fields(self.model.score(x))


def _fields(scores: Scores) -> tuple[torch.Tensor, ...]:
    return tuple(getattr(scores, field.name) for field in dataclasses.fields(scores))


def trace_scoring(model: AnomalyLLM) -> Callable[[torch.Tensor], Scores]:
    """``model.score`` as a traced graph, checked against the model on another batch size;
    the model itself when it cannot be traced or its trace scores otherwise (a branch on
    the data would be frozen at the traced batch's)."""
    channels, length = model.config.channels, model.config.window_length
    generator = torch.Generator().manual_seed(0)
    example, check = (torch.randn(n, channels, length, generator=generator) for n in (8, 3))
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The tracer warns of every shape read as a number; windows have one shape.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(_ScoreTensors(model), example, check_trace=False)
            same = all(
                torch.equal(got, expected)
                for got, expected in zip(traced(check), _fields(model.score(check)), strict=True)
            )
    except Exception as error:  # whatever tracing raises, the model still scores
        logger.warning("scoring model eagerly: it cannot be traced (%s)", error)
        return model.score
    if not same:
        logger.warning("scoring model eagerly: its trace scores otherwise than the model")
        return model.score

    def score(x: torch.Tensor) -> Scores:
        # Run as traced: the profiling executor would re-specialise the graph as batch
        # sizes change.
        with torch.jit.optimized_execution(False):
            return Scores(*traced(x))

    return score


class WindowScore(NamedTuple):
    """The model's verdict on one window."""

    score: float
    # The nearest prototype of the channel that contributes most to the score.
    nearest_prototype: int
    attribution: tuple[float, ...]  # per channel, sums to 1
    peak_offset: int  # where in the window its cause lies (`Scores.peak_offset`)
    # Each term of a fused score and where in the window it lies (`Scores.terms`); empty
    # for the paper's score. The alert path measures them from the sensor's own edges of
    # normal (`alerts.adapt_terms`).
    terms: tuple[float, ...] = ()
    term_offsets: tuple[int, ...] = ()


class Scorer:
    """Scores stacked windows with the registry's models on one device."""

    def __init__(
        self, registry: ModelRegistry, *, device: torch.device, mixed_precision: bool
    ) -> None:
        self.registry = registry
        self.device = device
        self._cuda = device.type == "cuda"
        self._autocast = mixed_precision and self._cuda

    def score(self, model_name: str, windows: np.ndarray) -> list[WindowScore]:
        """Score windows (B, C, L) float32 with the served version of ``model_name``."""
        return self.window_scores(self.infer(model_name, windows))

    def infer(self, model_name: str, windows: np.ndarray) -> Scores:
        """The served model's scores of windows (B, C, L) as tensors.

        The part of scoring a thread of its own can run beside a busy loop: a traced model
        gives up the GIL once, and takes it back once. Every tensor call gives it up and
        waits up to a switch interval (5 ms) to take it back while the loop holds it, so
        the verdicts are read out by ``window_scores`` on the loop's own thread.
        """
        loaded = self.registry.get(model_name)
        if loaded is None:
            raise LookupError(f"model {model_name!r} has no version loaded")
        batch = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
        if self._cuda:
            # Pinned host memory lets the copy overlap with whatever the GPU is still doing.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast),
        ):
            return loaded.score(batch)

    def window_scores(self, result: Scores) -> list[WindowScore]:
        """One verdict per window of ``infer``'s result."""
        scores = result.score.float().cpu().numpy()
        prototypes = result.nearest_prototype.cpu().numpy()
        attributions = result.attribution.float().cpu().numpy()
        peaks = result.peak_offset.cpu().tolist()
        terms = result.terms.float().cpu().tolist()
        term_offsets = result.term_offsets.cpu().tolist()
        top_channel = attributions.argmax(axis=1)
        return [
            WindowScore(
                float(scores[i]),
                int(prototypes[i, top_channel[i]]),
                tuple(float(a) for a in attributions[i]),
                peaks[i],
                tuple(terms[i]),
                tuple(term_offsets[i]),
            )
            for i in range(len(scores))
        ]
