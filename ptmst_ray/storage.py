"""One module for every path: local paths and any fsspec URL, atomic writes, manifests, hashes.

Why this file exists: Ray workers do not run in the driver's working directory and may be
on other machines, so every artefact is addressed by an absolute path or URL and written
atomically (temporary name, then move; on an object store, one upload). A stage's output counts as complete only when its
manifest, written last, exists and matches the expected config hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator

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
    """(filesystem, path within it) for a local path or fsspec URL.

    On an object store, listings are never cached: other processes (Train workers writing through
    pyarrow, other nodes) add and delete keys, and a cached listing would hide them from the resume
    scan and the checkpoint clean-up.
    """
    if "://" not in url:
        return url_to_fs(os.path.expanduser(url))
    if scheme(url) in OBJECT_STORE_SCHEMES:
        return url_to_fs(url, use_listings_cache=False)
    return url_to_fs(url)


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


REREADS = 5
"""Times a file replaced while it is read is read again (:func:`read_whole`) before giving up."""


def read_whole(fs: fsspec.AbstractFileSystem, path: str, url: str, read: Callable[[Any], Any] | None = None) -> Any:
    """The bytes of one whole version of the file at ``path`` (or what ``read`` takes of it from the open file,
    e.g. a header); FileNotFoundError if there is none.

    Index files are replaced while others read them (an expert's index after each epoch, a lease at each
    heartbeat, a run's attempts). A replacement is atomic (a rename, or one upload), but a read on an object
    store is a HEAD and then GETs tied to the ETag the HEAD saw: a replacement landing between them fails the
    read (s3fs's ``FileExpired``, errno EBUSY) rather than mix two versions. That read starts again, and a
    fresh one returns the new version whole.
    """
    for attempt in range(REREADS):
        try:
            with fs.open(path, "rb") as f:
                return f.read() if read is None else read(f)
        except OSError as e:
            if e.errno != errno.EBUSY:  # missing (ENOENT) or any other failure: the caller's to handle
                raise
            time.sleep(0.05 * 2 ** attempt)
    raise StorageError(f"{url}: replaced {REREADS} times while being read; another process rewrites it "
                       "continually: stop it, or run the same command again", url)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return read_whole(fs, path, url)
    except FileNotFoundError:
        raise StorageError(f"{url}: file not found") from None


def read_parquet(url: str, columns: list[str] | None = None, row_group: int | None = None):
    """The Parquet file at ``url`` (or its row group ``row_group``) as a pyarrow Table; with ``columns`` only
    their bytes are fetched. Read on the calling thread (``parquet_table``)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return parquet_table(f, columns, row_group, name=url)


def parquet_table(source, columns: list[str] | None = None, row_group: int | None = None, name: str = ""):
    """``columns`` of the Parquet data in ``source`` (a file object, or a ``pyarrow.BufferReader`` of bytes already
    read), the whole file or its row group ``row_group``, read and decoded on the calling thread.

    It starts none of Arrow's threads (``ParquetFile`` without pre-buffering, ``use_threads=False``): a process
    whose Arrow pools have run can abort as it exits ("terminate called without an active exception", SIGABRT,
    after its work is done), with ``read_table``'s threads and, more rarely, with ``read_table(use_threads=False)``,
    which still pre-buffers on Arrow's I/O threads (bench/RESULTS.md, "Parquet reads on the calling thread").
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source, pre_buffer=False)
    names = parquet.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:  # ParquetFile would leave them out silently; read_table raised ArrowInvalid, as this does
        raise pa.ArrowInvalid(f"{name or 'Parquet data'}: no column {missing} (it has {names})")
    if row_group is None:
        return parquet.read(columns=columns, use_threads=False)
    return parquet.read_row_group(row_group, columns=columns, use_threads=False)


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


def _reason(e: OSError) -> str:
    """Why a write failed, in a user's words ("no space left on device", "Permission denied", ...)."""
    return "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def write_error(url: str, e: OSError) -> StorageError:
    """The StorageError for a failed write of ``url`` (disk full, read-only, permissions...)."""
    return StorageError(f"{url}: cannot write ({_reason(e)}); nothing was marked complete: free space or make the "
                        "run root writable, then run the same command again", url)


_WRITES = [0]


def writes() -> int:
    """How many files this process has written (atomically) so far: a stage that wrote none did no work."""
    return _WRITES[0]


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary sibling, then move into place; on error the target is untouched.

    An ``OSError`` while writing (a full disk, a read-only root) becomes a :class:`StorageError`
    naming ``url``; the temporary file is removed. On an object store the object is written in place
    (:func:`_object_write`): an upload there is already all-or-nothing.
    """
    fs, path = filesystem(url)
    if scheme(url) in OBJECT_STORE_SCHEMES:
        with _object_write(fs, path, url, mode) as f:
            yield f
        return
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
        _WRITES[0] += 1
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError, OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        if isinstance(e, OSError):
            raise write_error(url, e) from e
        raise


@contextlib.contextmanager
def _object_write(fs: fsspec.AbstractFileSystem, path: str, url: str, mode: str) -> Iterator[Any]:
    """Write one object in place. A PUT, or a multipart upload once completed, appears whole or not at all,
    so a temporary key and a move (a server-side copy of every byte, then a delete) would only cost
    requests. On an error the buffer is dropped and a started multipart upload aborted: no object, and
    no partial one, appears."""
    f = None
    try:
        f = fs.open(path, mode)
        yield f
        f.close()
        _WRITES[0] += 1
    except BaseException as e:
        if f is not None and not f.closed:
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True  # closing would upload what was written so far
        if isinstance(e, OSError):
            raise write_error(url, e) from e
        raise


def put_file(local: str, url: str) -> None:
    """Put the finished local file ``local`` at ``url``, atomically, and remove it: a rename when both are on the
    same local filesystem, else a copy through :func:`atomic_open` (an upload on an object store)."""
    dest = local_path(url)
    if dest is not None:
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(local, dest)
            _WRITES[0] += 1
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise write_error(url, e) from e
    with atomic_open(url, "wb") as out, open(local, "rb") as src:
        for chunk in iter(lambda: src.read(8 << 20), b""):
            out.write(chunk)
    os.remove(local)


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as f:
        f.write(data)


WRITE_CONCURRENCY = 16
"""Objects :func:`write_all` uploads at once to an object store, where each small write is a request's round trip."""


def write_all(files: dict[str, bytes]) -> None:
    """Write every ``url: data`` of ``files`` (each atomically, as :func:`write_bytes`): one after another on a
    local disk, :data:`WRITE_CONCURRENCY` at a time on an object store (thousands of small images one request at a
    time took minutes). The first error is raised once the writes under way have ended; the rest are not started."""
    if len(files) < 2 or not any(scheme(u) in OBJECT_STORE_SCHEMES for u in files):
        for url, data in files.items():
            write_bytes(url, data)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(WRITE_CONCURRENCY, len(files)), thread_name_prefix="ptmst-write") as pool:
        futures = [pool.submit(write_bytes, url, data) for url, data in files.items()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # those not started; the others end (each write is whole or absent)
            raise


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


def _listed_but_missing(directory: str, url: str) -> StorageError:
    return StorageError(f"{url}: listed in {join(directory, MANIFEST)} but missing; rebuild this stage", url)


def _hash_mismatch(directory: str, url: str) -> StorageError:
    return StorageError(f"{url}: content hash does not match {join(directory, MANIFEST)} (corrupt or changed); "
                        "rebuild this stage", url)


def verify_files(directory: str, files: dict[str, str]) -> None:
    """Check {relative name: sha256} against the files on disk; raise naming the first bad one."""
    for name, digest in files.items():
        url = join(directory, name)
        if not exists(url):
            raise _listed_but_missing(directory, url)
        if hash_file(url) != digest:
            raise _hash_mismatch(directory, url)


def read_verified(directory: str, name: str, digest: str) -> bytes:
    """The bytes of ``directory/name``, checked against the manifest's sha256 ``digest`` as they are read
    (one fetch per file: the check and the read are the same pass; errors as :func:`verify_files`)."""
    url = join(directory, name)
    if not exists(url):
        raise _listed_but_missing(directory, url)
    blob = read_bytes(url)
    if hash_bytes(blob) != digest:
        raise _hash_mismatch(directory, url)
    return blob


# --------------------------------------------------------------------------- local scratch of one process

SCRATCH_PREFIX = "ptmst-scratch"


def process_alive(pid: Any) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not reaped yet, has ended)."""
    if not isinstance(pid, int) or pid <= 0:  # names no process (os.kill(-1, 0) would ask about every one)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def scratch_dir(what: str) -> str:
    """A new local directory for files on their way to storage (a checkpoint before Train uploads it), in the
    system's temp dir and named after this host and process: ``ptmst-scratch.<what>.<host>.<pid>.<random>``.

    Its caller removes it once the files are stored; a process killed before that (Train's retry of a worker
    that Ray's OOM killer ended, a Ctrl-C during an upload) cannot, so every call first removes the scratch
    directories of this host's ended processes: what one kill leaves (a phase checkpoint is the whole
    synthetic set, 300 MB at 500 pairs of 224 px) does not pile up on a node that keeps running."""
    if "." in what:
        raise ValueError(f"scratch_dir: {what!r} must not contain '.'")
    remove_orphaned_scratch()
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}.{what}.{socket.gethostname()}.{os.getpid()}.")


def remove_orphaned_scratch() -> list[str]:
    """Remove the :func:`scratch_dir` directories of this host whose process has ended; returns their paths."""
    tmp, host, removed = tempfile.gettempdir(), socket.gethostname(), []
    with contextlib.suppress(OSError):
        for name in os.listdir(tmp):
            if not name.startswith(SCRATCH_PREFIX + "."):
                continue
            parts = name[len(SCRATCH_PREFIX) + 1:].rsplit(".", 2)  # <what>.<host>, <pid>, <random>
            if len(parts) != 3 or "." not in parts[0] or not parts[1].isdigit():
                continue
            if parts[0].split(".", 1)[1] == host and not process_alive(int(parts[1])):
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
                removed.append(os.path.join(tmp, name))
    return removed


# --------------------------------------------------------------------------- this node's verified local files


def cache_root() -> str:
    """This node's cache of the project (copies of remote files, verification marks): ``$PTMST_RAY_CACHE``, default
    ``~/.cache/ptmst-ray``. Shared by every process on the node; nothing in it is an artefact of a run."""
    return os.path.expanduser(os.environ.get("PTMST_RAY_CACHE") or "~/.cache/ptmst-ray")


def verified_local_file(directory: str, name: str, digest: str) -> str:
    """A local path holding the bytes of ``directory/name``, checked against the manifest's sha256 ``digest``, for a
    reader that maps the file instead of reading it whole (the caption embeddings: ``data/embedfile.py``).

    A local run root: the file itself, hashed once per node and file version (a mark under
    :func:`cache_root` records its path, size, times and inode once it matched; another process, or a later
    run, that finds the same version trusts the mark; a file rewritten since has another version and is
    hashed again). A URL: a node-local copy named by ``digest``, hashed while it is copied and renamed into
    place only when it matched, so a killed or damaged copy never counts; one process copies while the others
    on the node wait for it (a file lock), then all map the same copy. Errors as :func:`read_verified`,
    naming ``directory/name``.
    """
    url = join(directory, name)
    path = local_path(url)
    if path is not None:
        return _verified_in_place(directory, url, path, digest)
    return _node_copy(directory, url, digest, os.path.splitext(name)[1])


def _file_version(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _verified_in_place(directory: str, url: str, path: str, digest: str) -> str:
    if not os.path.isfile(path):
        raise _listed_but_missing(directory, url)
    version = _file_version(path)
    mark = os.path.join(cache_root(), "verified", f"{digest}-{stable_hash(path)}.json")
    with contextlib.suppress(OSError, ValueError):
        with open(mark, encoding="utf-8") as f:
            if json.load(f) == version:
                return path
    if hash_file(url) != digest:
        raise _hash_mismatch(directory, url)
    with contextlib.suppress(OSError):  # an unwritable cache costs the next process one more hash, nothing else
        _local_atomic_write(mark, json.dumps(version, sort_keys=True).encode("utf-8"))
    return path


def _local_atomic_write(path: str, data: bytes) -> None:
    """A node-local cache file written under a temporary name, then renamed (not an artefact: not counted by
    :func:`writes`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _node_copy(directory: str, url: str, digest: str, suffix: str) -> str:
    import fcntl

    folder = os.path.join(cache_root(), "files")
    dest = os.path.join(folder, f"{digest}{suffix}")
    if os.path.isfile(dest):
        return dest
    try:
        os.makedirs(folder, exist_ok=True)
        with open(f"{dest}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when a killed holder's process ends
            if not os.path.isfile(dest):  # another process may have copied it while this one waited
                _copy_checked(directory, url, digest, dest)
    except OSError as e:
        raise StorageError(f"{url}: cannot copy it into this node's cache {folder} ({_reason(e)}); free space there or "
                           "set PTMST_RAY_CACHE to a writable folder with room", url) from e
    return dest


def _copy_checked(directory: str, url: str, digest: str, dest: str) -> None:
    fs, path = filesystem(url)
    tmp = f"{dest}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    h = hashlib.sha256()
    try:
        try:
            src = fs.open(path, "rb")
        except FileNotFoundError:
            raise _listed_but_missing(directory, url) from None
        with src, open(tmp, "wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise _hash_mismatch(directory, url)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url``, or None if it is not on the local disk."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        return None
    return os.path.abspath(os.path.expanduser(url))


# --------------------------------------------------------------------------- object stores

S3_SCHEMES = ("s3", "s3a")
"""Reached through s3fs (and, for Ray Train's checkpoints, pyarrow's S3FileSystem), configured by AWS_*."""
GCS_SCHEMES = ("gs", "gcs")
"""Reached through gcsfs (and pyarrow's GcsFileSystem), configured by Google's application default credentials;
STORAGE_EMULATOR_HOST points both at an emulator (:func:`gcs_emulator`)."""
OBJECT_STORE_SCHEMES = S3_SCHEMES + GCS_SCHEMES
"""Object stores: an upload appears whole or not at all (artefacts are written in place) and other processes add
and delete keys (listings are never cached)."""
PROBE_TIMEOUT_S = 5.0
"""Connect/read timeout of the run root's pre-run probe: an unreachable endpoint fails in seconds."""
PROBE_WAIT_S = 15.0
"""The longest the bucket probe waits in all: gcsfs retries a request it cannot send up to 6 times with back-off
(~35 s for a closed port) and takes no per-instance limit, so the probe stops waiting for it instead."""


def scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def gcs_emulator() -> str | None:
    """The GCS emulator's URL from STORAGE_EMULATOR_HOST (the variable Google's clients and gcsfs read), or None
    (Google's own endpoint)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _probe_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """A filesystem for ``url`` that fails fast: bounded timeouts, no retries (S3) or bounded requests (GCS)."""
    if scheme(url) not in OBJECT_STORE_SCHEMES:
        return filesystem(url)
    fs_cls = fsspec.get_filesystem_class(scheme(url))
    if scheme(url) in GCS_SCHEMES:
        fs = fs_cls(skip_instance_cache=True, use_listings_cache=False, requests_timeout=PROBE_TIMEOUT_S)
    else:
        fs = fs_cls(skip_instance_cache=True, config_kwargs={"connect_timeout": PROBE_TIMEOUT_S,
                                                             "read_timeout": PROBE_TIMEOUT_S,
                                                             "retries": {"max_attempts": 1}})
        fs.retries = 1  # s3fs's own retry loop (class default 5, with back-off)
    return fs, fs._strip_protocol(url)


def _store(url: str) -> tuple[str, str, str, str]:
    """The object store of ``url`` for messages: (its name, its endpoint now, where its credentials come from, the
    variable that sets its endpoint)."""
    if scheme(url) in GCS_SCHEMES:
        return ("GCS", gcs_emulator() or "Google's endpoint",
                "GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`",
                "STORAGE_EMULATOR_HOST (unset for Google's own)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
    return "S3", endpoint, "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE", "AWS_ENDPOINT_URL"


DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                          "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccountProblem"})
"""S3 error codes that mean "these credentials may not do this" (refused, not unreachable or missing)."""


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the exceptions it wraps (its cause, else its context), each once."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _refused(e: BaseException) -> bool:
    response = getattr(e, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return (isinstance(e, PermissionError) or code in DENIED_CODES or type(e).__name__ in DENIED_CODES
            or getattr(e, "code", None) in (401, 403) or (type(e) is OSError and str(e).startswith("Forbidden")))


def access_denied(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) is a refusal by the store: a ``PermissionError``, an S3
    error whose code is in :data:`DENIED_CODES` (s3fs translates most, not all, of botocore's errors), or gcsfs's
    refusals (HTTP 401 as its ``HttpError``, 403 as an ``OSError`` "Forbidden: ...")."""
    return any(_refused(x) for x in _chain(e))


MISSING_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"})
"""Errors (botocore's, google.auth's) that mean no credentials were found at all: nothing was asked of the store."""


def credentials_missing(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it wraps) says that no credentials were found (:data:`MISSING_CREDENTIALS`)."""
    return any(type(x).__name__ in MISSING_CREDENTIALS for x in _chain(e))


def _within(seconds: float, fn) -> Any:
    """``fn()`` on a daemon thread, waited for at most ``seconds``: its value or its exception, or a TimeoutError
    (the thread is left to end by itself, and a daemon does not hold the process's exit; the command stops on the
    error)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="ptmst-storage-probe", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _probe_bucket(fs: fsspec.AbstractFileSystem, url: str, path: str) -> None:
    """List the bucket of ``url``; a StorageError telling apart a missing bucket, refused credentials and
    an unreachable endpoint (never the credentials themselves)."""
    bucket = path.split("/", 1)[0]
    store, endpoint, credentials, endpoint_var = _store(url)
    try:
        _within(PROBE_WAIT_S, lambda: fs.ls(bucket, detail=False))
    except FileNotFoundError:
        raise StorageError(f"{url}: bucket {bucket!r} does not exist at {endpoint}; create it or fix the "
                           "bucket name", url) from None
    except Exception as e:  # noqa: BLE001 - botocore's and aiohttp's connection errors are not OSErrors
        if access_denied(e):
            raise StorageError(f"{url}: access to bucket {bucket!r} denied at {endpoint}; check the "
                               f"credentials ({credentials})", url) from None
        if credentials_missing(e):
            raise StorageError(f"{url}: no {store} credentials were found on this machine ({type(e).__name__}); "
                               f"set them ({credentials})", url) from None
        reason = str(e) if type(e) is TimeoutError else type(e).__name__  # ours names the wait
        raise StorageError(f"{url}: cannot reach the {store} endpoint {endpoint} ({reason}); "
                           f"check {endpoint_var} and the network", url) from None


def check_readable(url: str) -> None:
    """For commands that only read a run root: on an object store, the bucket probe of
    :func:`check_writable` (fast, bounded, one line); nothing to do for local paths."""
    if scheme(url) in OBJECT_STORE_SCHEMES:
        fs, path = _probe_fs(url)
        _probe_bucket(fs, url, path)


def check_writable(url: str) -> None:
    """Write and delete a probe object under ``url``; raise :class:`StorageError` with a one-line reason.

    On an object store the bucket is read first, so the message tells apart an unreachable endpoint,
    a missing bucket, credentials that are refused, and a prefix that can be read but not written.
    Credentials are never part of a message (only the names of the variables to check).
    """
    fs, path = _probe_fs(url)
    probe = f"{path.rstrip('/')}/.ptmst-write-check-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if scheme(url) in OBJECT_STORE_SCHEMES:
        _probe_bucket(fs, url, path)
    try:
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 - connection errors of remote filesystems are not OSErrors
        if access_denied(e):
            raise StorageError(f"{url}: read-only (writing a probe object was denied); choose a prefix these "
                               "credentials may write", url) from None
        if isinstance(e, OSError):
            raise write_error(url, e) from None
        raise StorageError(f"{url}: cannot write ({type(e).__name__}: {e})", url) from None
