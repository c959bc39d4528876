"""The CUDA path: scoring and training on a GPU agree with the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_detector.devtools.tiny import tiny_config, tiny_model
from trainer.train import TrainConfig, fit, sliding_windows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine"),
]


def test_cuda_scores_match_cpu_scores_under_mixed_precision() -> None:
    model = tiny_model(channels=2).eval()
    x = torch.randn(64, 2, 32)
    expected = model.score(x).score
    cuda_model = model.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        actual = cuda_model.score(x.pin_memory().to("cuda", non_blocking=True)).score.cpu()
    assert torch.allclose(actual, expected, rtol=0.05, atol=0.05)


def test_training_runs_on_cuda() -> None:
    time = np.arange(800)
    series = np.sin(2 * np.pi * time / 16)[:, None].astype(np.float32)
    config = TrainConfig(epochs=2, batch_size=16, max_train_windows=64)
    result = fit(
        sliding_windows(series, 32, 4),
        tiny_config(),
        config,
        device="cuda",
        model=tiny_model(),
        progress=False,
    )
    assert next(result.model.parameters()).is_cuda
    assert np.isfinite(result.validation_loss).all()
