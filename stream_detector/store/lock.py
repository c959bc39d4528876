"""The per-model lock of the model store: one writer of versions, ``CURRENT`` and history.

``StoreLock`` is the ``LOCK`` object created exclusively, with a lease renewed in the
background; see ``stream_detector.store`` for how a dead holder's lock is taken over.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stream_detector.store.backends import ModelStoreError, model_rel, open_backend, shown

logger = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
DEFAULT_LEASE_S = 600.0


class StoreLockedError(ModelStoreError):
    """Another job or operator holds the model's lock."""


class LockLostError(ModelStoreError):
    """This process's lock expired and was taken over; it must not write any more."""


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
        self._backend = open_backend(root)
        self._rel = f"{model_rel(model_name)}/{LOCK_FILE}"
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
        logger.info("locked model %s in %s as %s", self.model_name, shown(self.root), self.owner)
        return self

    def _take_over_if_stale(self) -> None:
        data = self._backend.read(self._rel)
        if data is None:
            return  # released meanwhile: the caller's second create decides
        stale = LockInfo.from_bytes(data)
        if stale is None:
            raise StoreLockedError(
                f"the lock of model {self.model_name} in {shown(self.root)} is unreadable; "
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
            f"model {self.model_name} in {shown(self.root)} is locked by {who}: another job "
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
                f"this job's lock of model {self.model_name} in {shown(self.root)} expired "
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
            logger.info("unlocked model %s in %s", self.model_name, shown(self.root))

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
