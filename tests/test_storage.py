"""Storage: local and memory:// URLs, atomic writes, manifest-last completion, hashes."""

from __future__ import annotations

import uuid

import pytest

from ptmst_ray import storage


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    return str(tmp_path / "root") if request.param == "local" else f"memory://t-{uuid.uuid4().hex[:8]}"


def test_write_read_round_trip(root):
    storage.write_json(storage.join(root, "a", "b.json"), {"x": [1, 2]})
    assert storage.read_json(storage.join(root, "a/b.json")) == {"x": [1, 2]}
    storage.write_bytes(storage.join(root, "c.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "c.bin")) == b"\x00\x01"
    assert storage.listdir(root) == ["a", "c.bin"]


def test_interrupted_write_leaves_nothing(root):
    url = storage.join(root, "d", "out.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(url) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert not storage.exists(url)
    assert storage.listdir(storage.join(root, "d")) == []  # no temporary left behind


def test_manifest_written_last_marks_complete(root):
    d = storage.join(root, "stage")
    storage.write_bytes(storage.join(d, "part.bin"), b"abc")
    assert not storage.is_complete(d)  # outputs without a manifest are never complete
    storage.write_manifest(d, {"config_hash": "h1", "files": {"part.bin": storage.hash_bytes(b"abc")}})
    assert storage.is_complete(d) and storage.is_complete(d, "h1") and not storage.is_complete(d, "h2")
    storage.verify_files(d, storage.read_manifest(d)["files"])
    storage.write_bytes(storage.join(d, "part.bin"), b"abX")
    with pytest.raises(storage.StorageError, match="part.bin.*content hash"):
        storage.verify_files(d, storage.read_manifest(d)["files"])


def test_stable_hash_ignores_key_order():
    assert storage.stable_hash({"a": 1, "b": [1, 2]}) == storage.stable_hash({"b": [1, 2], "a": 1})
    assert storage.stable_hash({"a": 1}) != storage.stable_hash({"a": 2})


def test_unwritable_root_gives_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the run root should be")  # unwritable even for root
    with pytest.raises(storage.StorageError, match="cannot write"):
        storage.write_bytes(str(blocker / "stage" / "x.bin"), b"1")
    assert blocker.read_text().startswith("a file")


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(storage.StorageError, match="nope.json"):
        storage.read_json(str(tmp_path / "nope.json"))


def test_access_denied_recognises_refusals_in_any_wrapping():
    """A refusal is recognised however the S3 client delivers it: s3fs's PermissionError, botocore's raw
    ClientError (any modeled subclass), or either wrapped as the cause of another error; an unreachable
    endpoint or a missing key is not a refusal."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")

    assert storage.access_denied(PermissionError("denied"))
    assert storage.access_denied(client_error("AccessDenied"))
    assert storage.access_denied(client_error("InvalidAccessKeyId"))
    wrapped = OSError(5, "I/O error")
    wrapped.__cause__ = client_error("AccessDenied")
    assert storage.access_denied(wrapped)
    assert not storage.access_denied(client_error("NoSuchKey"))
    assert not storage.access_denied(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not storage.access_denied(OSError(5, "I/O error"))


def test_scratch_of_ended_processes_is_removed_by_the_next_scratch_dir(tmp_path, monkeypatch):
    """A process killed between writing a checkpoint to its scratch dir and removing it (after Train's upload)
    leaves the dir; the next scratch_dir on the host removes it, and only it: not a running process's, not
    another host's, not a file that is not scratch."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    make = ("import os, sys, time; from ptmst_ray import storage; d = storage.scratch_dir('phase0'); "
            "open(os.path.join(d, 'state.safetensors'), 'wb').write(b'x' * 1000); print(d, flush=True); "
            "time.sleep(float(sys.argv[1]))")
    running = subprocess.Popen([sys.executable, "-c", make, "600"], env=env, stdout=subprocess.PIPE, text=True)
    killed = subprocess.Popen([sys.executable, "-c", make, "600"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        running_dir, killed_dir = running.stdout.readline().strip(), killed.stdout.readline().strip()
        ended = subprocess.run([sys.executable, "-c", make, "0"], env=env, capture_output=True, text=True,
                               check=True)  # the last to make one: nothing has removed its dir yet
        killed.kill()
        killed.wait()
        ended_dir = ended.stdout.strip()
        ended_pid = int(os.path.basename(ended_dir).rsplit(".", 2)[1])  # ended: on another host, kept
        other_host = tmp_path / f"{storage.SCRATCH_PREFIX}.phase0.not-{socket.gethostname()}.{ended_pid}.ab"
        other_host.mkdir()
        unrelated = tmp_path / "ptmst-phase0-x1"  # not a scratch dir's name
        unrelated.mkdir()
        for d in (ended_dir, killed_dir, running_dir):
            assert os.path.isfile(os.path.join(d, "state.safetensors")) and os.path.dirname(d) == str(tmp_path)

        mine = storage.scratch_dir("round")

        assert not os.path.exists(ended_dir) and not os.path.exists(killed_dir)
        assert os.path.isfile(os.path.join(running_dir, "state.safetensors"))
        assert other_host.is_dir() and unrelated.is_dir() and os.path.isdir(mine)
        assert f".{os.getpid()}." in os.path.basename(mine)
        assert storage.remove_orphaned_scratch() == []  # this process's own dir is kept too
        assert os.path.isdir(mine)
    finally:
        running.kill()
        running.wait()
    assert storage.remove_orphaned_scratch() == [running_dir]
    with pytest.raises(ValueError, match="must not contain"):
        storage.scratch_dir("a.b")


READ_AND_EXIT = """
import os, sys
import pyarrow, pyarrow.parquet  # the import starts jemalloc's and one more thread of its own: counted before
from ptmst_ray import storage
url = sys.argv[1]
threads = len(os.listdir("/proc/self/task"))
blob = open(url, "rb").read()
for _ in range(8):
    t = storage.read_parquet(url, ["index", "blob"])
    g = storage.read_parquet(url, ["blob"], row_group=2)
    m = storage.parquet_table(pyarrow.BufferReader(blob), ["index"])  # bytes already read (a verified shard)
assert len(os.listdir("/proc/self/task")) == threads, "Arrow started threads"
print(t.num_rows, sum(t.column("index").to_pylist()), sum(len(b) for b in t.column("blob").to_pylist()))
"""


def test_parquet_read_through_a_file_object_lets_the_process_exit_cleanly(tmp_path):
    """A process that reads Parquet through fsspec's file object and then exits ends with status 0 and the
    columns asked for. With Arrow's threads decoding, work of its pool can outlive ``read_table`` and the exit
    aborts ("terminate called without an active exception", SIGABRT: CI saw `ptmst-ray data show` print its
    summary and then fail): 37 such processes in 200 aborted with Arrow's threads (through a file object or on
    bytes in memory), 1 in 200 under load with ``read_table(use_threads=False)``, which still starts Arrow's I/O
    threads. So each process also checks that its reads started no thread at all (Linux: /proc/self/task), which
    fails every time Arrow starts one: a few processes are enough."""
    import concurrent.futures
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 600
    blobs = [rng.bytes(int(k)) for k in rng.integers(100, 2000, n)]
    table = pa.table({"index": np.arange(n), "caption": [f"caption {i}" for i in range(n)], "blob": blobs})
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=100)
    expected = f"{n} {n * (n - 1) // 2} {sum(map(len, blobs))}"
    assert storage.read_parquet(str(path), ["index", "blob"]).column_names == ["index", "blob"]
    # a row group: its 100 rows, as pyarrow reads them itself; a column the file lacks is an error, not left out
    assert storage.read_parquet(str(path), ["blob"], row_group=2).equals(pq.read_table(path).slice(200, 100)
                                                                          .select(["blob"]))
    with pytest.raises(pa.ArrowInvalid, match="no column"):
        storage.read_parquet(str(path), ["index", "nope"])

    def run(_):
        return subprocess.run([sys.executable, "-c", READ_AND_EXIT, str(path)], capture_output=True, text=True,
                              timeout=120)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(run, range(6)))
    failed = [(p.returncode, p.stderr[-300:]) for p in done if p.returncode != 0]
    assert failed == [], failed
    assert {p.stdout.strip() for p in done} == {expected}
