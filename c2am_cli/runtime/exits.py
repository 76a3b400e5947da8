"""The exit codes of every c2am command, and the summary a batch run returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

EXIT_OK = 0
EXIT_USAGE = 2  # a C2AMError (a bad argument, an unreadable file, wrong weights) or a usage error: one line on stderr
EXIT_SOME_FAILED = 3  # the run finished, but some inputs could not be read (they are listed in its errors file)
EXIT_INTERRUPTED = 130  # Ctrl-C


def exit_code(failed) -> int:
    """EXIT_SOME_FAILED when anything failed, else EXIT_OK."""
    return EXIT_SOME_FAILED if failed else EXIT_OK


@dataclass(kw_only=True)
class RunSummary:
    """What a batch run over many inputs did: its output, how many it processed, and the inputs that failed."""

    out: Path
    processed: int = 0
    failed: list[dict] = field(default_factory=list)  # {"path", "reason", ...}

    @property
    def exit_code(self) -> int:
        return exit_code(self.failed)
