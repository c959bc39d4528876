"""Checkpoints rebuild the same model and refuse tampered or incomplete files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stream_detector.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from stream_detector.devtools.tiny import tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    model = tiny_model(channels=2).eval()
    x = torch.randn(6, 2, 32)
    directory = save_checkpoint(
        model,
        tmp_path / "v1",
        {"version": "v1", "training_data": {"source": "unit"}},
        thresholds={"default": {"threshold": 1.5, "method": "quantile"}},
    )
    return directory, x, model.score(x).score


def test_round_trip_gives_identical_scores(saved: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    directory, x, expected = saved
    checkpoint = load_checkpoint(directory)
    assert torch.equal(checkpoint.model.score(x).score, expected)
    assert checkpoint.version == "v1"
    assert checkpoint.thresholds == {"default": {"threshold": 1.5, "method": "quantile"}}
    metadata = read_metadata(directory)
    assert metadata["training_data"] == {"source": "unit"}
    assert metadata["libraries"]["torch"] != "absent"
    assert len(metadata["weights_sha256"]) == 64


def test_modified_weights_are_refused(saved: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    directory, _, _ = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(directory)


def test_truncated_weights_are_refused(saved: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    directory, _, _ = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="modified or truncated"):
        load_checkpoint(directory)


def test_missing_config_is_refused(saved: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    directory, _, _ = saved
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(directory)


def test_weights_that_do_not_fit_the_config_are_refused(
    saved: tuple[Path, torch.Tensor, torch.Tensor],
) -> None:
    directory, _, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["model"]["prototypes"] = 9
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(directory)


def test_a_fused_model_round_trips_with_its_memory_and_term_statistics(tmp_path: Path) -> None:
    terms = ("discrepancy", "memory", "level", "scale")
    model = tiny_model(channels=2, score_terms=terms, memory_size=16).eval()
    model.calibrate(torch.randn(40, 2, 32), torch.randn(20, 2, 32))
    x = torch.randn(6, 2, 32)
    checkpoint = load_checkpoint(save_checkpoint(model, tmp_path / "fused", {"version": "f"}))
    assert checkpoint.model.config.score_terms == terms
    assert torch.equal(checkpoint.model.memory, model.memory)
    assert torch.equal(checkpoint.model.score(x).score, model.score(x).score)


def test_a_checkpoint_written_before_score_terms_existed_keeps_the_papers_score(
    tmp_path: Path,
) -> None:
    model = tiny_model(score_terms=("discrepancy",)).eval()
    directory = save_checkpoint(model, tmp_path / "old", {"version": "old"})
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    del config["model"]["score_terms"], config["model"]["memory_size"]
    config_path.write_text(json.dumps(config))
    x = torch.randn(4, 1, 32)
    checkpoint = load_checkpoint(directory)
    assert checkpoint.model.config.score_terms == ("discrepancy",)
    assert torch.equal(checkpoint.model.score(x).score, model.score(x).score)


def test_a_bank_smaller_than_its_cap_round_trips_and_a_recalibration_can_grow_it(
    tmp_path: Path,
) -> None:
    model = tiny_model().eval()  # the default score: a bank of up to 16,384 windows
    model.calibrate(torch.randn(40, 1, 32), torch.randn(20, 1, 32))
    assert model.memory.shape == (1, 40, 32)
    checkpoint = load_checkpoint(save_checkpoint(model, tmp_path / "small", {"version": "s"}))
    x = torch.randn(6, 1, 32)
    assert torch.equal(checkpoint.model.score(x).score, model.score(x).score)
    checkpoint.model.calibrate(torch.randn(90, 1, 32), torch.randn(20, 1, 32))
    assert checkpoint.model.memory.shape == (1, 90, 32)
