"""Run roots on object storage (issue #21), through a real S3 API: moto's server on 127.0.0.1, a fresh
bucket per test, reached only through the standard AWS_* variables (fixtures ``s3_server`` / ``s3`` in
conftest.py). Covers the storage layer and Train's pyarrow filesystem on one bucket, the resume scan
and checkpoint clean-up on key prefixes, the pre-run checks of a bad S3 run root, and `ptmst-ray run`
end to end on a bucket (a second run skipping every finished stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import S3_KEY, S3_SECRET, tiny_config
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


# ---------------------------------------------------------------- end to end on a bucket

SMALL = {"phases.0.iterations": 4, "phases.1.iterations": 10, "distill.checkpoint_every": 2,
         "eval.seeds": 1, "eval.epochs": 1, "eval.eval_points": 1}
"""The tiny config with every baseline (random, single_phase, full) but one short evaluation seed."""
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")


def _cli(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptmst_ray_cli", *args], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _etags(s3, prefix: str) -> dict[str, str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.faults
def test_run_on_s3_end_to_end_and_rerun_skips(s3, tmp_path):
    """`ptmst-ray run` end to end through the CLI, with run.root=s3://bucket/run on its own local Ray (its
    workers inherit AWS_*): every stage runs and is timed, results.json holds every method and metric, the
    distilled Parquet, grid, card and plot are written, every artefact lands in the bucket and nothing in the
    working directory; a phase worker SIGKILLed mid-phase resumes from its checkpoint in the bucket and the
    untracked checkpoint prefixes are cleaned up; the same command again redoes nothing before evaluation;
    `data show` and `eval` read from the bucket; no credential is written."""
    root = s3.url("run")
    cfg = tiny_config(root, **SMALL)
    config = tmp_path / "s3.yaml"
    config.write_text(cfg.to_yaml())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PTMST_RAY_CACHE=str(tmp_path / "cache"))

    from ptmst_ray.layout import Layout, phase_hash
    from ptmst_ray.orchestration.phases import checkpoint_dirs, latest_stored_state

    layout = Layout.of(cfg)
    run_dir = layout.train_run(f"phase1-{phase_hash(cfg, cfg.phases[1])}")
    t0 = time.time()
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, "-m", "ptmst_ray_cli", "run", "--config", str(config)], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # a phase worker SIGKILLed mid-phase, once a checkpoint of it is intact in the bucket
        victim, deadline = None, time.time() + 500
        while victim is None and time.time() < deadline and proc.poll() is None:
            tries = [storage.read_json(storage.join(layout.phase("phase1"), "attempts", n))
                     for n in storage.listdir(storage.join(layout.phase("phase1"), "attempts"))]
            if tries and "end" not in tries[-1] and storage.exists(run_dir):
                stored = latest_stored_state(run_dir)
                if stored is not None and 4 <= int(stored["iteration"]) < 10:
                    victim = tries[-1]["pid"]
            time.sleep(0.5)
        assert victim is not None, (f"phase1 never had an intact checkpoint in the bucket while it ran (run "
                                    f"{'ended' if proc.poll() is not None else 'still running'}):\n"
                                    f"{log.read_text()[-3000:]}")
        os.kill(victim, 9)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    print(f"first run on S3 (one phase worker killed): {time.time() - t0:.0f} s")
    attempts = [storage.read_json(storage.join(layout.phase("phase1"), "attempts", n))
                for n in storage.listdir(storage.join(layout.phase("phase1"), "attempts"))]
    assert len(attempts) >= 2 and max(a.get("resumed_from") or 0 for a in attempts) >= 4, attempts
    assert [m["iteration"] for m in storage.read_json(layout.metrics("phase1"))][-1] == 10
    assert len(checkpoint_dirs(run_dir)) <= 2, checkpoint_dirs(run_dir)  # untracked prefixes cleaned up
    keys = s3.keys("run/")
    for part in ("config.yaml", "data/train/manifest.json", "data/text_cache/", "data/embedded/", "pretrain/manifest.json",
                 "experts/expert_0001.safetensors", "shortcuts/range_0_3/", "phases/phase0/subset/manifest.json",
                 "phases/phase1/metrics.json", "distilled/distilled.parquet", "distilled/manifest.json",
                 "eval/results.json", "eval/plot.png"):
        assert any(k.startswith(f"run/{part}") for k in keys), (part, keys)
    ckpts = [k for k in keys if k.startswith(f"run/phases/phase0-{phase_hash(cfg, cfg.phases[0])}/checkpoint_")]
    assert any(k.endswith(tensorio.TENSORS) for k in ckpts), keys  # Train's checkpoints, through pyarrow
    assert not [k for k in keys if storage.TMP_MARK in k], "a temporary object was left behind"
    assert list(cwd.iterdir()) == [], "the run wrote to the local working directory"
    for k in ("config.yaml", "eval/results.json"):
        body = s3.client().get_object(Bucket=s3.bucket, Key=f"run/{k}")["Body"].read().decode()
        assert S3_SECRET not in body and S3_KEY not in body, k
    assert S3_SECRET not in output

    # what a user reads after a run: results.json with every method and metric, the stage table, the files
    results = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="run/eval/results.json")["Body"].read())
    assert set(results["methods"]) == {"ptm_st", "random", "single_phase", "full"}
    for method, m in results["methods"].items():
        for k in METRICS:
            assert set(m[k]) == {"mean", "std"} and 0.0 <= m[k]["mean"] <= 100.0, (method, k)
        assert m["seeds"] == cfg.eval.seeds
    assert results["methods"]["ptm_st"]["pairs"] == cfg.total_pairs == results["methods"]["random"]["pairs"]
    stages = ["data", "pretrain", "embed", "experts", "phases", "aggregate", "eval"]
    assert [r["stage"] for r in results["stages"]] == stages and all(r["ran"] for r in results["stages"])
    assert sum(r["seconds"] for r in results["stages"]) <= results["wall_seconds"] + 1
    assert "stages:" in output and "skipped (complete)" not in output
    table = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(root, "distilled", "distilled.parquet"))))
    assert table.num_rows == cfg.total_pairs and table.column("phase").to_pylist() == [0] * 6 + [1] * 8
    assert {"image_png", "text_embedding", "nearest_caption", "similarity_row", "alpha_img"} <= set(table.column_names)
    for png in ("distilled/grid.png", "eval/plot.png"):
        assert storage.read_bytes(storage.join(root, png))[:4] == b"\x89PNG", png
    assert storage.read_json(storage.join(root, "distilled", "card.json"))["pairs"] == cfg.total_pairs

    stamps = _etags(s3, "run/")
    second = _cli(["run", "--config", str(config), "--json"], cwd, env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    results = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="run/eval/results.json")["Body"].read())
    assert [(r["stage"], r["ran"]) for r in results["stages"]] == [(st, st == "eval") for st in stages]
    assert "skipped (complete)" in second.stdout + second.stderr
    assert results["experts"]["trained"] == 0 and results["experts"]["skipped"] == 2
    assert {n: s.get("skipped") for n, s in results["phases"].items()} == {"phase0": True, "phase1": True,
                                                                           "single_phase": True}
    attempt_prefixes = tuple(f"run/phases/{n}/attempts" for n in results["phases"])
    again = _etags(s3, "run/")
    redone = [k for k in stamps if not k.startswith(("run/eval/", "run/config.yaml", *attempt_prefixes))
              and again.get(k) != stamps[k]]
    assert redone == [], redone

    show = _cli(["data", "show", "--config", str(config)], cwd, env)
    assert show.returncode == 0 and "train" in show.stdout, show.stdout + show.stderr
    ev = _cli(["eval", "--config", str(config), "-m", "ptm_st", "--json", str(tmp_path / "ev.json")], cwd, env)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    assert json.loads((tmp_path / "ev.json").read_text())["methods"]["ptm_st"]["pairs"] == cfg.total_pairs
    assert list(cwd.iterdir()) == []
