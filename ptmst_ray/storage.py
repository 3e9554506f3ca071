"""One module for every path: local paths and any fsspec URL, atomic writes, manifests, hashes.

Why this file exists: Ray workers do not run in the driver's working directory and may be
on other machines, so every artefact is addressed by an absolute path or URL and written
atomically (temporary name, then move). A stage's output counts as complete only when its
manifest, written last, exists and matches the expected config hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import uuid
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class StorageError(RuntimeError):
    """An artefact is missing, corrupt or cannot be written; the message says what to do.

    Messages start with the URL of the file at fault (``"<url>: what is wrong; what to do"``);
    :attr:`url` holds it so callers can name the stage that rebuilds it.
    """

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message)
        self.url = url if url is not None else message.split(": ", 1)[0]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or fsspec URL."""
    return url_to_fs(os.path.expanduser(url) if "://" not in url else url)


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{str(p).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def listdir(url: str) -> list[str]:
    """Base names directly under ``url`` (empty if it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{url}: file not found") from None


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    text = read_text(url)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"{url}: not valid JSON ({e})") from None


TMP_MARK = ".tmp-"
"""Temporary names are ``<target>.tmp-<random>``; readers never look at them."""


def write_error(url: str, e: OSError) -> StorageError:
    """The StorageError for a failed write of ``url`` (disk full, read-only, permissions...)."""
    reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return StorageError(f"{url}: cannot write ({reason}); nothing was marked complete: free space or make the "
                        "run root writable, then run the same command again", url)


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary sibling, then move into place; on error the target is untouched.

    An ``OSError`` while writing (a full disk, a read-only root) becomes a :class:`StorageError`
    naming ``url``; the temporary file is removed.
    """
    fs, path = filesystem(url)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError, OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        if isinstance(e, OSError):
            raise write_error(url, e) from e
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def stable_hash(obj: Any) -> str:
    """sha256 (16 hex) of a JSON-able object with sorted keys: identical content, identical hash."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(url: str) -> str:
    fs, path = filesystem(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- manifests


def write_manifest(directory: str, payload: dict) -> None:
    """Mark ``directory`` complete: write its manifest LAST, atomically."""
    write_json(join(directory, MANIFEST), payload)


def read_manifest(directory: str) -> dict | None:
    """The manifest of a completed directory, or None if the stage never finished there."""
    url = join(directory, MANIFEST)
    if not exists(url):
        return None
    return read_json(url)


def is_complete(directory: str, config_hash: str | None = None) -> bool:
    """True when ``directory`` has a manifest (with this ``config_hash``, if given)."""
    m = read_manifest(directory)
    if m is None:
        return False
    return config_hash is None or m.get("config_hash") == config_hash


def verify_files(directory: str, files: dict[str, str]) -> None:
    """Check {relative name: sha256} against the files on disk; raise naming the first bad one."""
    for name, digest in files.items():
        url = join(directory, name)
        if not exists(url):
            raise StorageError(f"{url}: listed in {join(directory, MANIFEST)} but missing; rebuild this stage", url)
        if hash_file(url) != digest:
            raise StorageError(
                f"{url}: content hash does not match {join(directory, MANIFEST)} (corrupt or changed); rebuild this stage",
                url,
            )


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url``, or None if it is not on the local disk."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        return None
    return os.path.abspath(os.path.expanduser(url))
