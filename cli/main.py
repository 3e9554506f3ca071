"""`ptmst-ray`: the Typer app. Thin: parse, load the config, call the library, show progress."""

from __future__ import annotations

from typing import Optional

import typer

from ptmst_ray.config import DEFAULT_CONFIG
from ptmst_ray_cli.common import ConfigOpt, SetOpt, console, fail, get_config, get_run_config, setup_logging

app = typer.Typer(
    name="ptmst-ray",
    help="Multimodal dataset distillation with PTM-ST (phased teachers + shortcut trajectories) on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or validate a config.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _print_version(value: bool) -> None:
    """`ptmst-ray --version`: this package's version and those of what it runs on (read from the installed
    packages' metadata: nothing heavy is imported)."""
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{label} {of(name)}" for label, name in
                     (("ray", "ray"), ("torch", "torch"), ("open_clip", "open_clip_torch")))
    typer.echo(f"ptmst-ray {of('ptmst-ray')} ({deps}, python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
         _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the versions of ptmst-ray, Ray, torch, open_clip and Python.")
         ) -> None:
    setup_logging(verbose)


def _one_config(file: Optional[str], option: Optional[str]) -> Optional[str]:
    """The config of `config show|validate`: FILE as an argument or --config as every other command takes it."""
    if file is not None and option is not None and file != option:
        fail(f"two configs given ({file} and --config {option}): give one")
    return file if file is not None else option


@config_app.command("show")
def config_show(config: Optional[str] = typer.Argument(
                    None, metavar="FILE", help="YAML config, URL or shipped recipe's name (default: configs/toy.yaml)."),
                set_: Optional[list[str]] = SetOpt, config_opt: Optional[str] = ConfigOpt) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    cfg = get_config(_one_config(config, config_opt), set_)
    typer.echo(cfg.to_yaml())


@config_app.command("validate")
def config_validate(config: Optional[str] = typer.Argument(
                        None, metavar="FILE", help="YAML config, URL or shipped recipe's name (default: configs/toy.yaml)."),
                    set_: Optional[list[str]] = SetOpt, config_opt: Optional[str] = ConfigOpt) -> None:
    """Exit 0 if the config is valid and everything it needs is there; otherwise name the file and field, exit 2.

    What is checked: the fields, the input paths, the weights (of the right shapes), the packages, a writable run
    root."""
    config = _one_config(config, config_opt)
    get_run_config(config, set_)
    console.print(f"{config or DEFAULT_CONFIG}: ok")


def _register() -> None:
    """Stage commands live in their own modules; importing them adds them to `app`."""
    from ptmst_ray_cli import cluster_cmds, commands, dashboard_cmd, sweep_cmd  # noqa: F401

    cluster_cmds.register(app)
    dashboard_cmd.register(app)
    sweep_cmd.register(app)


_register()
