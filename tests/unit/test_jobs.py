"""Pieces of the retraining job that need no broker and no training."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.devtools.tiny import tiny_model
from trainer.jobs import JobOptions, _model_config, score_windows
from trainer.prototypes import refit_prototypes

pytestmark = pytest.mark.unit


def test_scoring_several_models_gives_each_its_own_scores() -> None:
    parent = tiny_model(seed=1, channels=2).eval()
    refreshed = copy.deepcopy(parent)
    windows = np.random.default_rng(0).normal(size=(300, 2, 32)).astype(np.float32)
    refit_prototypes(refreshed, torch.from_numpy(windows))
    assert not torch.equal(parent.student.prototypes, refreshed.student.prototypes)

    scored = score_windows([refreshed, parent], windows, torch.device("cpu"))
    assert not np.allclose(scored[0], scored[1])
    for model, scores in zip([refreshed, parent], scored, strict=True):
        expected = model.score(torch.from_numpy(windows), attribution=False).score.numpy()
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_refit_moves_prototypes_to_the_data_and_keeps_unused_ones() -> None:
    model = tiny_model(seed=2).eval()
    before = model.student.prototypes.detach().clone()
    ramp = torch.linspace(-1, 1, 32).expand(50, 1, 32).clone()  # one pattern only
    refit_prototypes(model, ramp + 0.01 * torch.randn(50, 1, 32))
    after = model.student.prototypes.detach()
    moved = [k for k in range(4) if not torch.allclose(before[0, k], after[0, k], atol=1e-5)]
    assert len(moved) == 1  # the nearest prototype took every window, the rest stay
    direction = torch.nn.functional.cosine_similarity(after[0, moved[0]], ramp[0, 0], dim=0)
    assert direction > 0.99
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1))


def test_a_fitted_tail_term_weighs_the_readings_since_the_workers_last_scoring(
    tmp_path: Path,
) -> None:
    options = JobOptions(mode="fit", store=str(tmp_path), model_name="pumps")
    assert _model_config(options, channels=1, window_length=64, stride=16).tail_readings == 16
    # A window no longer than the stride keeps one reading for the rest of it.
    assert _model_config(options, channels=1, window_length=16, stride=16).tail_readings == 15
    overrides = tmp_path / "model.json"
    overrides.write_text(json.dumps({"tail_readings": 1, "score_terms": ["tail"]}))
    options = dataclasses.replace(options, model_config=overrides)
    assert _model_config(options, channels=1, window_length=64, stride=16).tail_readings == 1
