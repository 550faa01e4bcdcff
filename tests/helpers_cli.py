"""Running galip-run in tests: in-process (CliRunner) with the one-line-error checks, or as a
real process (signals need one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from galip.runtime import cli


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temporary files included) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_fails(folder: Path, *args, match: str | None = None) -> str:
    """Run galip-run; assert exit 2, one stderr line, no traceback, the folder unchanged. Returns the line."""
    before = snapshot(folder)
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert snapshot(folder) == before
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]


def start_run(*args, env: dict | None = None) -> subprocess.Popen:
    """galip-run as a real child process (its own interpreter), stdout/stderr piped as text."""
    command = [sys.executable, "-c", "from galip.runtime.cli import app; app()", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
