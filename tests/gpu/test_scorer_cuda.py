"""The worker's scorer on CUDA: pinned copies and bf16 autocast agree with the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector import store
from stream_detector.devtools.tiny import tiny_model
from stream_detector.scorer import ModelRegistry, Scorer, resolve_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; none on this machine"),
]


def scores_on(device: torch.device, root: Path, windows: np.ndarray) -> list[float]:
    registry = ModelRegistry(root, ["pumps"], device=device, window_length=32, poll_interval_s=60.0)
    registry.refresh()
    scorer = Scorer(registry, device=device, mixed_precision=True)
    return [s.score for s in scorer.score("pumps", windows)]


def test_auto_picks_cuda_and_mixed_precision_scores_match_the_cpu(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = tiny_model(channels=2).eval()
    # Calibrated, so the memory term compares against a real bank under bf16 autocast.
    normal = torch.from_numpy(rng.normal(size=(300, 2, 32)).astype(np.float32))
    model.calibrate(normal[:200], normal[200:])
    store.publish_version(tmp_path, "pumps", model)
    windows = np.concatenate([normal[:32].numpy(), rng.normal(size=(32, 2, 32))]).astype(np.float32)
    device = resolve_device("auto")
    assert device.type == "cuda"
    expected = scores_on(torch.device("cpu"), tmp_path, windows)
    assert scores_on(device, tmp_path, windows) == pytest.approx(expected, rel=0.05, abs=0.05)
