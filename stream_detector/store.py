"""A local model store: versioned checkpoint directories and an atomic ``CURRENT`` pointer.

Layout under ``root``::

    <model_name>/versions/<version>/   a checkpoint (model.safetensors, config.json,
                                       thresholds.json), never modified once published
    <model_name>/CURRENT               the version workers serve, one line of text

A version is published by writing it under a temporary name and renaming it into
``versions/``, and promoted by writing ``CURRENT`` to a temporary file and renaming it
over the old one, so a worker never sees a half-written version or pointer. Rolling back
is promoting an older version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from stream_detector.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from stream_detector.model import AnomalyLLM

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelStoreError(RuntimeError):
    """The store has no such model or version, or a name is not usable as a directory."""


def _checked_name(kind: str, name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ModelStoreError(
            f"{kind} {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def model_dir(root: Path | str, model_name: str) -> Path:
    """The directory of one model in the store."""
    return Path(root) / _checked_name("model name", model_name)


def version_dir(root: Path | str, model_name: str, version: str) -> Path:
    """The checkpoint directory of one version."""
    return model_dir(root, model_name) / VERSIONS_DIR / _checked_name("version", version)


def new_version(weights_sha256: str, now: datetime | None = None) -> str:
    """A sortable version name: UTC time of publication plus a short hash of the weights."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{weights_sha256[:8]}"


def publish_version(
    root: Path | str,
    model_name: str,
    source: Path | AnomalyLLM,
    *,
    thresholds: dict | None = None,
    metadata_extra: dict | None = None,
    version: str | None = None,
    promote: bool = True,
) -> str:
    """Add a version from a checkpoint directory or a model; return its name.

    ``thresholds`` and ``metadata_extra`` apply only when ``source`` is a model (a
    checkpoint directory brings its own). With ``promote`` the version becomes CURRENT.
    """
    versions = model_dir(root, model_name) / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=versions))
    try:
        if isinstance(source, AnomalyLLM):
            save_checkpoint(source, staging, metadata_extra, thresholds)
        else:
            read_metadata(Path(source))  # refuse a directory that is not a checkpoint
            shutil.copytree(source, staging, dirs_exist_ok=True)
        config_path = staging / CONFIG_FILE
        config = json.loads(config_path.read_text())
        version = _checked_name("version", version or new_version(config["weights_sha256"]))
        target = versions / version
        if target.exists():
            raise ModelStoreError(f"{model_name} already has a version {version!r} in {root}")
        # The version and model name travel in the checkpoint, so score records can cite them.
        config.update(version=version, model_name=model_name)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if promote:
        _point_current_at(root, model_name, version)
    return version


def list_versions(root: Path | str, model_name: str) -> list[str]:
    """Published versions of a model, oldest first."""
    versions = model_dir(root, model_name) / VERSIONS_DIR
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))


def current_version(root: Path | str, model_name: str) -> str | None:
    """The version CURRENT points at, or None when the model has none."""
    try:
        text = (model_dir(root, model_name) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def promote(root: Path | str, model_name: str, version: str) -> None:
    """Point CURRENT at a published ``version`` (atomically; rolling back is the same)."""
    _point_current_at(root, model_name, version)


def _point_current_at(root: Path | str, model_name: str, version: str) -> None:
    target = version_dir(root, model_name, version)
    if not (target / CONFIG_FILE).is_file():
        raise ModelStoreError(f"{model_name} has no published version {version!r} in {root}")
    pointer = model_dir(root, model_name) / CURRENT_FILE
    with tempfile.NamedTemporaryFile(
        "w", dir=pointer.parent, prefix=".CURRENT-", delete=False
    ) as tmp:
        tmp.write(version + "\n")
        tmp.flush()
        os.fsync(tmp.fileno())
    Path(tmp.name).replace(pointer)


def load_version(
    root: Path | str, model_name: str, version: str, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load one version; raises CheckpointError when it is incomplete or tampered with."""
    directory = version_dir(root, model_name, version)
    if not directory.is_dir():
        raise ModelStoreError(f"{model_name} has no published version {version!r} in {root}")
    checkpoint = load_checkpoint(directory, device)
    # The directory name is the version, whatever the copied config says.
    metadata = {**checkpoint.metadata, "version": version, "model_name": model_name}
    return Checkpoint(checkpoint.model, metadata, checkpoint.thresholds)


def load_current(
    root: Path | str, model_name: str, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load the version CURRENT points at."""
    version = current_version(root, model_name)
    if version is None:
        raise ModelStoreError(f"{model_name} has no CURRENT version in {root}")
    return load_version(root, model_name, version, device)
