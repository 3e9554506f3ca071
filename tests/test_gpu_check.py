"""bench/gpu_check.py, the one command the first GPU runs, in its CPU fallback (issue #20 item 6): the
paper-scale cases at toy size on the CPU, and its RESULTS.md section written where it is told."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytestmark = pytest.mark.slow


def test_gpu_check_cpu_fallback_writes_its_section(tmp_path, monkeypatch):
    import functools

    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    # the smoke figures are checked for their form only: no warm-up call before each measured one, and no BERT-base
    # folder (the student builds its image tower alone and reads caption embeddings: the folder is never read)
    monkeypatch.setattr(gpu_check.paper, "child", functools.partial(gpu_check.paper.child, warmup=False))
    monkeypatch.setattr(gpu_check.paper, "_bert", lambda tmp: str(tmp / "unused-bert"))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other section\n\nkept\n")
    with pytest.raises(SystemExit, match="torch sees no CUDA"):
        gpu_check.main(["--device", "cuda"]) if not gpu_check.default_device() == "cuda" else pytest.skip("has CUDA")
    body = gpu_check.main(["--device", "cpu", "--smoke", "--no-tests", "--results", str(results)])
    text = results.read_text()
    assert "## Other section\n\nkept" in text and "## GPU check on cpu (smoke)" in text and body.strip() in text
    rows = re.findall(r"^\| (expert step \(batch 8\)|matching, first_order|matching, exact) \| 32 \|.*$", text, re.M)
    assert rows == ["expert step (batch 8)", "matching, first_order", "matching, exact"]
    # the graph and vector sizes: the NFNet-L0 student's parameter vector is ~35M floats (> 100 MiB)
    vector = re.search(r"(\d+) / (\d+) = ([\d.]+) \|", text)
    assert vector and int(vector.group(2)) > 100
    assert re.search(r"N = 2, 32 px: exact / first_order time [\d.]+ \(CPU time [\d.]+\), memory [\d.]+ \(exact holds \d+ w_i\)", text)
