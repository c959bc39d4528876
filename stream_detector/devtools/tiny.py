"""Tiny randomly initialised models, so model tests and benchmarks run in seconds without
real weights."""

from __future__ import annotations

import dataclasses

from stream_detector.model import AnomalyLLM, ModelConfig

TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 64,
    "vocab_size": 1,
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1,
    "max_position_embeddings": 64,
}


def tiny_config(backbone_config: dict | None = None, **overrides: object) -> ModelConfig:
    config = ModelConfig(
        window_length=32,
        patch_length=8,
        patch_stride=8,
        embedding_dim=16,
        backbone="tiny",
        backbone_layers=2,
        prototypes=4,
        student_dim=16,
        student_layers=1,
        student_heads=2,
        backbone_config=backbone_config or TINY_GPT2,
    )
    return dataclasses.replace(config, **overrides)


def tiny_model(seed: int = 0, **overrides: object) -> AnomalyLLM:
    import torch

    torch.manual_seed(seed)
    return AnomalyLLM.from_config(tiny_config(**overrides))


def tiny_model_config_json() -> dict[str, object]:
    """The tiny config as ``trainer fit --model-config`` takes it: without the channel count
    and window length, which the trainer chooses."""
    config = tiny_config().to_dict()
    for key in ("channels", "window_length"):
        config.pop(key)
    return config
