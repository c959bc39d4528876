"""Training: the loss, determinism, early stopping and that it learns what normal is."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stream_detector.devtools.tiny import tiny_config, tiny_model
from trainer.prototypes import spherical_kmeans
from trainer.train import (
    TrainConfig,
    anomalyllm_loss,
    fit,
    scaling,
    sliding_windows,
    time_warp,
)

pytestmark = pytest.mark.unit

SMALL = TrainConfig(epochs=6, batch_size=16, max_train_windows=96, patience=10, learning_rate=3e-3)


def sine_series(length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    time = np.arange(length)
    return (np.sin(2 * np.pi * time / 16) + 0.05 * rng.standard_normal(length))[:, None].astype(
        np.float32
    )


def test_sliding_windows_shape_and_content() -> None:
    series = np.arange(20, dtype=np.float32).reshape(10, 2)
    windows = sliding_windows(series, 4, 3)
    assert windows.shape == (3, 2, 4)
    assert windows[1, 0].tolist() == [6, 8, 10, 12]


def test_sliding_windows_refuses_short_series() -> None:
    with pytest.raises(ValueError, match="shorter than a window"):
        sliding_windows(np.zeros((3, 1), dtype=np.float32), 4, 1)


def test_loss_is_finite_and_has_gradients_only_where_trainable() -> None:
    model = tiny_model()
    loss = anomalyllm_loss(model, torch.randn(8, 1, 32), SMALL, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name


def test_augmentations_keep_shape_and_change_values() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 32)
    assert scaling(x, 2.0, 0.5, generator).shape == x.shape
    warped = time_warp(x, generator)
    assert warped.shape == x.shape and not torch.allclose(warped, x)


def test_training_is_deterministic_with_a_seed() -> None:
    windows = sliding_windows(sine_series(600), 32, 4)
    runs = [
        fit(windows, tiny_config(), SMALL, model=tiny_model(seed=1), progress=False)
        for _ in range(2)
    ]
    assert runs[0].validation_loss == runs[1].validation_loss
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_lowers_validation_loss_and_separates_anomalies() -> None:
    windows = sliding_windows(sine_series(1200), 32, 4)
    result = fit(windows, tiny_config(), SMALL, model=tiny_model(seed=1), progress=False)
    assert min(result.validation_loss) < result.validation_loss[0]
    test = sliding_windows(sine_series(400, seed=5), 32, 8)
    broken = test.copy()
    broken[:, 0, 12:20] = np.random.default_rng(0).standard_normal((len(test), 8)) * 2
    normal_scores = result.model.score(torch.from_numpy(test)).score
    broken_scores = result.model.score(torch.from_numpy(broken)).score
    assert broken_scores.median() > normal_scores.quantile(0.9)


def test_early_stopping_restores_the_best_epoch() -> None:
    windows = sliding_windows(sine_series(600), 32, 4)
    config = dataclasses.replace(SMALL, epochs=30, patience=1, learning_rate=5e-2)
    result = fit(windows, tiny_config(), config, model=tiny_model(seed=1), progress=False)
    if result.stopped_by == "early_stopping":
        assert result.best_epoch < len(result.validation_loss) - 1
    assert result.validation_loss[result.best_epoch] == min(result.validation_loss)


def test_too_few_windows_is_a_clear_error() -> None:
    windows = sliding_windows(sine_series(40), 32, 4)
    with pytest.raises(ValueError, match="too few"):
        fit(windows, tiny_config(), SMALL, model=tiny_model(), progress=False)


def test_spherical_kmeans_finds_separate_clusters() -> None:
    base = torch.eye(3, 8)
    points = torch.cat([base[i] + 0.01 * torch.randn(20, 8) for i in range(3)])
    centers = spherical_kmeans(points, 3)
    assert sorted(centers.argmax(dim=1).tolist()) == [0, 1, 2]


def test_a_fused_model_leaves_fit_calibrated_on_windows_it_did_not_train_on() -> None:
    terms = ("discrepancy", "memory")
    windows = sliding_windows(sine_series(1200), 32, 4)
    config = tiny_config(score_terms=terms, memory_size=128)
    model = tiny_model(seed=1, score_terms=terms, memory_size=128)
    result = fit(windows, config, SMALL, model=model, progress=False)
    held_back = windows[-int(len(windows) * SMALL.validation_fraction) :]
    scores = result.model.score(torch.from_numpy(held_back)).score
    assert 0.2 < float((scores > 0).float().mean()) < 0.8  # 0 at each term's median
    test = sliding_windows(sine_series(400, seed=5), 32, 8)
    broken = test.copy()
    broken[:, 0, 12:20] = 0.0  # a flat stretch where the sine should swing
    broken_scores = result.model.score(torch.from_numpy(broken)).score
    assert broken_scores.min() > scores.max()
