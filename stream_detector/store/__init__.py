"""The model store: versioned checkpoints, an atomic ``CURRENT`` pointer, a promotion
history and a per-model lock, on a local path or an object-storage URL (fsspec).

Layout under ``root`` (a directory, ``file://``, ``memory://`` or ``s3://bucket/prefix``;
``s3://`` needs the ``s3`` extra, i.e. ``s3fs``)::

    <model>/versions/<version>/   model.safetensors, config.json, thresholds.json and the
                                  job's report.json; never modified once published
    <model>/CURRENT               the version workers serve, one line of text
    <model>/history.jsonl         promotions, rollbacks and prunes, one JSON object per
                                  line: {"ts", "action", "from", "to", "actor", "reason"};
                                  a prune's lists the deleted "versions" instead of
                                  "from" and "to"
    <model>/LOCK                  present while a job or an operator writes to the model

What is guaranteed:

- Local paths. A version is written into a hidden staging directory and renamed into
  ``versions/`` (atomic), so it appears complete or not at all. ``CURRENT`` is written to
  a temporary file, fsynced and renamed over the old pointer: a reader sees the old or
  the new version, never a partial line. History lines are appended with ``O_APPEND``
  and fsynced.
- Object storage. There is no rename: a version's files are uploaded with
  ``config.json`` last, and a version directory without ``config.json`` is unfinished
  (refused by ``promote`` and by every loader). ``CURRENT`` is one small object replaced
  by a single PUT, which S3, GCS and Azure make visible atomically (old or new, never a
  mix). Writers of ``CURRENT`` and of the history (rewritten whole: objects cannot be
  appended to) are serialised by the lock, and re-check that they still hold it right
  before writing; there is no compare-and-swap on ``CURRENT`` beyond that.
- The lock (``StoreLock``) is the ``LOCK`` object created exclusively: ``os.link`` of a
  fully written file locally, ``open(mode="xb")`` through fsspec (``If-None-Match: *`` on
  S3 with s3fs >= 2024.12; on a store without conditional writes it is best effort). It
  holds the owner, a random token and a lease expiry, renewed by a background thread
  every third of the lease while the holder runs. A second writer fails at once with
  ``StoreLockedError`` naming the holder. A lock whose lease expired (its holder died) is
  taken over: the taker deletes it only if it still holds the expired token, then
  creates its own exclusively, so of two takers one wins. A holder that overran its
  lease and was taken over notices (``LockLostError``) before its next write.

Rolling back is pointing ``CURRENT`` at the version it named before the last promotion,
as recorded in the history.

Pruning (``prune_versions``, run by every trainer job after it stores a version) deletes
the versions nobody will serve or roll back to: it keeps CURRENT, the newest versions
and the versions that as many rollbacks in a row would return to. Each prune that
deleted something is a line of the history.

This module holds the versions (publish, list, promote, roll back, prune, load); the storage
backends are in ``store.backends`` and the lock in ``store.lock``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from stream_detector.checkpoint import (
    CONFIG_FILE,
    THRESHOLDS_FILE,
    Checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from stream_detector.model import AnomalyLLM
from stream_detector.store.backends import (
    FsspecBackend,
    LocalBackend,
    ModelStoreError,
    checked_name,
    is_url,
    local_root,
    model_rel,
    open_backend,
    shown,
)
from stream_detector.store.lock import (
    DEFAULT_LEASE_S,
    LOCK_FILE,
    LockLostError,
    StoreLock,
    StoreLockedError,
)

__all__ = [
    "DEFAULT_LEASE_S",
    "LOCK_FILE",
    "LockLostError",
    "ModelStoreError",
    "StoreLock",
    "StoreLockedError",
]

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
HISTORY_FILE = "history.jsonl"
REPORT_FILE = "report.json"


def _version_rel(model_name: str, version: str) -> str:
    return f"{model_rel(model_name)}/{VERSIONS_DIR}/{checked_name('version', version)}"


def model_dir(root: Path | str, model_name: str) -> Path:
    """The directory of one model in a local store (see ``version_url`` for any store)."""
    if is_url(root):
        raise ModelStoreError(f"{shown(root)} is not a local store; use version_url()")
    return local_root(root) / model_rel(model_name)


def version_dir(root: Path | str, model_name: str, version: str) -> Path:
    """The checkpoint directory of one version in a local store."""
    return model_dir(root, model_name) / VERSIONS_DIR / checked_name("version", version)


def version_url(root: Path | str, model_name: str, version: str) -> str:
    """Where one version lives, as a path or URL, for messages and reports."""
    return f"{os.fspath(root).rstrip('/')}/{_version_rel(model_name, version)}"


def new_version(weights_sha256: str, now: datetime | None = None) -> str:
    """A sortable version name: UTC time of publication plus a short hash of the weights."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{weights_sha256[:8]}"


@contextlib.contextmanager
def _locked(
    root: Path | str, model_name: str, lock: StoreLock | None, purpose: str
) -> Iterator[StoreLock]:
    """The caller's lock (checked to be held), or a short one taken for this call."""
    if lock is not None:
        if lock.model_name != model_name:
            raise ModelStoreError(
                f"the lock given is for model {lock.model_name}, not {model_name}"
            )
        lock.verify()
        yield lock
        return
    with StoreLock(root, model_name, purpose=purpose) as own:
        yield own


def publish_version(
    root: Path | str,
    model_name: str,
    source: Path | AnomalyLLM,
    *,
    thresholds: dict | None = None,
    metadata_extra: dict | None = None,
    version: str | None = None,
    promote: bool = True,
    extra_files: Mapping[str, bytes] | None = None,
    reason: str = "published",
    actor: str | None = None,
    lock: StoreLock | None = None,
) -> str:
    """Add a version from a checkpoint directory or a model; return its name.

    ``thresholds`` and ``metadata_extra`` apply only when ``source`` is a model (a
    checkpoint directory brings its own); ``extra_files`` (name -> content, e.g. the
    job's ``report.json``) are stored beside the checkpoint. With ``promote`` the version
    becomes CURRENT (taking the model's lock unless ``lock`` is given).
    """
    backend = open_backend(root)
    versions_rel = f"{model_rel(model_name)}/{VERSIONS_DIR}"
    with backend.staging(versions_rel) as staging:
        if isinstance(source, AnomalyLLM):
            save_checkpoint(source, staging, metadata_extra, thresholds)
        else:
            read_metadata(Path(source))  # refuse a directory that is not a checkpoint
            shutil.copytree(source, staging, dirs_exist_ok=True)
        for name, content in (extra_files or {}).items():
            if name in (CONFIG_FILE, THRESHOLDS_FILE) or "/" in name:
                raise ModelStoreError(f"extra file name {name!r} is reserved or not a file name")
            (staging / name).write_bytes(content)
        config_path = staging / CONFIG_FILE
        config = json.loads(config_path.read_text())
        version = checked_name("version", version or new_version(config["weights_sha256"]))
        # The version and model name travel in the checkpoint, so score records can cite them.
        config.update(version=version, model_name=model_name)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        try:
            backend.commit_dir(staging, _version_rel(model_name, version))
        except FileExistsError:
            raise ModelStoreError(
                f"{model_name} already has a version {version!r} in {shown(root)}"
            ) from None
    if promote:
        _promote(root, model_name, version, reason=reason, actor=actor, lock=lock)
    return version


def list_versions(root: Path | str, model_name: str) -> list[str]:
    """Published versions of a model, oldest first."""
    backend = open_backend(root)
    return sorted(backend.list_dirs(f"{model_rel(model_name)}/{VERSIONS_DIR}"))


def current_version(root: Path | str, model_name: str) -> str | None:
    """The version CURRENT points at, or None when the model has none."""
    data = open_backend(root).read(f"{model_rel(model_name)}/{CURRENT_FILE}")
    text = data.decode().strip() if data else ""
    return text or None


def version_metadata(root: Path | str, model_name: str, version: str) -> dict[str, Any]:
    """A version's ``config.json`` (no weights read); ModelStoreError if it is unfinished."""
    data = open_backend(root).read(f"{_version_rel(model_name, version)}/{CONFIG_FILE}")
    if data is None:
        raise ModelStoreError(
            f"{model_name} has no complete version {version!r} in {shown(root)} "
            f"(no {CONFIG_FILE}: unknown, or its upload did not finish)"
        )
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise ModelStoreError(
            f"{version_url(root, model_name, version)}/{CONFIG_FILE} is not JSON: {error}"
        ) from error


def read_version_file(root: Path | str, model_name: str, version: str, name: str) -> bytes | None:
    """One file of a version (e.g. ``report.json``), or None when it has none."""
    return open_backend(root).read(f"{_version_rel(model_name, version)}/{name}")


def history(root: Path | str, model_name: str) -> list[dict[str, Any]]:
    """Every promotion, rollback and prune of a model, oldest first."""
    data = open_backend(root).read(f"{model_rel(model_name)}/{HISTORY_FILE}")
    entries = []
    for number, line in enumerate((data or b"").decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning(
                "%s line %d of %s is not JSON; skipped", HISTORY_FILE, number, model_name
            )
    return entries


def rollback_targets(entries: list[dict[str, Any]]) -> list[str]:
    """The versions rollbacks in a row return to, the next one first: the history
    replayed as a stack of CURRENTs."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
        elif entry.get("from"):
            stack.append(entry["from"])
    return stack[::-1]


def previous_current(entries: list[dict[str, Any]]) -> str | None:
    """The version a rollback returns to."""
    targets = rollback_targets(entries)
    return targets[0] if targets else None


def promote(
    root: Path | str,
    model_name: str,
    version: str,
    *,
    reason: str = "promoted",
    actor: str | None = None,
    lock: StoreLock | None = None,
) -> None:
    """Point CURRENT at a published ``version`` atomically and record it in the history.

    Takes the model's lock for the duration unless ``lock`` (already held) is given;
    promoting the version that is already CURRENT changes nothing.
    """
    _promote(root, model_name, version, reason=reason, actor=actor, lock=lock)


def rollback(
    root: Path | str,
    model_name: str,
    *,
    reason: str = "rolled back",
    actor: str | None = None,
    lock: StoreLock | None = None,
) -> str:
    """Point CURRENT back at the version it named before the last promotion; return it."""
    with _locked(root, model_name, lock, "rollback") as held:
        target = previous_current(history(root, model_name))
        if target is None:
            raise ModelStoreError(
                f"{model_name} in {shown(root)} has no earlier CURRENT in its history to "
                "roll back to; promote a version by name instead"
            )
        _promote(root, model_name, target, reason=reason, actor=actor, lock=held, action="rollback")
    return target


def prune_versions(
    root: Path | str,
    model_name: str,
    keep: int,
    *,
    lock: StoreLock | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete the versions that are neither served nor a rollback's target; return them,
    oldest first.

    Kept: CURRENT, the ``keep`` newest versions (promoted or refused, finished or still
    uploading; names sort by publication time) and the ``keep`` versions that as many
    rollbacks in a row would return to. A worker only ever loads CURRENT, and the version
    it served before is the first rollback's target, so a worker that read CURRENT just
    before a promotion still finds it. Takes the model's lock unless ``lock`` is given;
    ``dry_run`` only says what would go.
    """
    if keep < 1:
        raise ModelStoreError(f"keep must be at least 1 version, not {keep}")
    backend = open_backend(root)
    with _locked(root, model_name, lock, "prune") as held:
        versions = list_versions(root, model_name)
        kept = {*versions[-keep:], *rollback_targets(history(root, model_name))[:keep]}
        current = current_version(root, model_name)
        doomed = [version for version in versions if version not in kept and version != current]
        if dry_run:
            return doomed
        deleted: list[str] = []
        try:
            for version in doomed:
                held.verify()
                backend.delete_dir(_version_rel(model_name, version))
                deleted.append(version)
                logger.info("pruned %s version %s", model_name, version)
        finally:
            if deleted:  # what went, even when a deletion failed part of the way
                held.verify()
                reason = f"kept CURRENT and, {keep} each, the newest versions and rollback targets"
                entry = {
                    "action": "prune",
                    "versions": deleted,
                    "actor": held.owner,
                    "reason": reason,
                }
                _record(backend, model_name, entry)
    return doomed


def _record(backend: LocalBackend | FsspecBackend, model_name: str, entry: dict[str, Any]) -> None:
    """Append ``entry``, stamped with the time, to the model's history."""
    stamped = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
    line = json.dumps(stamped, sort_keys=True) + "\n"
    backend.append(f"{model_rel(model_name)}/{HISTORY_FILE}", line.encode())


def _promote(
    root: Path | str,
    model_name: str,
    version: str,
    *,
    reason: str,
    actor: str | None,
    lock: StoreLock | None,
    action: str = "promote",
) -> None:
    backend = open_backend(root)
    with _locked(root, model_name, lock, action) as held:
        if not backend.exists(f"{_version_rel(model_name, version)}/{CONFIG_FILE}"):
            raise ModelStoreError(
                f"{model_name} has no published version {version!r} in {shown(root)}"
            )
        previous = current_version(root, model_name)
        if previous == version:
            return
        held.verify()  # right before the write: a lock taken over meanwhile stops us
        backend.write_atomic(f"{model_rel(model_name)}/{CURRENT_FILE}", (version + "\n").encode())
        entry = {
            "action": action,
            "from": previous,
            "to": version,
            "actor": actor or held.owner,
            "reason": reason,
        }
        _record(backend, model_name, entry)
        logger.info("%s %s: CURRENT %s -> %s (%s)", action, model_name, previous, version, reason)


def load_version(
    root: Path | str, model_name: str, version: str, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load one version; raises CheckpointError when it is incomplete or tampered with."""
    backend = open_backend(root)
    rel = _version_rel(model_name, version)
    if not backend.exists(rel):
        raise ModelStoreError(f"{model_name} has no published version {version!r} in {shown(root)}")
    with backend.local_copy(rel) as directory:
        checkpoint = load_checkpoint(directory, device)
    # The directory name is the version, whatever the copied config says.
    metadata = {**checkpoint.metadata, "version": version, "model_name": model_name}
    return Checkpoint(checkpoint.model, metadata, checkpoint.thresholds)
