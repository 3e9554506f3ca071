"""The wheel pyproject.toml describes holds the whole library and its shipped recipes, building it raises no
warning, and the commands that need no clone work from it.

`make` installs the project editable, where every module is read from the clone whatever pyproject.toml lists;
a wheel (`pip install .`, a cluster image) holds only what it lists. The wheel is built from a copy of the files
it is made of, by setuptools' own backend in a subprocess (no network: the installed setuptools), so a warning
of the backend (a deprecated field becomes an error on setuptools' stated date) reaches its stderr. A pure-Python
wheel installed is its files unpacked: the checks run it from an unpacked copy put first on PYTHONPATH, in a
folder outside the clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"ptmst_ray": "ptmst_ray", "cli": "ptmst_ray_cli", "configs": "ptmst_ray/configs"}
"""The folders the wheel is made of, and the name each installs as."""


def _tracked(folder: str) -> list[Path]:
    """The folder's files as a clone has them (no __pycache__, nothing untracked); outside a git checkout,
    every file but compiled ones."""
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / line for line in out.stdout.splitlines()]
    return [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_wheel_holds_every_module_and_model_config_and_builds_without_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    expected = set()
    for folder, installed in SOURCES.items():
        for path in _tracked(folder):
            rel = path.relative_to(ROOT)
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, src / rel)
            expected.add("/".join((installed, *rel.parts[1:])))
    assert {p for p in expected if p.endswith(".json")}, "the model configs were not found in the clone"
    assert "ptmst_ray/configs/scenes.yaml" in expected, "the shipped recipes were not found in the clone"

    out = tmp_path / "dist"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))", str(out)],
        cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]

    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if ".dist-info/" not in n}
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert names == expected, {"missing": sorted(expected - names), "extra": sorted(names - expected)}
    assert "License-Expression: Apache-2.0" in metadata.splitlines()

    # installed: the library and the shipped recipes come from the wheel, not the clone
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env["PYTHONPATH"] = str(site)
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    probe = run("-c", "import ptmst_ray.config as c; cfg = c.load_config(); alt = c.load_config('scenes'); "
                      "print(c.__file__, c.CONFIG_DIR, cfg.data.builtin.kind, alt.data.builtin.kind, sep=' ')")
    assert probe.returncode == 0, probe.stderr[-3000:]
    module, config_dir, toy_kind, scenes_kind = probe.stdout.split()
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "ptmst_ray" / "configs", probe.stdout
    assert (toy_kind, scenes_kind) == ("shapes", "scenes"), probe.stdout
    show = run("-m", "ptmst_ray_cli", "config", "show", "flickr30k_500")
    assert show.returncode == 0 and "dataset: flickr30k" in show.stdout, show.stdout[-2000:] + show.stderr[-2000:]
    missing = run("-m", "ptmst_ray_cli", "config", "show", "flickr30k_5000")
    said = missing.stdout + missing.stderr
    assert missing.returncode == 2 and "flickr30k_5000: config file not found" in said, said
    assert "scenes" in said, said  # the shipped recipes are named
    # a launch uploads the project folder: from a wheel it refuses, before any step
    launch = run("-m", "ptmst_ray_cli", "launch", "--address", "127.0.0.1:9", "--dry-run")
    said = " ".join((launch.stdout + launch.stderr).split())  # the console wraps long lines
    assert launch.returncode == 2 and "clone the repository" in said and "Traceback" not in said, said
