"""Model checkpoints: a directory with `model.safetensors` and `config.json`.

The config carries everything needed to rebuild the model without the original
backbone weights (the truncated backbone's own config included), plus provenance:
training data, metrics, library versions and the sha256 of the weights, which is
verified on every load. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stream_detector.model import STEP_TERMS, AnomalyLLM, ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
THRESHOLDS_FILE = "thresholds.json"
FORMAT_VERSION = 1
_LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "stream-detector")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with or incompatible."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model with the metadata it was saved with."""

    model: AnomalyLLM
    metadata: dict[str, Any]
    thresholds: dict[str, Any] | None = field(default=None)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unversioned"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=2, sort_keys=True)
        tmp.flush()
        os.fsync(tmp.fileno())
    Path(tmp.name).replace(path)


def save_checkpoint(
    model: AnomalyLLM,
    directory: Path,
    metadata_extra: dict[str, Any] | None = None,
    thresholds: dict[str, Any] | None = None,
) -> Path:
    """Write weights, config (with the weights' sha256) and optional thresholds."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    partial = directory / (WEIGHTS_FILE + ".partial")
    tensors = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(tensors, partial, metadata={"format": "pt"})
    partial.replace(weights)
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "weights_sha256": sha256_file(weights),
        "libraries": library_versions(),
        **(metadata_extra or {}),
    }
    if thresholds is not None:
        _write_json_atomically(directory / THRESHOLDS_FILE, thresholds)
    # The config is written last: a directory without one is an unfinished save.
    _write_json_atomically(directory / CONFIG_FILE, config)
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    """Read and sanity-check `config.json` without loading any weights."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {config.get('format_version')!r}; "
            f"this build reads {FORMAT_VERSION}"
        )
    for key in ("model", "weights_sha256"):
        if key not in config:
            raise CheckpointError(f"{config_path} lacks {key!r}")
    return config


def load_checkpoint(directory: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from a checkpoint directory, refusing tampered weights."""
    config = read_metadata(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory} lacks {WEIGHTS_FILE}")
    actual = sha256_file(weights)
    if actual != config["weights_sha256"]:
        raise CheckpointError(
            f"{weights} has sha256 {actual}, but {CONFIG_FILE} records "
            f"{config['weights_sha256']}: the file was modified or truncated; refusing it"
        )
    # Checkpoints written before score terms existed score the paper's way; those before
    # the recent bank score without it.
    model_config = {"score_terms": ("discrepancy",), "recurrence": 0, **config["model"]}
    model = AnomalyLLM.from_config(ModelConfig.from_dict(model_config))
    try:
        state = load_file(weights)
        # The banks hold as many windows as were calibrated on.
        banks = ["memory", "recent_memory", "recent_place"]
        banks += [f"{prefix}_memory" for prefix in STEP_TERMS.values()]
        for bank in banks:
            if bank in state and hasattr(model, bank):
                setattr(model, bank, torch.empty_like(state[bank]))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"{weights} does not match its config: {error}") from error
    thresholds_path = directory / THRESHOLDS_FILE
    thresholds = json.loads(thresholds_path.read_text()) if thresholds_path.is_file() else None
    return Checkpoint(model.to(device).eval(), config, thresholds)
