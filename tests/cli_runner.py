"""Running the CLI in-process through its error edge (``main``), as the console script does."""

from __future__ import annotations

import sys

import pytest

from grefine_curate.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``grefine-curate ARGS``."""
    old = sys.argv
    sys.argv = ["grefine-curate", *args]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err
