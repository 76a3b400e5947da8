"""The `c2am` command: a thin typer shell over the library; it parses, calls, and reports.

One module per command group (train, localize, hub, evaluate, wsss); the options they share are in options.py."""
from __future__ import annotations

import sys

import typer

from ..runtime.version import __version__
from ..runtime.exits import EXIT_INTERRUPTED, EXIT_USAGE
from . import evaluate, hub, localize, train, wsss
from .options import report, state

app = typer.Typer(
    name="c2am",
    help="Class-agnostic activation maps (C2AM) learned from unlabeled images: train, localize, refine, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"c2am {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
):
    state["debug"] = debug


for command in (train.train, localize.localize, hub.pull, hub.push):
    app.command()(command)
app.command("eval")(evaluate.eval_)
for command in (evaluate.calibrate, wsss.refine, wsss.cams):
    app.command()(command)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """The console script: click's usage errors (a bad option value, a missing argument) become one line too."""
    import warnings

    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    warnings.formatwarning = _one_line_warning  # library warnings as one line on stderr, like errors
    try:
        code = app(prog_name="c2am", standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as e:  # bare `c2am` / `c2am COMMAND`: the help
        typer.echo(e.format_message(), err=True)
        code = EXIT_USAGE
    except click_errors.UsageError as e:
        command = e.ctx.command_path.partition(" ")[2] if e.ctx else ""
        typer.echo(f"error: {e.format_message()} (see c2am {command + ' ' if command else ''}--help)", err=True)
        code = EXIT_USAGE
    except (getattr(click_errors, "Abort", None) or typer.Abort):  # typer's vendored click may lack click's Abort
        typer.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except Exception as e:  # outside any command's `friendly` (click, typer, a callback): one line all the same
        code = report(e, debug=state["debug"] or "--debug" in sys.argv[1:])
    sys.exit(code or 0)


if __name__ == "__main__":
    sys.exit(main())
