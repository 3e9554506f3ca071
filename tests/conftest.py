"""Shared fixtures: a tiny pipeline config, one Ray instance per test session, the data-layer fixtures."""

# ---------------------------------------------------------------- pipeline + Ray fixtures
import atexit as _atexit
import logging as _logging
import os as _os
import shutil as _shutil
import tempfile as _tempfile

import pytest

from ptmst_ray.config import Config, from_dict

# this node's cache (storage.cache_root: verified embedding files, copies of remote ones) is the session's own, for
# this process and the Ray workers it starts, never the user's
_os.environ["PTMST_RAY_CACHE"] = _tempfile.mkdtemp(prefix="ptmst-test-cache-")
_atexit.register(_shutil.rmtree, _os.environ["PTMST_RAY_CACHE"], True)

TINY = {
    "data": {"builtin": {"train_images": 60, "test_images": 20, "pretrain_images": 60, "captions_per_image": 2}},
    "model": {"name": "ptmst-toy-vit", "pretrained": "${run.root}/pretrain/clip.safetensors"},
    "pretrain": {"enabled": True, "epochs": 1, "batch_size": 32},
    "experts": {"num_experts": 2, "epochs": 3, "batch_size": 32},
    "phases": [
        {"range_start": 0, "range_end": 2, "start_min": 0, "start_max": 1, "pairs": 6, "iterations": 6, "minibatch": 3},
        {"range_start": 0, "range_end": 3, "start_min": 1, "start_max": 2, "pairs": 8, "iterations": 6, "minibatch": 4},
    ],
    "distill": {"syn_steps": 2, "lr_img": 100.0, "lr_txt": 100.0, "lr_lr": 1e-5, "lr_sim": 1.0, "min_alpha": 0.001,
                "checkpoint_every": 2, "report_every": 1},
    "eval": {"epochs": 2, "seeds": 2, "eval_points": 2, "full_data_epochs": 1, "batch_size": 32},
}


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same state of torch's global random generator: a test that draws without a
    generator of its own gets the same numbers whatever its xdist worker ran before it (the order of modules on a
    worker changes as tests are added: an unseeded draw once failed a float32 comparison that way)."""
    import torch

    torch.manual_seed(0)


def tiny_config(root, **overrides) -> Config:
    """The tiny end-to-end config (seconds per stage) under ``root``, with dotted overrides."""
    import copy

    raw = copy.deepcopy(TINY)
    raw["run"] = {"root": str(root)}
    cfg = from_dict(raw)
    return cfg.replace(**overrides) if overrides else cfg


@pytest.fixture(scope="session")
def ray_session(s3_server, gcs_server):
    """One local Ray per test session: 2 CPUs and 2 logical GPUs (torch sees no CUDA: GPU placement
    is exercised, compute falls back to the CPU). Its workers start with the session S3 server's endpoint
    and credentials, and the GCS emulator's address, in their environment, as a cluster's nodes would have them,
    so that runs on a bucket (fixtures ``s3``, ``gcs``) work on it; the test process itself gets them only from
    those fixtures."""
    import ray

    from ptmst_ray.orchestration.runtime import connect

    _os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    env = {**_s3_env(s3_server), "STORAGE_EMULATOR_HOST": gcs_server}
    saved = {k: _os.environ.get(k) for k in env}
    _os.environ.update(env)
    try:
        info = connect(num_cpus=2, num_gpus=int(_os.environ.get("PTMST_TEST_GPUS", "2")))  # gpu_check.py: real ones
    finally:
        for k, v in saved.items():
            if v is None:
                _os.environ.pop(k, None)
            else:
                _os.environ[k] = v
    yield info
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny BERT saved in Hugging Face's layout (tests/_tiny_models.py), made once per session; read only."""
    from _tiny_models import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert", seed=0)


@pytest.fixture(scope="session")
def nfnet(tmp_path_factory):
    """A timm NFNet-L0 state dict (safetensors, ~130 MB; ~3 CPU-s to make), made once per session; read only."""
    from _tiny_models import save_nfnet_l0

    return save_nfnet_l0(tmp_path_factory.mktemp("nfnet") / "nfnet_l0.safetensors")


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory, ray_session):
    """The tiny config's data, pretrained towers, caption embeddings, 2 experts and their shortcuts, built
    once per test run (a build costs ~40 s of Ray actors and tasks): under pytest-xdist the first worker that
    asks builds it in the run's shared temp dir while the others wait on a file lock, then all read it. Never
    written to: tests take a copy of the parts they need with :func:`copy_root`."""
    import fcntl

    from ptmst_ray import layout
    from ptmst_ray.orchestration.experts import run_experts
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages import embed as embed_stage
    from ptmst_ray.stages import pretrain as pretrain_stage

    base = tmp_path_factory.getbasetemp()
    if _os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's temp dir; each worker's own is a folder in it
    root, built = base / "prepared", base / "prepared.built"
    with open(base / "prepared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            _shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way left it
            cfg = tiny_config(root)
            data_stage.prepare(cfg)
            pretrain_stage.pretrain(cfg)
            embed_stage.embed(cfg)
            out = run_experts(cfg)
            assert out["trained"] == cfg.experts.num_experts
            assert out["shortcuts_written"] == cfg.experts.num_experts * len(layout.needed_ranges(cfg))
            built.write_text("")
    return root


def copy_root(src, dst, parts=("data", "pretrain", "experts", "shortcuts")):
    """``dst`` with a copy of ``parts`` of the run root ``src`` (a prepared root stays untouched)."""
    import shutil

    for part in parts:
        shutil.copytree(_os.path.join(src, part), _os.path.join(dst, part))
    return dst


def finished_tasks(address: str, func_name: str, count: int, since_ms: float = 0.0, timeout: float = 30.0) -> list:
    """The FINISHED tasks of ``func_name`` that started at or after ``since_ms`` (epoch ms), by Ray's State API at
    ``address``, waiting up to ``timeout`` s for ``count`` of them: workers report task events to the GCS in
    batches, so the State API lags the tasks (one can show FINISHED before its start time: not counted until it
    has one). Sorted by start time."""
    import time

    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout
    while True:
        tasks = [t for t in list_tasks(address=address, detail=True, filters=[("func_or_class_name", "=", func_name)])
                 if t.state == "FINISHED" and (t.start_time_ms or -1) >= since_ms]
        if len(tasks) >= count or time.monotonic() >= deadline:
            return sorted(tasks, key=lambda t: t.start_time_ms)
        time.sleep(1)



# ---------------------------------------------------------------- data layer fixtures (tests/test_data*.py)
import io as _data_io
import json as _data_json
from pathlib import Path as _DataPath

import pytest as _data_pytest

FLICKR_DIR = _DataPath(__file__).resolve().parents[2] / "shared" / "data" / "flickr30k"
"""Real Flickr30k annotation files (read-only; copied before use), beside the clone as CI has them."""


def require_flickr30k() -> str:
    """FLICKR_DIR as a string, or skip the test saying where the real annotations were looked for."""
    if not (FLICKR_DIR / "flickr30k_test.json").exists():
        _data_pytest.skip(f"the real Flickr30k annotations are not at {FLICKR_DIR} (../shared/data/flickr30k "
                          "beside the repository)")
    return str(FLICKR_DIR)


@_data_pytest.fixture
def flickr30k() -> str:
    """The folder of the real Flickr30k test/val annotation files (skips when it is absent)."""
    return require_flickr30k()


def _solid_png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = _data_io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


@_data_pytest.fixture
def tiny_flickr_dir(tmp_path: _DataPath) -> _DataPath:
    """A Flickr30k-layout folder: the first 12 test/val rows of the real annotations, a train file
    built from them (one row per caption), and tiny solid placeholder PNGs for every listed image."""
    require_flickr30k()
    out = tmp_path / "flickr"
    out.mkdir()
    train = []
    for split in ("test", "val"):
        rows = _data_json.loads((FLICKR_DIR / f"flickr30k_{split}.json").read_text())[:12]
        (out / f"flickr30k_{split}.json").write_text(_data_json.dumps(rows))
        for k, r in enumerate(rows):
            img = out / r["image"]
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(_solid_png((20 * k % 256, 100, 200 - 10 * k)))
            if split == "val":
                train.extend({"image": r["image"], "caption": c, "image_id": str(k)} for c in r["caption"])
    (out / "flickr30k_train.json").write_text(_data_json.dumps(train))
    return out
# ---------------------------------------------------------------- end of data layer fixtures


# ---------------------------------------------------------------- S3 (tests/test_s3.py): a real S3 API on loopback
import dataclasses as _s3_dc
import uuid as _s3_uuid

S3_KEY, S3_SECRET = "ptmst-test-key", "ptmst-test-secret-value-0123456789"
"""The credentials the moto server accepts (it accepts any until auth is switched on, see ``s3_auth``)."""


@_s3_dc.dataclass
class S3Bucket:
    endpoint: str
    bucket: str
    env: dict

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self, **kw):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1", **kw)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server mode on 127.0.0.1 (a free port), for the whole session; stopped afterwards."""
    from moto.server import ThreadedMotoServer

    from ptmst_ray.cluster.local import free_ports

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    # werkzeug logs each request at INFO (thousands a session, each rendered by the CLI's log handler in the tests that
    # run it in this process): warnings and errors only
    _logging.getLogger("werkzeug").setLevel(_logging.WARNING)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS_* variables that point s3fs and pyarrow at the session's S3 server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}


def upload_root(src, url: str, parts=("data", "pretrain", "experts", "shortcuts")) -> str:
    """``url`` (a bucket prefix) holding a copy of ``parts`` of the local run root ``src``, as :func:`copy_root`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    for part in parts:
        fs.put(_os.path.join(src, part), f"{path}/{part}", recursive=True)
    fs.invalidate_cache()
    return url


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Bucket:
    """A fresh bucket on the session's S3 server, and the standard AWS_* variables pointing at it (read by
    s3fs and pyarrow alike, and inherited by the processes a test starts)."""
    import s3fs

    env = _s3_env(s3_server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    b = S3Bucket(s3_server, f"ptmst-{_s3_uuid.uuid4().hex[:10]}", env)
    b.client().create_bucket(Bucket=b.bucket)
    yield b
    s3fs.S3FileSystem.clear_instance_cache()
# ---------------------------------------------------------------- end of S3 fixtures


# ---------------------------------------------------------------- GCS (tests/test_gcs.py): a GCS JSON API on loopback
# For this process and the Ray workers it starts, set before gcsfs and google.auth are imported: gcsfs (2026.x) first
# asks Google's gRPC API for each new bucket's type, and waits 60 s for an emulator that has none; Google's
# credential search asks a GCE metadata server, absent here, with retries (no credentials: anonymous, as an
# emulator takes)
_os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
_os.environ["NO_GCE_CHECK"] = "true"


@_s3_dc.dataclass
class GcsBucket:
    endpoint: str
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def client(self):
        """Google's own client (not gcsfs, not pyarrow): the independent view of the bucket."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs_storage

        return gcs_storage.Client(project="ptmst-test", credentials=AnonymousCredentials(),
                                  client_options={"api_endpoint": self.endpoint})

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client().list_blobs(self.bucket, prefix=prefix))

    def put(self, key: str, data: bytes) -> None:
        self.client().bucket(self.bucket).blob(key).upload_from_string(data)


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator (GCS's JSON API, in memory) on 127.0.0.1 (a free port), for the whole session."""
    import http.server
    import types

    import gcp_storage_emulator.server as emulator

    class Backlogged(http.server.HTTPServer):
        request_queue_size = 256  # it serves one request at a time; gcsfs opens many at once, and past the
        # default backlog of 5 the rest were reset and retried with back-off (uploading a run root: 110 s, not 0.2)

    emulator.server = types.SimpleNamespace(HTTPServer=Backlogged)  # what its server thread builds
    from ptmst_ray.cluster.local import free_ports

    (port,) = free_ports(1)
    _logging.getLogger("gcp_storage_emulator").setLevel(_logging.WARNING)
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch) -> GcsBucket:
    """A fresh bucket on the session's GCS emulator, and STORAGE_EMULATOR_HOST pointing at it (read by gcsfs and
    Google's clients; the run's Train storage points pyarrow at it explicitly)."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    gcsfs.GCSFileSystem.clear_instance_cache()
    b = GcsBucket(gcs_server, f"ptmst-{_s3_uuid.uuid4().hex[:10]}")
    b.client().create_bucket(b.bucket)
    yield b
    gcsfs.GCSFileSystem.clear_instance_cache()
# ---------------------------------------------------------------- end of GCS fixtures


# ---------------------------------------------------------------- order for `make test` (pytest-xdist)

FIRST = ("test_paper_recipes.py", "test_launch.py", "test_faults.py", "test_sweep.py", "test_dashboard.py",
         "test_autoscale.py", "test_pipeline.py", "test_gpu_check.py", "test_pretrain_protocol.py")
"""The modules holding the suite's multi-minute end-to-end runs, longest first (bench/RESULTS.md "Test suite").
`make test` runs the suite on two pytest-xdist workers that take whole modules (``--dist loadfile``: a module's
fixtures, e.g. the dashboard's run, are built once), each the next module in collection order when it is free:
starting the long modules first keeps one worker from ending with a long module while the other idles. xdist
keeps this order only with ``--no-loadscope-reorder`` (3.8+): by default (since 3.5) it hands out the modules with
the most tests first, i.e. these last (replayed with measured test times: one worker idle ~4 minutes at the end)."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep pytest's order
