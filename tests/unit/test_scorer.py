"""The model registry follows CURRENT between batches; the scorer scores stacked windows."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector import store
from stream_detector.devtools.tiny import tiny_model
from stream_detector.scorer import ModelRegistry, Scorer, resolve_device, trace_scoring

pytestmark = pytest.mark.unit

THRESHOLDS = {"default": {"threshold": 2.0, "method": "quantile", "q": 0.99}}


def registry_for(
    root: Path, clock: list[float], window_length: int = 32, trace: bool = True
) -> ModelRegistry:
    return ModelRegistry(
        root,
        ["pumps"],
        device=torch.device("cpu"),
        window_length=window_length,
        poll_interval_s=10.0,
        trace=trace,
        clock=lambda: clock[0],
    )


def test_current_is_read_once_per_poll_interval_and_new_versions_swap_in(tmp_path: Path) -> None:
    clock = [0.0]
    registry = registry_for(tmp_path, clock)
    assert registry.refresh() == [] and registry.get("pumps") is None
    first = store.publish_version(tmp_path, "pumps", tiny_model(seed=1), thresholds=THRESHOLDS)
    assert registry.refresh() == []  # the poll interval has not passed
    clock[0] = 10.0
    assert registry.refresh() == [("pumps", first, None)]
    assert registry.get("pumps").thresholds.default == 2.0
    assert registry.shape_of("pumps") == (1, 32)

    second = store.publish_version(tmp_path, "pumps", tiny_model(seed=2))
    assert registry.refresh(force=True) == [("pumps", second, None)]
    assert registry.loaded == {"pumps": second}
    assert registry.get("pumps").thresholds.default is None  # that version has no thresholds


def test_a_refused_version_is_not_retried_until_current_changes(tmp_path: Path) -> None:
    first = store.publish_version(tmp_path, "pumps", tiny_model())
    registry = registry_for(tmp_path, [0.0])
    registry.refresh()
    bad = store.publish_version(tmp_path, "pumps", tiny_model(seed=3), promote=False)
    (store.version_dir(tmp_path, "pumps", bad) / "model.safetensors").write_bytes(b"x")
    store.promote(tmp_path, "pumps", bad)
    (event,) = registry.refresh(force=True)
    assert event.version == bad and event.error
    assert registry.refresh(force=True) == []
    assert registry.loaded == {"pumps": first}
    store.promote(tmp_path, "pumps", first)  # rolling back is fine: already served
    assert registry.refresh(force=True) == []


def test_a_model_for_another_window_length_is_refused(tmp_path: Path) -> None:
    version = store.publish_version(tmp_path, "pumps", tiny_model())
    registry = registry_for(tmp_path, [0.0], window_length=64)
    (event,) = registry.refresh()
    assert event.version == version and "window_length is 32" in event.error
    assert registry.get("pumps") is None


def test_scores_match_the_model_and_name_the_most_attributed_channel(tmp_path: Path) -> None:
    store.publish_version(tmp_path, "pumps", tiny_model(channels=3))
    registry = registry_for(tmp_path, [0.0])
    registry.refresh()
    windows = np.random.default_rng(0).normal(size=(4, 3, 32)).astype(np.float32)
    windows[2, 1] *= 50  # one wild channel

    scores = Scorer(registry, device=torch.device("cpu"), mixed_precision=True).score(
        "pumps", windows
    )
    expected = registry.get("pumps").model.score(torch.from_numpy(windows))
    assert [s.score for s in scores] == pytest.approx(expected.score.tolist(), rel=1e-5)
    for i, result in enumerate(scores):
        assert sum(result.attribution) == pytest.approx(1.0)
        top = int(np.argmax(result.attribution))
        assert result.nearest_prototype == int(expected.nearest_prototype[i, top])
    with pytest.raises(LookupError, match="no version loaded"):
        Scorer(registry, device=torch.device("cpu"), mixed_precision=False).score("fans", windows)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_loaded_model_scores_through_its_trace_exactly_as_the_model(
    tmp_path: Path, channels: int
) -> None:
    store.publish_version(tmp_path, "pumps", tiny_model(channels=channels))
    registry = registry_for(tmp_path, [0.0])
    registry.refresh()
    loaded = registry.get("pumps")
    assert loaded.score != loaded.model.score  # the trace
    rng = np.random.default_rng(1)
    for batch in (1, 5, 40):  # the trace was taken on 8 windows
        windows = torch.from_numpy(rng.normal(size=(batch, channels, 32)).astype(np.float32))
        with torch.inference_mode():
            traced, eager = loaded.score(windows), loaded.model.score(windows)
        for field in dataclasses.fields(eager):
            assert torch.equal(getattr(traced, field.name), getattr(eager, field.name))

    untraced = registry_for(tmp_path, [0.0], trace=False)
    untraced.refresh()
    assert untraced.get("pumps").score == untraced.get("pumps").model.score


def test_a_model_its_trace_would_score_otherwise_is_scored_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tiny_model().eval()
    plain = model.score

    def score_by_batch_size(x: torch.Tensor) -> object:
        scores = plain(x)  # a branch the tracer sees only as the traced batch takes it
        return scores if len(x) == 8 else dataclasses.replace(scores, score=scores.score + 1)

    model.score = score_by_batch_size
    with caplog.at_level(logging.WARNING, logger="stream_detector.scorer"):
        assert trace_scoring(model) == score_by_batch_size
    assert "scores otherwise" in caplog.text


def test_auto_device_is_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"  # an explicit device is taken as given
