"""The documented commands stay true: every `ptmst-ray` command line in the README's code blocks names a command
and options the CLI has, its config files exist and its `--set` overrides load; every benchmark command in
docs/benchmarks.md parses with its script's own arguments; the two commands are the Makefile's targets and CI calls
the test command."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ptmst_ray.config import CONFIG_DIR, load_config
from ptmst_ray_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.S | re.M)


def command_lines(block: str, program: str) -> list[str]:
    """The commands of a shell block that start with ``program``: continuation lines joined, `;` split,
    trailing comments dropped."""
    out = []
    for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
        for part in line.split(";"):
            part = re.sub(r"\s#.*", "", part).strip()
            if part.startswith(program):
                out.append(part)
    return out


COMMANDS = [c for b in code_blocks(README) for c in command_lines(b, ".venv/bin/ptmst-ray")]
BENCH = [c for b in code_blocks((ROOT / "docs" / "benchmarks.md").read_text())
         for c in command_lines(b, ".venv/bin/python bench/")]


def options(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]


def test_the_readme_has_commands_to_check():
    # the parser above finds the command blocks (a README rewritten so that it finds none would pass the others)
    assert len(COMMANDS) >= 15 and any(c.split()[1:2] == ["launch"] for c in COMMANDS), COMMANDS
    assert len(BENCH) >= 20 and any("bench_quality.py" in c for c in BENCH), BENCH
    assert command_lines("x \\\n  --y; .venv/bin/ptmst-ray a \\\n --b c  # d\n", ".venv/bin/ptmst-ray") == \
        [".venv/bin/ptmst-ray a --b c"]


@pytest.mark.parametrize("line", COMMANDS)
def test_a_readme_command_is_one_the_cli_accepts(line):
    """Its command and options exist (click reads every option before it acts on --help, so an unknown one fails),
    its config file exists and its overrides load on that config."""
    args = shlex.split(line)[1:]
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    configs = options(args, "--config")
    for path in configs:
        assert (ROOT / path).is_file(), path
    sets = options(args, "--set")
    if sets or configs:
        load_config(ROOT / configs[0] if configs else CONFIG_DIR / "toy.yaml", sets)


class Parsed(Exception):
    """Raised instead of running a benchmark once its command line has parsed."""


@pytest.mark.parametrize("line", BENCH)
def test_a_documented_benchmark_command_parses(line, monkeypatch):
    """The script exists and its own argparse parser takes the documented arguments (an unknown option or a bad
    value exits 2); the script stops right after parsing, nothing is run."""
    def parse_only(parser, args=None, namespace=None):
        ns, extra = parser.parse_known_args(args, namespace)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        raise Parsed(ns)

    args = shlex.split(line)[1:]
    assert (ROOT / args[0]).is_file(), args[0]
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.chdir(ROOT)
    with pytest.raises(Parsed):
        runpy.run_path(str(ROOT / args[0]), run_name="__main__")


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_command():
    first = code_blocks(README[README.index("## The two commands"):])[0]
    commands = [re.sub(r"\s#.*", "", line).strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"demo", "test"} <= targets
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"], ci
