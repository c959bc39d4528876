"""The model store: versioned checkpoints, an atomic ``CURRENT`` pointer, a promotion
history and a per-model lock, on a local path or an object-storage URL (fsspec).

Layout under ``root`` (a directory, ``file://``, ``memory://`` or ``s3://bucket/prefix``;
``s3://`` needs the ``s3`` extra, i.e. ``s3fs``)::

    <model>/versions/<version>/   model.safetensors, config.json, thresholds.json and the
                                  job's report.json; never modified once published
    <model>/CURRENT               the version workers serve, one line of text
    <model>/history.jsonl         promotions and rollbacks, one JSON object per line:
                                  {"ts", "action", "from", "to", "actor", "reason"}
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
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import torch

from stream_detector.checkpoint import (
    CONFIG_FILE,
    THRESHOLDS_FILE,
    Checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from stream_detector.config import mask_url
from stream_detector.model import AnomalyLLM

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = "LOCK"
REPORT_FILE = "report.json"
DEFAULT_LEASE_S = 600.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelStoreError(RuntimeError):
    """The store has no such model or version, or a name is not usable as a directory."""


class StoreLockedError(ModelStoreError):
    """Another job or operator holds the model's lock."""


class LockLostError(ModelStoreError):
    """This process's lock expired and was taken over; it must not write any more."""


def _checked_name(kind: str, name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ModelStoreError(
            f"{kind} {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _is_url(root: Path | str) -> bool:
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def _local_root(root: Path | str) -> Path:
    text = os.fspath(root)
    return Path(text.removeprefix("file://"))


class _LocalBackend:
    """Files under a local directory; relative paths use '/'."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _synced_temp_beside(self, target: Path, data: bytes) -> Path:
        """``data`` in a new, fsync'ed hidden file in ``target``'s directory."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "wb", dir=target.parent, prefix=f".{target.name}-", delete=False
        ) as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        return Path(tmp.name)

    def write_atomic(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self._synced_temp_beside(target, data).replace(target)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        target = self.path(rel)
        temp = self._synced_temp_beside(target, data)
        try:
            # link() fails if the target exists: an exclusive create of a complete file.
            os.link(temp, target)
        except FileExistsError:
            return False
        finally:
            temp.unlink()
        return True

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def append(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def list_dirs(self, rel: str) -> list[str]:
        directory = self.path(rel)
        if not directory.is_dir():
            return []
        return [p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")]

    @contextlib.contextmanager
    def staging(self, versions_rel: str) -> Iterator[Path]:
        versions = self.path(versions_rel)
        versions.mkdir(parents=True, exist_ok=True)
        # Staged inside versions/ so that the final rename stays on one filesystem.
        staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=versions))
        try:
            yield staging
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    def commit_dir(self, staging: Path, rel: str) -> None:
        target = self.path(rel)
        if target.exists():
            raise FileExistsError(rel)
        staging.rename(target)

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        yield self.path(rel)


class _FsspecBackend:
    """Objects under a URL, through an fsspec filesystem."""

    def __init__(self, url: str) -> None:
        self.fs, base = fsspec.core.url_to_fs(url)
        self.base = base.rstrip("/")

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def read(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(rel))
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        try:
            with self.fs.open(self.path(rel), "xb") as stream:
                stream.write(data)
        except FileExistsError:
            return False
        return True

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def append(self, rel: str, data: bytes) -> None:
        # Objects cannot be appended to; callers hold the model's lock.
        self.write_atomic(rel, (self.read(rel) or b"") + data)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def list_dirs(self, rel: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        return [
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in entries
            if entry["type"] == "directory"
        ]

    @contextlib.contextmanager
    def staging(self, versions_rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="publishing-") as directory:
            yield Path(directory)

    def commit_dir(self, staging: Path, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            raise FileExistsError(rel)
        files = sorted(p for p in staging.iterdir() if p.is_file() and p.name != CONFIG_FILE)
        # config.json last: a version without it is unfinished and never loaded.
        for file in [*files, staging / CONFIG_FILE]:
            self.fs.put_file(str(file), self.path(f"{rel}/{file.name}"))

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="model-") as directory:
            local = Path(directory)
            try:
                names = self.fs.ls(self.path(rel), detail=False)
            except FileNotFoundError:
                names = []
            for name in names:
                if self.fs.isfile(name):
                    self.fs.get_file(name, str(local / name.rstrip("/").rsplit("/", 1)[-1]))
            yield local


def _backend(root: Path | str) -> _LocalBackend | _FsspecBackend:
    if _is_url(root):
        try:
            return _FsspecBackend(str(root))
        except (ImportError, ValueError) as error:
            raise ModelStoreError(
                f"cannot open model store {mask_url(str(root))}: {error} "
                "(s3:// needs the 's3' extra: pip install 'stream-detector[s3]')"
            ) from error
    return _LocalBackend(_local_root(root))


def _shown(root: Path | str) -> str:
    return mask_url(os.fspath(root))


def _model_rel(model_name: str) -> str:
    return _checked_name("model name", model_name)


def _version_rel(model_name: str, version: str) -> str:
    return f"{_model_rel(model_name)}/{VERSIONS_DIR}/{_checked_name('version', version)}"


def model_dir(root: Path | str, model_name: str) -> Path:
    """The directory of one model in a local store (see ``version_url`` for any store)."""
    if _is_url(root):
        raise ModelStoreError(f"{_shown(root)} is not a local store; use version_url()")
    return _local_root(root) / _model_rel(model_name)


def version_dir(root: Path | str, model_name: str, version: str) -> Path:
    """The checkpoint directory of one version in a local store."""
    return model_dir(root, model_name) / VERSIONS_DIR / _checked_name("version", version)


def version_url(root: Path | str, model_name: str, version: str) -> str:
    """Where one version lives, as a path or URL, for messages and reports."""
    return f"{os.fspath(root).rstrip('/')}/{_version_rel(model_name, version)}"


def new_version(weights_sha256: str, now: datetime | None = None) -> str:
    """A sortable version name: UTC time of publication plus a short hash of the weights."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{weights_sha256[:8]}"


def _default_owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LockInfo:
    """What the ``LOCK`` object says about its holder."""

    owner: str
    token: str
    acquired_ms: int
    expires_ms: int
    purpose: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockInfo | None:
        try:
            fields = json.loads(data)
            return cls(**fields)
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        def stamp(ms: int) -> str:
            return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")

        purpose = f" ({self.purpose})" if self.purpose else ""
        return (
            f"{self.owner}{purpose} since {stamp(self.acquired_ms)}, "
            f"lease until {stamp(self.expires_ms)}"
        )


class StoreLock:
    """The exclusive right to write one model's versions, ``CURRENT`` and history.

    ``with StoreLock(root, "pumps", purpose="fit"):`` acquires (or raises
    ``StoreLockedError`` at once), renews the lease in the background and releases on
    exit. See the module docstring for what happens to a lock whose holder died.
    """

    def __init__(
        self,
        root: Path | str,
        model_name: str,
        *,
        owner: str | None = None,
        purpose: str = "",
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.root = root
        self.model_name = model_name
        self.owner = owner or _default_owner()
        self.purpose = purpose
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self._backend = _backend(root)
        self._rel = f"{_model_rel(model_name)}/{LOCK_FILE}"
        self._held = False
        self._lost = False
        self._acquired_ms = 0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _info(self, acquired_ms: int | None = None) -> LockInfo:
        now_ms = int(time.time() * 1000)
        return LockInfo(
            owner=self.owner,
            token=self.token,
            acquired_ms=acquired_ms if acquired_ms is not None else now_ms,
            expires_ms=now_ms + int(self.lease_s * 1000),
            purpose=self.purpose,
        )

    def holder(self) -> LockInfo | None:
        """The lock as stored now (anyone's), or None when the model is unlocked."""
        data = self._backend.read(self._rel)
        return None if data is None else LockInfo.from_bytes(data)

    def acquire(self) -> StoreLock:
        """Take the lock or raise ``StoreLockedError`` naming who holds it."""
        if self._held:
            return self
        info = self._info()
        if not self._backend.create_exclusive(self._rel, info.to_bytes()):
            self._take_over_if_stale()
            if not self._backend.create_exclusive(self._rel, info.to_bytes()):
                self._raise_locked()
        self._held = True
        self._acquired_ms = info.acquired_ms
        self.verify()
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_until_stopped, name=f"store-lock-{self.model_name}", daemon=True
        )
        self._renewer.start()
        logger.info("locked model %s in %s as %s", self.model_name, _shown(self.root), self.owner)
        return self

    def _take_over_if_stale(self) -> None:
        data = self._backend.read(self._rel)
        if data is None:
            return  # released meanwhile: the caller's second create decides
        stale = LockInfo.from_bytes(data)
        if stale is None:
            raise StoreLockedError(
                f"the lock of model {self.model_name} in {_shown(self.root)} is unreadable; "
                f"if no job is running, delete {LOCK_FILE} of that model and retry"
            )
        if stale.expires_ms > time.time() * 1000:
            return
        # Delete only the lock we judged stale: a fresh one created meanwhile stays.
        again = self._backend.read(self._rel)
        if again is not None and LockInfo.from_bytes(again) == stale:
            logger.warning(
                "taking over the expired lock of model %s held by %s",
                self.model_name,
                stale.describe(),
            )
            self._backend.delete(self._rel)

    def _raise_locked(self) -> None:
        holder = self.holder()
        who = holder.describe() if holder else "another process (it just changed hands)"
        raise StoreLockedError(
            f"model {self.model_name} in {_shown(self.root)} is locked by {who}: another job "
            "is writing to it. Wait for it to finish; if it died, its lock is taken over "
            "automatically once the lease has expired"
        )

    def verify(self) -> None:
        """Raise ``LockLostError`` unless the stored lock is still this one."""
        holder = self.holder()
        if self._lost or holder is None or holder.token != self.token:
            self._lost = True
            now = holder.describe() if holder else "nobody"
            raise LockLostError(
                f"this job's lock of model {self.model_name} in {_shown(self.root)} expired "
                f"and is now held by {now}; nothing more is written. Raise the lease "
                "(--lock-lease-s) if jobs legitimately run this long"
            )

    def renew(self) -> None:
        """Extend the lease (the background thread does this every lease/3)."""
        self.verify()
        self._backend.write_atomic(self._rel, self._info(self._acquired_ms).to_bytes())

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except LockLostError as error:
                logger.error("%s", error)
                return
            except OSError as error:
                logger.warning("could not renew the lock of %s: %s", self.model_name, error)

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        holder = self.holder()
        if holder is not None and holder.token == self.token:
            self._backend.delete(self._rel)
            logger.info("unlocked model %s in %s", self.model_name, _shown(self.root))

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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
    backend = _backend(root)
    versions_rel = f"{_model_rel(model_name)}/{VERSIONS_DIR}"
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
        version = _checked_name("version", version or new_version(config["weights_sha256"]))
        # The version and model name travel in the checkpoint, so score records can cite them.
        config.update(version=version, model_name=model_name)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        try:
            backend.commit_dir(staging, _version_rel(model_name, version))
        except FileExistsError:
            raise ModelStoreError(
                f"{model_name} already has a version {version!r} in {_shown(root)}"
            ) from None
    if promote:
        _promote(root, model_name, version, reason=reason, actor=actor, lock=lock)
    return version


def list_versions(root: Path | str, model_name: str) -> list[str]:
    """Published versions of a model, oldest first."""
    backend = _backend(root)
    return sorted(backend.list_dirs(f"{_model_rel(model_name)}/{VERSIONS_DIR}"))


def list_models(root: Path | str) -> list[str]:
    """Names of the models that have at least one version."""
    backend = _backend(root)
    return sorted(name for name in backend.list_dirs("") if list_versions(root, name))


def current_version(root: Path | str, model_name: str) -> str | None:
    """The version CURRENT points at, or None when the model has none."""
    data = _backend(root).read(f"{_model_rel(model_name)}/{CURRENT_FILE}")
    text = data.decode().strip() if data else ""
    return text or None


def version_metadata(root: Path | str, model_name: str, version: str) -> dict[str, Any]:
    """A version's ``config.json`` (no weights read); ModelStoreError if it is unfinished."""
    data = _backend(root).read(f"{_version_rel(model_name, version)}/{CONFIG_FILE}")
    if data is None:
        raise ModelStoreError(
            f"{model_name} has no complete version {version!r} in {_shown(root)} "
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
    return _backend(root).read(f"{_version_rel(model_name, version)}/{name}")


def history(root: Path | str, model_name: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of a model, oldest first."""
    data = _backend(root).read(f"{_model_rel(model_name)}/{HISTORY_FILE}")
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


def previous_current(entries: list[dict[str, Any]]) -> str | None:
    """The version a rollback returns to: the history replayed as a stack of CURRENTs."""
    stack: list[str] = []
    for entry in entries:
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
        elif entry.get("from"):
            stack.append(entry["from"])
    return stack[-1] if stack else None


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
                f"{model_name} in {_shown(root)} has no earlier CURRENT in its history to "
                "roll back to; promote a version by name instead"
            )
        _promote(root, model_name, target, reason=reason, actor=actor, lock=held, action="rollback")
    return target


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
    backend = _backend(root)
    with _locked(root, model_name, lock, action) as held:
        if not backend.exists(f"{_version_rel(model_name, version)}/{CONFIG_FILE}"):
            raise ModelStoreError(
                f"{model_name} has no published version {version!r} in {_shown(root)}"
            )
        previous = current_version(root, model_name)
        if previous == version:
            return
        held.verify()  # right before the write: a lock taken over meanwhile stops us
        backend.write_atomic(f"{_model_rel(model_name)}/{CURRENT_FILE}", (version + "\n").encode())
        entry = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "action": action,
            "from": previous,
            "to": version,
            "actor": actor or held.owner,
            "reason": reason,
        }
        line = json.dumps(entry, sort_keys=True) + "\n"
        backend.append(f"{_model_rel(model_name)}/{HISTORY_FILE}", line.encode())
        logger.info("%s %s: CURRENT %s -> %s (%s)", action, model_name, previous, version, reason)


def load_version(
    root: Path | str, model_name: str, version: str, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load one version; raises CheckpointError when it is incomplete or tampered with."""
    backend = _backend(root)
    rel = _version_rel(model_name, version)
    if not backend.exists(rel):
        raise ModelStoreError(
            f"{model_name} has no published version {version!r} in {_shown(root)}"
        )
    with backend.local_copy(rel) as directory:
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
        raise ModelStoreError(f"{model_name} has no CURRENT version in {_shown(root)}")
    return load_version(root, model_name, version, device)
