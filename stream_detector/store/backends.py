"""Where the model store's bytes live: a local directory or an object-storage URL (fsspec).

Both backends offer the same small set of operations on paths relative to the store's
root ('/'-separated): read, atomic write, exclusive create, delete, append, list,
publishing a staged directory and deleting a published one. What each guarantees is
described in ``stream_detector.store``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec

from stream_detector.checkpoint import CONFIG_FILE
from stream_detector.config import mask_url

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelStoreError(RuntimeError):
    """The store has no such model or version, or a name is not usable as a directory."""


def checked_name(kind: str, name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise ModelStoreError(
            f"{kind} {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_url(root: Path | str) -> bool:
    return isinstance(root, str) and "://" in root and not root.startswith("file://")


def local_root(root: Path | str) -> Path:
    text = os.fspath(root)
    return Path(text.removeprefix("file://"))


class LocalBackend:
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

    def delete_dir(self, rel: str) -> None:
        # config.json first: a directory half deleted reads as unfinished, never loaded.
        self.delete(f"{rel}/{CONFIG_FILE}")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path(rel))

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


class FsspecBackend:
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

    def delete_dir(self, rel: str) -> None:
        # config.json first: a directory half deleted reads as unfinished, never loaded.
        self.delete(f"{rel}/{CONFIG_FILE}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

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


def open_backend(root: Path | str) -> LocalBackend | FsspecBackend:
    if is_url(root):
        try:
            return FsspecBackend(str(root))
        except (ImportError, ValueError) as error:
            raise ModelStoreError(
                f"cannot open model store {mask_url(str(root))}: {error} "
                "(s3:// needs the 's3' extra: pip install 'stream-detector[s3]')"
            ) from error
    return LocalBackend(local_root(root))


def shown(root: Path | str) -> str:
    return mask_url(os.fspath(root))


def model_rel(model_name: str) -> str:
    return checked_name("model name", model_name)
