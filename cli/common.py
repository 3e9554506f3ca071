"""Shared CLI plumbing: logging set-up, config loading with exit code 2, and progress display."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ptmst_ray.config import DEFAULT_CONFIG, Config, ConfigError, find_config, load_config, shipped_configs

LOG_WIDTH = 160
"""Console width when stderr is not a terminal (a log file, CI): tables stay whole instead of being
squeezed into rich's default 80 columns (which cut method names to "ptm_…"). COLUMNS overrides it."""
console = Console(stderr=True, markup=False,
                  width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else LOG_WIDTH)
"""Rich markup is off: messages carry paths, `--set` values, commands and captions whose ``[brackets]`` rich would
take for tags and drop (``eval.baselines=[rnd]`` printed as ``eval.baselines=``). Styled words go through
:func:`say` and :func:`bold`."""

ConfigOpt = typer.Option(None, "--config", "-c", metavar="FILE",
                         help="YAML config: a path, an fsspec URL, or a shipped recipe's name (scenes, flickr30k_500, ...); "
                              "default: configs/toy.yaml, the laptop default.")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a field: section.field=value (repeatable), e.g. distill.syn_steps=4.")


OWN_LOGGERS = ("ptmst_ray", "ptmst_ray_cli")


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once, at the CLI entry point: this project's INFO lines, other libraries' warnings only
    (open_clip logs its tokenizer lookups at INFO on the root logger); ``--verbose``: everything at DEBUG but
    the chattiest libraries."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for ours in OWN_LOGGERS:
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def say(label: str, style: str, message: str) -> None:
    """``label: message`` with the label styled and the message printed as it is."""
    console.print(Text.assemble((f"{label}:", style), " ", message))


def bold(text: str) -> Text:
    return Text(text, style="bold")


def fail(message: str, code: int = 2) -> None:
    say("error", "bold red", message)
    raise typer.Exit(code)


def get_config(config: Optional[str], overrides: Optional[list[str]]) -> Config:
    """Load and validate, or exit 2 with the file and field path."""
    path = find_config(config) if config is not None else str(DEFAULT_CONFIG)
    if not os.path.exists(path) and "://" not in path:
        fail(f"{config}: config file not found (a shipped recipe by name: {', '.join(shipped_configs())})")
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        fail(str(e))
    raise AssertionError("unreachable")


def get_run_config(config: Optional[str], overrides: Optional[list[str]], address: Optional[str] = None,
                   joins_ray: bool = False, data_only: bool = False) -> Config:
    """:func:`get_config`, then everything the recipe needs (inputs exist, the model can be built as
    configured, the run root is writable; for a command that ``joins_ray``, a Ray address given by --address,
    run.address or RAY_ADDRESS answers), or exit 2 naming the field. ``data_only``: what the data commands
    need (the data's inputs, the run root), not the weights or the model.

    Called before Ray starts, so a bad recipe launches nothing.
    """
    cfg = get_config(config, overrides)
    preflight(cfg, config, address, joins_ray, data_only)
    return cfg


def preflight(cfg: Config, config: Optional[str], address: Optional[str] = None, joins_ray: bool = False,
              data_only: bool = False) -> None:
    """:func:`ptmst_ray.stages.preflight.check`, warnings printed, a problem exits 2 naming the field."""
    from ptmst_ray.orchestration.runtime import address_problem, is_cluster_address
    from ptmst_ray.stages.preflight import check

    try:
        check(cfg, warn=lambda message: say("warning", "bold yellow", message), data_only=data_only,
              shared_inputs=is_cluster_address(address or cfg.run.address or os.environ.get("RAY_ADDRESS")))
    except ConfigError as e:
        fail(f"{config or DEFAULT_CONFIG}: {e}")
    given = [(name, value) for name, value in (("--address", address), ("run.address", cfg.run.address),
                                               ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))) if value]
    if joins_ray and given:  # the one connect() will use: before any work (eval and experts prepare data first)
        name, value = given[0]
        problem = address_problem(value)
        if problem:
            fail(f"{name} {value}: cannot join a Ray cluster there: {problem}")


def refuse_held_root(cfg: Config) -> None:
    """Exit 2 naming the command that holds the run root's lease, if one does (for commands that leave the lease to
    a driver they start: `run --as-job`, `launch`). A lease this machine cannot read is left to that driver."""
    from ptmst_ray.lease import live_holder, refusal
    from ptmst_ray.storage import StorageError

    try:
        holder = live_holder(cfg.run.root)
    except (OSError, StorageError) as e:
        logging.getLogger(__name__).debug("run root's lease not read (%s); the job's driver checks it", e)
        return
    if holder:
        fail(str(refusal(cfg.run.root, holder)))


@contextlib.contextmanager
def root_lease(cfg: Config, command: str) -> Iterator[None]:
    """Hold the run root's lease (:mod:`ptmst_ray.lease`) for the block, or exit 2 naming the command that holds
    it: one command at a time writes under a run root."""
    from ptmst_ray.lease import RootInUse, RootLease
    from ptmst_ray.storage import StorageError

    lease = RootLease(cfg.run.root, f"ptmst-ray {command}")
    try:
        lease.acquire()
    except RootInUse as e:
        fail(str(e))
    except (OSError, StorageError) as e:
        fail(f"run.root: cannot write the lease {lease.url}: {e}", code=1)
    try:
        yield
    finally:
        lease.release()


INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def interrupted(message: str = "finished work is kept (data, experts, phase checkpoints and subsets); run the same "
                               "command again to resume") -> None:
    """Ctrl-C: stop the local Ray this process started, say what is kept (``message``), exit 130."""
    import ray

    say("interrupted", "bold yellow", message)
    if ray.is_initialized():
        ray.shutdown()
    raise typer.Exit(INTERRUPTED)


@contextlib.contextmanager
def progress_bars() -> Iterator[Progress]:
    """A rich progress display on stderr (disabled when stderr is not a terminal: plain log lines instead)."""
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        TimeElapsedColumn(), console=console, disable=not sys.stderr.isatty(), transient=False,
    )
    with progress:
        yield progress


class RichUI:
    """Stage headers and one progress bar per task reported to the progress board."""

    def __init__(self, progress):
        self.progress, self.tasks = progress, {}
        self._last: dict[str, tuple] = {}

    def stage(self, name: str) -> None:
        console.rule(bold(name))

    def update(self, tasks: dict[str, dict]) -> None:
        for name, t in sorted(tasks.items()):
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=t["total"] or 1, info="")
            self.progress.update(self.tasks[name], completed=t["done"], total=t["total"] or 1, info=t["info"])
        if not self.progress.disable:
            return
        for name, t in sorted(tasks.items()):  # no terminal: plain lines when something changed
            key = (t["done"], t["info"])
            if self._last.get(name) != key:
                self._last[name] = key
                console.print(f"{name}: {t['done']:.0f}/{t['total']:.0f} {t['info']}", highlight=False)


MODEL_STACK = "ptmst_ray.models.towers"
"""torch, open_clip and transformers: what a driver that builds, trains or scores a model imports first."""


def import_in_background(module: str) -> threading.Thread:
    """Import ``module`` on a daemon thread. Started as Ray starts: a local start is mostly this process waiting
    for the processes it started, so the import takes those seconds instead of its own (bench/RESULTS.md "Driver
    start-up"). An import that fails here is left to fail again, with its traceback, where the module is used."""

    def work() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - raised again by the import that needs the module
            logging.getLogger(__name__).debug("background import of %s failed", module, exc_info=True)

    thread = threading.Thread(target=work, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def connect_ray(cfg, address: Optional[str], models: bool = True):
    """Start or join Ray (``--address``, else run.address / RAY_ADDRESS, else a local Ray) and say what it has.
    ``models``: the command goes on to build models, so their libraries are imported while Ray starts. From here
    a Ctrl-C reaches the command's next progress poll even where a Ray call swallows the KeyboardInterrupt
    (``install_interrupt_handler``); the command turns it into :func:`interrupted`."""
    from ptmst_ray.orchestration.runtime import connect, install_interrupt_handler

    from ptmst_ray_cli.dashboard_cmd import LOCAL_JOB, login_hint

    preload = import_in_background(MODEL_STACK) if models else None
    info = connect(address or cfg.run.address)
    if preload is not None:
        preload.join()  # the models are imported before any work starts
    console.print(f"Ray: {info.cpus:.0f} CPUs, {info.gpus:.0f} GPUs, {info.nodes} node(s); run root {cfg.run.root}")
    if info.dashboard_url:
        joined = (address or cfg.run.address or os.environ.get("RAY_ADDRESS")) and not os.environ.get(LOCAL_JOB)
        where = " (on the head: reach it with `ray dashboard CLUSTER_YAML`)" if joined else ""
        console.print(f"dashboard: {info.dashboard_url}{where}; {login_hint()}", highlight=False)
    install_interrupt_handler()
    return info


def library_errors():
    """The errors a command turns into one line and exit code 1 (finished work is kept)."""
    from ptmst_ray.config import ConfigError
    from ptmst_ray.data.annotations import DataError
    from ptmst_ray.models.towers import ModelError
    from ptmst_ray.layout import StageError
    from ptmst_ray.orchestration.pipeline import PipelineError
    from ptmst_ray.orchestration.runtime import LocalRayError
    from ptmst_ray.storage import StorageError

    return (ConfigError, DataError, LocalRayError, ModelError, PipelineError, StageError, StorageError, OSError)


def explain(cfg, error: BaseException) -> str:
    """The one-line message for a library error, with the `--rebuild` hint where one applies."""
    from ptmst_ray import layout

    return layout.explain(cfg, error)
