"""Storage overhead of a run root on an S3 API: the same `ptmst-ray run` on a local folder and on a bucket.

Why this file exists: issue #21 asks what object storage costs. This script starts moto's S3 server
on 127.0.0.1 (the one tests/test_s3.py uses), runs the tests' tiny config once with its run root in a
local folder and once in a fresh bucket (each `ptmst-ray run` a subprocess with its own local Ray,
reaching the bucket through AWS_ENDPOINT_URL & co.), and writes to bench/RESULTS.md the wall time of
each run, the seconds per stage (results.json's `stages`), and the bytes each stage leaves under the
run root (objects at rest: temporary objects and deleted checkpoints are not counted).

    .venv/bin/python bench/bench_s3.py
    .venv/bin/python bench/bench_s3.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from _common import command_line, machine, replace_section  # noqa: E402

SECTION = "## Storage: a run root on an S3 API"
SETTINGS = {"eval.baselines": [], "eval.seeds": 1}
"""The tests' tiny config (tests/conftest.py TINY), one evaluation seed and no baselines."""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stage_bytes(cfg) -> dict[str, int]:
    """Bytes at rest under each stage's folders (layout.stage_dirs), plus everything else under the root."""
    from ptmst_ray import storage
    from ptmst_ray.layout import stage_dirs
    from ptmst_ray.vocab import STAGES

    fs, root = storage.filesystem(cfg.run.root)
    sizes = {p: int(info.get("size") or 0) for p, info in fs.find(root, detail=True).items()}
    owners = [(storage.filesystem(d)[1].rstrip("/") + "/", stage) for stage in STAGES for d in stage_dirs(cfg, stage)]
    owners.sort(key=lambda o: -len(o[0]))  # the longest prefix owns a file (data/embedded/ is embed's, not data's)
    out = {stage: 0 for stage in STAGES}
    other = "other (config.yaml, ...)"
    out[other] = 0
    for p, size in sizes.items():
        out[next((stage for prefix, stage in owners if p.startswith(prefix)), other)] += size
    return out


def run_once(cfg, env: dict, work: Path, label: str) -> dict:
    config = work / f"{label}.yaml"
    config.write_text(cfg.to_yaml())
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "ptmst_ray_cli", "run", "--config", str(config), "--json"],
                          cwd=work, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: ptmst-ray run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    from ptmst_ray import storage
    from ptmst_ray.layout import Layout

    results = storage.read_json(Layout.of(cfg).results)
    assert all(row["ran"] for row in results["stages"]), results["stages"]  # a fresh root: every stage works
    print(f"{label}: {wall:.0f} s", flush=True)
    return {"wall": wall, "stages": results.get("stages", {}), "bytes": stage_bytes(cfg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per storage (the table shows each)")
    args = ap.parse_args()

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from conftest import tiny_config

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(aws)
    s3fs.S3FileSystem.clear_instance_cache()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
            work = Path(tmp)
            env["PTMST_RAY_CACHE"] = str(work / "cache")
            for i in range(args.repeats):
                local = tiny_config(work / f"local{i}", **SETTINGS)
                rows.append(("local folder", run_once(local, env, work, f"local{i}")))
                bucket = f"bench-{i}-{int(time.time())}"
                boto3.client("s3").create_bucket(Bucket=bucket)
                remote = tiny_config(f"s3://{bucket}/run", **SETTINGS)
                rows.append(("S3 (moto, loopback)", run_once(remote, env, work, f"s3-{i}")))
    finally:
        server.stop()

    stages = list(rows[0][1]["bytes"])
    timed = [row["stage"] for row in rows[0][1]["stages"]]
    lines = [f"Command: `{command_line()}`. Machine: {machine(load=True)}. moto server mode on 127.0.0.1, s3fs "
             f"{s3fs.__version__}, pyarrow {__import__('pyarrow').__version__}. Config: the tests' tiny config "
             "(tests/conftest.py TINY: 60+20 images, 2 experts x 3 epochs, 2 phases of 6 iterations, checkpoints "
             "every 2) with one evaluation seed and no baselines; each run a fresh `ptmst-ray run` subprocess with "
             "its own local Ray (2 cores shared with whatever else runs: see the load average).", "",
             "| storage | wall s | " + " | ".join(f"{s} s" for s in timed) + " |",
             "|---|---:|" + "---:|" * len(timed)]
    for label, r in rows:
        seconds = {row["stage"]: row["seconds"] for row in r["stages"]}
        cells = [f"{seconds.get(s, 0):.1f}" for s in timed]
        lines.append(f"| {label} | {r['wall']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Bytes at rest under the run root per stage (objects on S3, files locally; temporary objects and the "
              "checkpoints Train deleted are not counted):", "",
              "| storage | " + " | ".join(stages) + " | total |", "|---|" + "---:|" * (len(stages) + 1)]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(f"{r['bytes'][s]:,}" for s in stages)
                     + f" | {sum(r['bytes'].values()):,} |")
    local_wall = [r["wall"] for label, r in rows if label.startswith("local")]
    s3_wall = [r["wall"] for label, r in rows if label.startswith("S3")]
    lines += ["", f"Storage overhead: S3 / local wall time = {sum(s3_wall) / sum(local_wall):.2f}x "
                  f"({sum(s3_wall) / len(s3_wall):.0f} s vs {sum(local_wall) / len(local_wall):.0f} s)."]
    replace_section(SECTION, "\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({label: r for label, r in rows}, indent=1, default=str)[:2000])


if __name__ == "__main__":
    main()
