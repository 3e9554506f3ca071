"""Screenshots of the Ray dashboard as a user sees it during a run (not CI): Overview, Jobs, the run's job, Actors.

    .venv/bin/python bench/dashboard_screenshots.py                  # own local Ray + a small toy run
    .venv/bin/python bench/dashboard_screenshots.py --url http://127.0.0.1:8265   # a running dashboard

Without ``--url`` it starts a local Ray the way `ptmst-ray run` does, runs the toy's data, pretraining,
embeddings, experts (actor pool + shortcut actor) and two phases (concurrent Train runs) under a
temporary run root, and takes the screenshots while the second phase pass is running. Headless
Chromium (Debian: ``apt-get install chromium``) loads each page through a loopback proxy that adds
``Authorization: Bearer <token>`` (the token from ~/.ray/auth_token) to every request, as a browser
does once its user has pasted the token into the login dialog. PNGs go to bench/dashboard/.

Ray 2.60's open-source dashboard has no Train page (its client routes are overview, jobs, serve,
cluster, actors, metrics, logs); the Train runs are in the REST API (/api/train/v2/runs/v1) and their
controller and worker actors on the Actors page, so the job page (the run's tasks by name) is taken instead.
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
PAGES = {"overview": "#/overview", "jobs": "#/jobs", "actors": "#/actors"}
TALL = ("actors", "job")
"""Pages shot taller, so more rows of their tables show."""
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}


def proxy(upstream: str, token: str) -> http.server.ThreadingHTTPServer:
    """A loopback HTTP proxy to ``upstream`` that sends the dashboard's token with every request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Authorization"] = f"Bearer {token}"
            req = urllib.request.Request(upstream + self.path, data=body, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status, out, rh = r.status, r.read(), r.headers
            except urllib.error.HTTPError as e:
                status, out, rh = e.code, e.read(), e.headers
            self.send_response(status)
            for k, v in rh.items():
                if k.lower() not in HOP_HEADERS:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium found; install it with `apt-get install -y chromium` (Debian)")


def shoot(base: str, pages: dict[str, str], out: Path, size: str, wait_ms: int) -> list[Path]:
    """One PNG per page of ``pages`` under ``out`` (Chromium headless, new profile each time)."""
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for name, fragment in pages.items():
        if name in TALL:
            w, h = size.split(",")
            size_here = f"{w},{int(h) * 7 // 4}"
        else:
            size_here = size
        png = out / f"{name}.png"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={size_here}",
                            f"--virtual-time-budget={wait_ms}", f"--screenshot={png}", f"{base}/{fragment}"],
                           check=True, capture_output=True, timeout=180)
        shrink(png)
        print(f"{png}: {png.stat().st_size // 1024} KB", flush=True)
        shots.append(png)
    return shots


def shrink(png: Path) -> None:
    """Palette PNG (a dashboard is a few flat colours): a few tens of KB instead of hundreds."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    img.quantize(colors=64).save(png, optimize=True)


def own_run(stop: threading.Event, ready: threading.Event) -> None:
    """The toy's stages on a small config; ``ready`` is set once the experts are done and the phases run."""
    from conftest import tiny_config
    from ptmst_ray.orchestration.experts import run_experts
    from ptmst_ray.orchestration.phases import run_phases
    from ptmst_ray.orchestration.runtime import progress_board
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages import embed as embed_stage
    from ptmst_ray.stages import pretrain as pretrain_stage

    root = tempfile.mkdtemp(prefix="ptmst-dash-")
    cfg = tiny_config(root, **{"phases.0.iterations": 40, "phases.1.iterations": 40, "distill.recall_every": 10})
    board = progress_board()
    print(f"run root {root}: data, pretraining, embeddings", flush=True)
    data_stage.prepare(cfg)
    pretrain_stage.pretrain(cfg)
    embed_stage.embed(cfg)
    print("experts", flush=True)
    run_experts(cfg, board)
    print("phases", flush=True)
    threading.Timer(45, ready.set).start()  # the Train runs are up and reporting by then
    run_phases(cfg, board, with_baseline=False)
    ready.set()
    stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running dashboard (default: start a local Ray and a small run)")
    ap.add_argument("--out", default=str(HERE / "dashboard"), help="folder for the PNGs")
    ap.add_argument("--size", default="1280,800", help="window size, W,H")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time each page gets to load its data")
    ap.add_argument("--job", help="with --url: the job id whose page to shoot too (e.g. 01000000)")
    args = ap.parse_args()
    from ptmst_ray.cluster.jobs import read_auth_token

    stop = threading.Event()
    url, job = args.url, args.job
    if url is None:
        from ptmst_ray.orchestration.runtime import connect

        info = connect(num_cpus=2, num_gpus=0)
        url = info.dashboard_url
        import ray

        job = ray.get_runtime_context().get_job_id()
        ready = threading.Event()
        runner = threading.Thread(target=own_run, args=(stop, ready), daemon=True)
        runner.start()
        ready.wait()
    token = read_auth_token()
    if not token:
        sys.exit("error: no Ray auth token (~/.ray/auth_token); `ptmst-ray token` explains")
    server = proxy(url.rstrip("/"), token)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    print(f"dashboard {url}, through {base}", flush=True)
    t0 = time.time()
    pages = {**PAGES, **({"job": f"#/jobs/{job}"} if job else {})}
    shoot(base, pages, Path(args.out), args.size, args.wait_ms)
    print(f"{len(pages)} screenshots in {time.time() - t0:.0f} s", flush=True)
    server.shutdown()
    stop.set()


if __name__ == "__main__":
    main()
