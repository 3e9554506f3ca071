"""`ptmst-ray`: the Typer app. Thin: parse, load the config, call the library, show progress."""

from __future__ import annotations

from typing import Optional

import typer

from ptmst_ray_cli.common import SetOpt, console, get_config, get_run_config, setup_logging

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


@config_app.command("show")
def config_show(config: Optional[str] = typer.Argument(
                    None, metavar="FILE", help="YAML config, URL or shipped recipe's name (default: configs/toy.yaml)."),
                set_: Optional[list[str]] = SetOpt) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    cfg = get_config(config, set_)
    typer.echo(cfg.to_yaml())


@config_app.command("validate")
def config_validate(config: str = typer.Argument(..., metavar="FILE", help="YAML config, URL or shipped recipe's name."),
                    set_: Optional[list[str]] = SetOpt) -> None:
    """Exit 0 if the config is valid and everything it needs is there; otherwise name the file and field, exit 2.

    What is checked: the fields, the input paths, the weights (of the right shapes), the packages, a writable run
    root."""
    get_run_config(config, set_)
    console.print(f"{config}: ok")


def _register() -> None:
    """Stage commands live in their own modules; importing them adds them to `app`."""
    from ptmst_ray_cli import cluster_cmds, commands, dashboard_cmd, sweep_cmd  # noqa: F401

    cluster_cmds.register(app)
    dashboard_cmd.register(app)
    sweep_cmd.register(app)


_register()
