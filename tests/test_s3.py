"""Run roots on object storage (issue #21), through a real S3 API: moto's server on 127.0.0.1, a fresh
bucket per test, reached only through the standard AWS_* variables (fixtures ``s3_server`` / ``s3`` in
conftest.py). Covers the storage layer and Train's pyarrow filesystem on one bucket, the resume scan
and checkpoint clean-up on key prefixes, and the pre-run checks of a bad S3 run root. The pipeline end to end on
a bucket (a killed phase worker, a rerun that skips every finished stage, `data show` and `eval` reading
it) runs on the two-node cluster: tests/test_launch.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import S3_KEY, S3_SECRET
from ptmst_ray import storage, tensorio

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """CLI messages on one line each (the rich console would wrap long URLs at 80 columns)."""
    from ptmst_ray_cli.common import console

    monkeypatch.setattr(console, "width", 4000)


# ---------------------------------------------------------------- the storage layer and pyarrow on one bucket


def test_storage_and_pyarrow_reach_the_same_bucket(s3):
    """s3fs (every stage) and pyarrow's S3FileSystem (Ray Train's checkpoints) see the same objects,
    both configured by AWS_ENDPOINT_URL & co. only; an atomic write leaves no temporary object."""
    import pyarrow.fs as pafs

    from ptmst_ray.orchestration.phases import storage_args

    root = s3.url("run")
    storage.write_json(storage.join(root, "a", "x.json"), {"v": 1})
    storage.write_manifest(storage.join(root, "a"), {"config_hash": "h"})
    assert s3.keys("run/") == ["run/a/manifest.json", "run/a/x.json"]  # no .tmp- leftovers
    assert storage.is_complete(storage.join(root, "a"), "h") and storage.isdir(storage.join(root, "a"))
    assert storage.listdir(root) == ["a"]

    assert storage_args(root) == {"storage_path": root}  # Train builds pyarrow's own S3 filesystem from it
    fs, path = pafs.FileSystem.from_uri(root)
    assert type(fs).__name__ == "S3FileSystem"
    with fs.open_input_stream(f"{path}/a/x.json") as f:
        assert json.loads(f.read()) == {"v": 1}
    with fs.open_output_stream(f"{path}/b/y.bin") as f:
        f.write(b"from pyarrow")
    assert storage.read_bytes(storage.join(root, "b", "y.bin")) == b"from pyarrow"
    assert s3.client().get_object(Bucket=s3.bucket, Key="run/b/y.bin")["Body"].read() == b"from pyarrow"


def test_an_object_is_uploaded_in_place_and_a_failed_write_leaves_nothing(s3):
    """On S3 an artefact is one upload, never a temporary key moved into place (no COPY); a write that
    fails after some of its parts were uploaded (more than s3fs's 50 MiB block) or before any upload
    leaves no object, partial or temporary, and no pending multipart upload."""
    small, big = s3.url("run", "small.bin"), s3.url("run", "big.bin")
    for url, size in ((small, 1024), (big, 60 * 2**20)):
        with pytest.raises(RuntimeError, match="killed mid-write"):
            with storage.atomic_open(url) as f:
                f.write(b"x" * size)
                raise RuntimeError("killed mid-write")
    assert s3.keys("run/") == []
    assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []

    import s3fs

    copies = []
    original = s3fs.S3FileSystem._copy_basic

    async def counting(self, *a, **k):
        copies.append(a)
        return await original(self, *a, **k)

    s3fs.S3FileSystem._copy_basic = counting
    try:
        storage.write_bytes(small, b"whole")
        storage.write_json(storage.join(s3.url("run"), "m.json"), {"v": 1})
    finally:
        s3fs.S3FileSystem._copy_basic = original
    assert copies == [] and s3.keys("run/") == ["run/m.json", "run/small.bin"]
    assert storage.read_bytes(small) == b"whole"



def test_an_object_replaced_between_a_readers_requests_is_read_whole(s3, monkeypatch):
    """Another process replaces a file right after a reader's first request (the driver reading an expert's
    trajectory.json as its actor stores the next epoch: the CI failure of 6d70671, s3fs's FileExpired; a lease at a
    heartbeat; an epoch's tensor file rewritten by a retried actor while its header is read): the read returns one
    whole version, the new one, and never fails."""
    import asyncio

    import s3fs

    from ptmst_ray import lease
    from ptmst_ray.trajectories import store

    def tensors(write_id: str) -> bytes:
        return store._serialise({"w": torch.arange(64.0)}, {"epoch": 1}, write_id)

    cases = [("run/experts/expert_0000/trajectory.json", storage.read_json, {"epochs": 1, "pad": "a"},
              {"epochs": 2, "pad": "b" * 300}),
             ("run/lease.json", lease._read, {"pid": 1}, {"pid": 2, "host": "h" * 300}),
             ("run/experts/expert_0000/epoch_0001.safetensors",
              lambda url: store.read_header_metadata(url)[store.WRITE_ID_KEY], "old-write", "new-write")]
    original = s3fs.S3FileSystem._call_s3
    for key, read, old, new in cases:
        url = s3.url(key)
        body = (lambda v: tensors(v)) if key.endswith(".safetensors") else (lambda v: json.dumps(v).encode())
        storage.write_bytes(url, body(old))
        requests: list[str] = []

        async def replacing(self, method, *a, **k):
            out = await original(self, method, *a, **k)
            requests.append(method)
            if len(requests) == 1:  # the writer lands between this reader's first request and its next
                await asyncio.to_thread(s3.client().put_object, Bucket=s3.bucket, Key=key, Body=body(new))
            return out

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", replacing)
        got = read(url)
        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", original)
        assert got == new, (key, requests)
        assert len(requests) > 1, requests  # the replacement did land between two requests of the read

    # replaced after every request: the reader gives up with a message naming the file, not a half-read version
    versions = iter(range(1000))

    async def always(self, method, *a, **k):
        out = await original(self, method, *a, **k)
        await asyncio.to_thread(s3.client().put_object, Bucket=s3.bucket, Key="run/lease.json",
                                Body=json.dumps({"v": next(versions)}).encode())
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", always)
    with pytest.raises(storage.StorageError, match=f"{s3.url('run/lease.json')}: replaced .* times while being read"):
        storage.read_json(s3.url("run/lease.json"))


def test_resume_scan_and_checkpoint_cleanup_on_key_prefixes(s3):
    """On an object store a 'folder' is a key prefix: the resume scan takes the furthest intact state and
    skips a cut upload (its tensors do not match the hash in its JSON, or it has no JSON at all); the
    clean-up deletes untracked checkpoint prefixes and keeps the registered ones and the resume point."""
    from ptmst_ray.orchestration.phases import checkpoint_dirs, latest_stored_state, prune_unregistered

    run_dir = s3.url("run", "phases", "phase0-abc")
    for n, it in enumerate((5, 10, 15, 20)):
        tensorio.save_state(storage.join(run_dir, f"checkpoint_{n:06d}"), {"iteration": it, "x": torch.full((3,), float(it))})
    # a kill mid-upload: checkpoint 3's tensor object is cut short; checkpoint 4 got only its tensors
    s3.client().put_object(Bucket=s3.bucket, Key="run/phases/phase0-abc/checkpoint_000003/" + tensorio.TENSORS,
                           Body=b"partial")
    s3.client().put_object(Bucket=s3.bucket, Key="run/phases/phase0-abc/checkpoint_000004/" + tensorio.TENSORS,
                           Body=b"cut")
    assert checkpoint_dirs(run_dir) == [f"checkpoint_{n:06d}" for n in range(5)]
    stored = latest_stored_state(run_dir)
    assert stored["iteration"] == 15 and torch.equal(stored["x"], torch.full((3,), 15.0))

    # Train holds 1 and 2; 0 is an untracked older state, 4 an upload with no state: both go;
    # 3 (iteration 20, further than every registered one) is kept: it is what a resume reads first
    removed = prune_unregistered(run_dir, ["checkpoint_000001", "checkpoint_000002"])
    assert sorted(os.path.basename(u) for u in removed) == ["checkpoint_000000", "checkpoint_000004"]
    left = sorted({k.split("/")[3] for k in s3.keys("run/phases/phase0-abc/")})
    assert left == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    assert latest_stored_state(run_dir)["iteration"] == 15


def test_many_small_objects_are_written_at_once_and_the_first_error_is_raised(s3, monkeypatch):
    """`write_all` (the built-in data's thousands of images) puts every object, several at a time on a bucket;
    a write that fails raises its error to the caller, and what is not written is absent, never partial."""
    import threading

    files = {s3.url("run", "imgs", f"{k:03d}.png"): bytes([k]) * (100 + k) for k in range(40)}
    threads, write = set(), storage.write_bytes

    def recording(url, data):
        threads.add(threading.get_ident())
        write(url, data)

    monkeypatch.setattr(storage, "write_bytes", recording)
    storage.write_all(files)
    assert s3.keys("run/imgs/") == sorted(u.split(f"{s3.bucket}/", 1)[1] for u in files)
    assert all(s3.client().get_object(Bucket=s3.bucket, Key=u.split(f"{s3.bucket}/", 1)[1])["Body"].read() == d
               for u, d in files.items())
    assert len(threads) > 1  # concurrent, not one after another

    def failing(url, data):
        if url.endswith("007.png"):
            raise OSError("disk on fire")
        write(url, data)

    monkeypatch.setattr(storage, "write_bytes", failing)
    again = {u.replace("/imgs/", "/again/"): d for u, d in files.items()}
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_all(again)
    written = s3.keys("run/again/")
    assert "run/again/007.png" not in written
    for key in written:  # whatever was written is whole (how many depends on the threads' timing)
        assert s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read() == again[s3.url(key)]


def test_manifest_is_last_and_verified_on_the_bucket(s3):
    """A stage cut between its data and its manifest counts as not done; a cut (wrong-content) object
    under a manifest is named by the content-hash check."""
    d = s3.url("run", "stage")
    storage.write_bytes(storage.join(d, "part.bin"), b"complete content")
    assert not storage.is_complete(d)  # data without the manifest: not complete
    storage.write_manifest(d, {"config_hash": "h", "files": {"part.bin": storage.hash_bytes(b"complete content")}})
    storage.verify_files(d, storage.read_manifest(d)["files"])
    s3.client().put_object(Bucket=s3.bucket, Key="run/stage/part.bin", Body=b"complete cont")  # cut upload
    with pytest.raises(storage.StorageError, match="part.bin: content hash does not match"):
        storage.verify_files(d, storage.read_manifest(d)["files"])


# ---------------------------------------------------------------- bad input, before any work


def _moto_auth(endpoint: str, on: bool) -> None:
    """Switch moto's IAM authentication on (every request must be signed by a known user) or off."""
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                 headers={"Content-Type": "text/plain"})  # a form body would not reach moto
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture
def s3_auth(s3):
    """The bucket with authentication on; returns the keys of a user that may only read it."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                       region_name="us-east-1")
    user = f"reader-{s3.bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
                       "Resource": [f"arn:aws:s3:::{s3.bucket}", f"arn:aws:s3:::{s3.bucket}/*"]}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    _moto_auth(s3.endpoint, True)
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        _moto_auth(s3.endpoint, False)


def _run_cli(args: list[str]):
    from ptmst_ray_cli.main import app

    return runner.invoke(app, args)


def _assert_exit_2(result, *needles: str) -> str:
    out = result.output
    assert result.exit_code == 2, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "run.root" in lines[0], out
    for n in needles:
        assert n in lines[0], out
    assert S3_SECRET not in out and os.environ["AWS_SECRET_ACCESS_KEY"] not in out
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts Ray: the checks must come first."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray was started before the run root was checked")

    monkeypatch.setattr(ray, "init", refuse)


def test_missing_bucket_exits_2(s3, no_ray):
    res = _run_cli(["run", "--set", f"run.root=s3://{s3.bucket}-missing/run"])
    _assert_exit_2(res, f"{s3.bucket}-missing", "does not exist", "create it")


def test_unreachable_endpoint_exits_2_quickly(s3, no_ray, monkeypatch):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a port nothing listens on
    port = sock.getsockname()[1]
    sock.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for command in (["data", "prepare"], ["data", "show"]):  # a command that writes, and one that only reads
        res = _run_cli([*command, "--set", f"run.root={s3.url('run')}"])
        _assert_exit_2(res, "cannot reach", f"127.0.0.1:{port}", "AWS_ENDPOINT_URL")


def test_wrong_credentials_and_read_only_prefix_exit_2(s3, s3_auth, no_ray, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-printed")
    s3fs.S3FileSystem.clear_instance_cache()
    res = _run_cli(["run", "--set", f"run.root={s3.url('run')}"])
    _assert_exit_2(res, "denied", "AWS_ACCESS_KEY_ID")
    assert "wrong-secret-never-printed" not in res.output

    reader_key, reader_secret = s3_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader_secret)
    s3fs.S3FileSystem.clear_instance_cache()
    res = _run_cli(["run", "--set", f"run.root={s3.url('run')}"])
    _assert_exit_2(res, "read-only")
    assert reader_secret not in res.output


def test_a_config_on_the_bucket_is_read_by_the_cli(s3, tmp_path):
    """`--config s3://...` reaches the bucket as given (not as a local path), and a missing one is named."""
    from ptmst_ray.config import CONFIG_DIR

    text = (CONFIG_DIR / "toy.yaml").read_text().replace("root: ~/.cache/ptmst-ray/toy", f"root: {s3.url('runs/r1')}")
    assert s3.url("runs/r1") in text
    storage.write_text(s3.url("recipes/toy.yaml"), text)
    shown = _run_cli(["config", "show", s3.url("recipes/toy.yaml"), "--set", "eval.seeds=4"])
    assert shown.exit_code == 0, shown.output
    assert f"root: {s3.url('runs/r1')}" in shown.output and "seeds: 4" in shown.output, shown.output
    missing = _run_cli(["config", "show", s3.url("recipes/nothing.yaml")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output, missing.output
    assert " ".join(missing.output.split()).startswith(f"error: {s3.url('recipes/nothing.yaml')}"), missing.output


def test_a_launch_checks_a_config_on_the_bucket_before_ray_up(s3, caplog):
    """A recipe on a bucket is checked before a cluster is paid for, as a local one is; one this machine cannot
    read is left to the job, with a warning."""
    from ptmst_ray.cluster import launch
    from ptmst_ray.cluster.spec import LaunchError
    from ptmst_ray.config import CONFIG_DIR

    gpu_yaml, url = launch.PROJECT_ROOT / "cluster" / "gpu.yaml", s3.url("recipes/toy.yaml")
    storage.write_text(url, (CONFIG_DIR / "toy.yaml").read_text())  # its run root: a path on this machine
    with pytest.raises(LaunchError, match="run.root"):
        launch.plan_launch(gpu_yaml, config_path=url)
    on_bucket = f"run.root={s3.url('runs/toy')}"
    with pytest.raises(LaunchError, match="distill.syn_steps"):
        launch.plan_launch(gpu_yaml, config_path=url, overrides=[on_bucket, "distill.syn_steps=0"])
    steps = launch.plan_launch(gpu_yaml, config_path=url, overrides=[on_bucket], follow=False)
    assert f"--config {url} --set {on_bucket}" in steps[-1].description
    with caplog.at_level("WARNING", logger="ptmst_ray.cluster.launch"):
        unread = launch.plan_launch(gpu_yaml, config_path=s3.url("recipes/nothing.yaml"), follow=False)
    assert "not checked before the launch" in caplog.text and len(unread) == len(steps)


def test_no_credentials_exits_2_naming_what_to_set(s3, no_ray, monkeypatch, tmp_path):
    """No credentials anywhere (botocore's NoCredentialsError) is said as that, not as an unreachable endpoint."""
    import s3fs

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on this machine
    s3fs.S3FileSystem.clear_instance_cache()
    res = _run_cli(["data", "prepare", "--set", f"run.root={s3.url('run')}"])
    assert res.exit_code == 2, res.output
    (line,) = [ln for ln in " ".join(res.output.split()).split("error: ")[1:]]
    assert "run.root" in line and "no S3 credentials were found" in line and "AWS_ACCESS_KEY_ID" in line, line
    assert "cannot reach" not in line and S3_SECRET not in res.output, line
