"""``lmforge ARGS`` run by ``lmforge.cli.main`` inside the test's process, its output captured: for commands refused
before they do any work, where a new interpreter (which imports torch, about a second) costs more than the check.
The exit status, the lines and the code path are the command's own; commands that run use a real subprocess."""

from __future__ import annotations

import io
import subprocess
from contextlib import redirect_stderr, redirect_stdout

from lmforge.cli import main


def refused(*args) -> subprocess.CompletedProcess:
    """The result of ``lmforge ARGS`` run in this process (as ``subprocess.run(..., capture_output=True)`` gives)."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["lmforge", *argv], code, out.getvalue(), err.getvalue())
