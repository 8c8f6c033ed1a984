"""``msstore workbook``: one line per notebook and nothing on stderr (no kernel warnings);
without the workbook extra, a message naming it instead of a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()  # type: ignore[no-untyped-call]
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]  # type: ignore[no-untyped-call]
    nbformat.write(nb, path)  # type: ignore[no-untyped-call]


def test_one_line_per_notebook_and_a_quiet_stderr(tmp_path: Path) -> None:
    _notebook(tmp_path / "00_ok.ipynb", "x = 40 + 2", "assert x == 42")
    _notebook(tmp_path / "01_fails.ipynb", "assert 1 == 2, 'the lesson is wrong'")
    out = subprocess.run([sys.executable, "-m", "msstore.cli", "workbook", str(tmp_path),
                          "--timeout", "60"], capture_output=True, text=True, timeout=300,
                         check=False)
    lines = out.stdout.splitlines()
    assert out.returncode == 1 and len(lines) == 3, out.stdout
    assert re.fullmatch(r"00_ok\.ipynb\s+\d+\.\ds  ok", lines[0])
    assert re.fullmatch(r"01_fails\.ipynb\s+\d+\.\ds  FAILED: .*the lesson is wrong.*", lines[1])
    assert lines[2] == "1 passed, 1 failed"
    assert out.stderr == "", out.stderr


def test_without_the_extra_it_names_the_extra() -> None:
    code = ("import sys; sys.modules['nbformat'] = None; from msstore.cli import main; "
            "sys.exit(main(['workbook']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "msstore workbook needs nbformat" in out.stderr
    assert "pip install 'msstore[workbook]'" in out.stderr
