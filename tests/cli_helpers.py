"""What the CLI tests share: run a command in-process, and read the one error line a refused input gives."""
from typer.testing import CliRunner

from c2am_cli.cli import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_error_line(result) -> str:
    """The single `error: ...` line a wrong argument gives: exit 2, nothing else on stderr, no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]
