"""Helpers the bench scripts share: the machine line, the command line, /proc readings, RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def machine(load: bool = False) -> str:
    """nproc, CPU model, RAM, torch and Python versions, date (and the load average when asked)."""
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    text = (f"nproc {os.cpu_count()}, CPU \"{cpu}\", RAM {mem_kb / 2**20:.1f} GiB, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")
    if load:
        text += f", load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    return text


def command_line() -> str:
    """The running script's command, as typed from the repository root."""
    return " ".join([".venv/bin/python", "bench/" + Path(sys.argv[0]).name, *map(shlex.quote, sys.argv[1:])])


KEEP = "<!-- written by hand from here on: a benchmark that rewrites this section keeps it -->"
"""A line in a RESULTS.md section: what follows it (the analysis of the figures above it) survives the benchmark
rewriting the section's figures."""


def replace_section(heading: str, body: str, path: Path = RESULTS, intro: str = "") -> None:
    """Put ``heading`` + ``body`` into RESULTS.md, replacing that section if present (others untouched) up to its
    ``KEEP`` line, if it has one; a missing file starts with ``intro``."""
    text = path.read_text() if path.exists() else intro
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(text)
    if found:
        old = found.group(0)
        if KEEP in old:
            block += "\n" + old[old.index(KEEP):].rstrip() + "\n"
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
