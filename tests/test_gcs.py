"""Run roots on Google Cloud Storage, through a GCS JSON API: gcp-storage-emulator on 127.0.0.1, a fresh bucket per
test, reached through STORAGE_EMULATOR_HOST (fixtures ``gcs_server`` / ``gcs`` in conftest.py) and checked with
Google's own client. Covers the storage layer (gcsfs) and Ray Train's pyarrow filesystem on one bucket, writes in
place, a phase's Train run that checkpoints to the bucket and resumes from it, and the pre-run checks (a missing
bucket, an unreachable endpoint, refused credentials as gcsfs reports them). The S3 counterparts, and the pipeline end to end on a bucket: tests/test_s3.py, tests/test_launch.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import TINY, tiny_config, upload_root
from ptmst_ray import storage


def test_storage_and_pyarrow_reach_the_same_bucket(gcs):
    """gcsfs (every stage) and the pyarrow filesystem Ray Train is given see the same objects, both pointed at
    the emulator by STORAGE_EMULATOR_HOST alone; an atomic write leaves no temporary object; listings are not
    cached (a key another client adds is seen at once)."""
    import pyarrow.fs as pafs

    from ptmst_ray.orchestration.phases import storage_args

    root = gcs.url("run")
    storage.write_json(storage.join(root, "a", "x.json"), {"v": 1})
    storage.write_manifest(storage.join(root, "a"), {"config_hash": "h"})
    assert gcs.keys("run/") == ["run/a/manifest.json", "run/a/x.json"]  # no .tmp- leftovers
    assert storage.is_complete(storage.join(root, "a"), "h") and storage.listdir(root) == ["a"]
    gcs.put("run/c/z.json", b"{}")  # another process adds a key: the next listing has it
    assert storage.listdir(root) == ["a", "c"]

    args = storage_args(root)
    fs = args["storage_filesystem"]
    assert isinstance(fs, pafs.GcsFileSystem) and args["storage_path"] == f"{gcs.bucket}/run"
    with fs.open_input_stream(f"{args['storage_path']}/a/x.json") as f:
        assert json.loads(f.read()) == {"v": 1}
    with fs.open_output_stream(f"{args['storage_path']}/b/y.bin") as f:
        f.write(b"from pyarrow")
    assert storage.read_bytes(storage.join(root, "b", "y.bin")) == b"from pyarrow"
    assert gcs.client().bucket(gcs.bucket).blob("run/b/y.bin").download_as_bytes() == b"from pyarrow"


def test_without_an_emulator_train_gets_the_url(monkeypatch):
    """Google's endpoint: Ray Train builds pyarrow's GCS filesystem from the URL itself, as for S3."""
    from ptmst_ray.orchestration.phases import storage_args

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert storage_args("gs://bucket/run/phases") == {"storage_path": "gs://bucket/run/phases"}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "localhost:4443")  # host:port, as gcsfs accepts it
    assert storage.gcs_emulator() == "http://localhost:4443"


def test_an_object_is_written_in_place_and_a_failed_write_leaves_nothing(gcs, monkeypatch):
    """A GCS upload appears whole or not at all, so an artefact is one upload, never a temporary object copied
    into place (GCS has no rename: a move rewrites every byte); a write that fails, before or after some of a
    resumable upload's chunks went up (more than gcsfs's 5 MiB block), leaves no object."""
    import gcsfs
    import gcsfs.retry

    # the emulator cannot cancel a resumable upload (501; Google's API can): no retries with back-off for it
    monkeypatch.setattr(gcsfs.retry, "errs", gcsfs.retry.errs - {501, "501"})
    small, big = gcs.url("run", "small.bin"), gcs.url("run", "big.bin")
    for url, size in ((small, 1024), (big, 12 * 2**20)):
        with pytest.raises(RuntimeError, match="killed mid-write"):
            with storage.atomic_open(url) as f:
                f.write(b"x" * size)
                raise RuntimeError("killed mid-write")
    assert gcs.keys("run/") == []

    copies, copy = [], gcsfs.GCSFileSystem._cp_file  # a move is a copy and a delete on GCS

    async def counting(self, *a, **k):
        copies.append(a)
        return await copy(self, *a, **k)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_cp_file", counting)
    storage.write_bytes(small, b"whole")
    storage.write_json(gcs.url("run", "m.json"), {"v": 1})
    assert copies == [] and gcs.keys("run/") == ["run/m.json", "run/small.bin"]
    assert storage.read_bytes(small) == b"whole"


def test_gcsfs_refusals_count_as_access_denied():
    """gcsfs raises a 403 as OSError("Forbidden: ...") and a 401 as its HttpError: both are the store refusing
    the credentials (the pre-run check then names them), unlike a missing object or a connection error."""
    from gcsfs.retry import HttpError

    assert storage.access_denied(OSError("Forbidden: b/run/x\nno storage.objects.create access"))
    assert storage.access_denied(HttpError({"code": 401, "message": "Invalid Credentials"}))
    assert not storage.access_denied(HttpError({"code": 500, "message": "backend error"}))
    assert not storage.access_denied(FileNotFoundError("b/run/x"))
    assert not storage.access_denied(OSError("Connection reset by peer"))


def _run_error(monkeypatch, root: str) -> str:
    """`ptmst-ray run` on run root ``root``: exit 2 and its one error line, Ray never started."""
    import ray

    from ptmst_ray_cli.common import console
    from ptmst_ray_cli.main import app

    monkeypatch.setattr(console, "width", 4000)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started before the run root was checked"))
    res = CliRunner().invoke(app, ["run", "--set", f"run.root={root}"])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "run.root" in lines[0], res.output
    return lines[0]


def test_missing_bucket_exits_2(gcs, monkeypatch):
    """The pre-run check names the missing bucket and the endpoint, before Ray starts."""
    line = _run_error(monkeypatch, f"gs://{gcs.bucket}-missing/run")
    assert f"{gcs.bucket}-missing" in line and "does not exist" in line and gcs.endpoint in line


def test_unreachable_endpoint_exits_2_without_waiting_for_gcsfs_retries(gcs, monkeypatch):
    """A closed port: gcsfs would retry with back-off for ~35 s; the probe stops waiting at its bound (1 s here)
    and names the endpoint and the variable that sets it."""
    from ptmst_ray.cluster.local import free_ports

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"  # free now: nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", closed)
    monkeypatch.setattr(storage, "PROBE_WAIT_S", 1.0)
    line = _run_error(monkeypatch, gcs.url("run"))
    assert "cannot reach the GCS endpoint" in line and closed in line and "STORAGE_EMULATOR_HOST" in line, line
    assert "(no answer in 1 s)" in line, line  # not gcsfs's own error after its last retry


def test_a_phase_checkpoints_to_the_bucket_and_resumes_from_it(gcs, prepared_root, ray_session):
    """One phase as a Ray Train run on a gs:// run root: its worker (a Ray process, given the emulator's address
    as a node would be) writes checkpoints (through pyarrow) and the subset (through gcsfs) to the bucket; with the
    subset deleted, the same call resumes from the last checkpoint on the bucket instead of iteration 0."""
    from ptmst_ray.layout import Layout, phase_jobs
    from ptmst_ray.orchestration.phases import run_phases

    cfg = tiny_config(upload_root(prepared_root, gcs.url("run")), phases=[TINY["phases"][0]])
    layout, (job,) = Layout.of(cfg), phase_jobs(cfg, with_baseline=False)
    assert run_phases(cfg, with_baseline=False)["phase0"]["status"] == "done"
    checkpoints = {k.split("/")[3] for k in gcs.keys(f"run/phases/{job.run_name}/checkpoint_") if k.count("/") > 3}
    assert 1 <= len(checkpoints) <= 2, checkpoints  # Train keeps its newest two; the clean-up removed the rest
    assert storage.is_complete(layout.subset("phase0"))

    for key in gcs.keys("run/phases/phase0/subset/"):
        gcs.client().bucket(gcs.bucket).blob(key).delete()
    assert run_phases(cfg, with_baseline=False)["phase0"]["status"] == "done"
    attempts = storage.join(layout.phase("phase0"), "attempts")
    resumed = [storage.read_json(storage.join(attempts, a)).get("resumed_from") for a in storage.listdir(attempts)]
    assert sorted(resumed, key=lambda r: r or 0) == [None, cfg.phases[0].iterations], resumed
