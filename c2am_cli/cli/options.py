"""What every `c2am` command shares: one-line errors, the common options (declared once), number lists."""
from __future__ import annotations

import errno
import functools
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
Scales = Annotated[Optional[str], typer.Option(
    "--scales", help="Test-time scales, averaged, e.g. '0.5,1,1.5'. Default: stored with the weights "
                     "(refine: 0.5,1,1.5,2; cams: 1).")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="DataLoader worker processes (decode and resize). localize's default: none on a CPU of "
                             "up to 4 cores, where the model uses them all; 2 on bigger CPUs; min(8, cores/2) with a GPU.")]
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
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = f"{e.filename}: " if e.filename else ""
        why = "disk full (No space left on device); free space or move the output, then rerun to resume" if full \
            else f"{e.strerror or e}"
        line = f"{where}{why}"
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
