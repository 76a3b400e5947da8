"""What every `c2am` command shares: one-line errors, the common options (declared once), number lists."""
from __future__ import annotations

import functools
import json
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..runtime.errors import C2AMError
from ..runtime.exits import EXIT_INTERRUPTED, EXIT_USAGE

MAX_PIXELS = 178_956_970  # Pillow's own limit (data.images.DEFAULT_MAX_PIXELS), without importing torch for --help
state = {"debug": False}

Device = Annotated[str, typer.Option("--device", help="Where the model runs: auto, cpu, cuda, cuda:N or mps.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (errors and the summary line still print).")]


@functools.lru_cache(maxsize=1)
def _embedded_model_config() -> dict:
    """The embedded default's model settings from its config.json, read once for all the help texts."""
    from ..hub.registry import DEFAULT_NAME, weights_dir

    return json.loads((weights_dir() / DEFAULT_NAME / "config.json").read_text("utf-8"))["model"]


def stored(key: str, trained=None) -> str:
    """'Default: stored with the weights (X for the embedded default, Y for weights you train)' for a help text:
    X read from the embedded default's config.json (json only, so --help imports no torch), Y from ModelConfig."""
    from ..config import ModelConfig

    def show(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, (list, tuple)):
            return ",".join(show(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    try:
        value = show(_embedded_model_config()[key])
    except Exception:  # a broken installation: the help still prints
        value = "?"
    mine = show(getattr(ModelConfig, key) if trained is None else trained)
    return f"Default: stored with the weights ({value} for the embedded default, {mine} for weights you train)."


def scales_option(default: str):
    """The --scales option with the command's own default said."""
    return Annotated[Optional[str], typer.Option("--scales", help=f"Test-time scales, averaged, e.g. '0.5,1,1.5'. {default}")]


Scales = scales_option(stored("scales"))
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="DataLoader worker processes (decode and resize). Default: none on a CPU of up to 4 "
                             "cores, where the model uses them all; 2 on bigger CPUs; min(8, cores/2) with a GPU.")]
TrainWorkers = Annotated[int, typer.Option(
    "--workers", min=0, help="DataLoader worker processes (decode and augment). Default: 2, whatever the machine: the "
                             "augmentations' random streams depend on the worker count, so a --seed repeats a run "
                             "only with the same --workers.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression bombs).")]
Strict = Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable input.")]


def report(e: Exception, debug: bool = False) -> int:
    """Print an error as one line on stderr (the traceback before it only with --debug) and return exit code 2: a
    C2AMError as it is, a full disk or unwritable folder by its reason, anything else by its type and message."""
    if debug:
        traceback.print_exception(e)
    if isinstance(e, C2AMError):
        line = str(e)
    elif isinstance(e, OSError) and e.errno is not None:  # a full disk, a read-only or vanished folder
        from ..runtime.io import why_not_written

        line = (f"{e.filename}: " if e.filename else "") + why_not_written(e)
    else:  # anything else is a bug or an environment problem: still one line, unless --debug
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        line = f"{type(e).__name__}: {text} (c2am --debug ... shows the traceback)"
    typer.echo(f"error: {line}", err=True)
    return EXIT_USAGE


def friendly(fn):
    """Run a command so that any error becomes one line on stderr and exit code 2 (see `report`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:
            raise typer.Exit(report(e, state["debug"])) from None

    return wrapper


def numbers(text: str | None, cast, option: str, example: str, required: bool = False) -> tuple | None:
    """A comma- or space-separated list of numbers from the command line (None stays None)."""
    if text is None:
        return None
    try:
        values = tuple(cast(t) for t in text.replace(",", " ").split())
    except ValueError:
        values = None
    if values is None or (required and not values):
        raise C2AMError(f"{option} {text!r}: give {example}")
    return values


def floats(text: str | None) -> tuple[float, ...] | None:
    return numbers(text, float, "--scales", "numbers such as '0.5,1,1.5'")


def id_list(path: Optional[Path]) -> list[str] | None:
    if path is None:
        return None
    from ..data.datasets import read_id_list

    try:
        return read_id_list(path)
    except (OSError, UnicodeDecodeError) as e:
        raise C2AMError(f"--ids {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
