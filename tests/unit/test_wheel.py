"""The wheel carries the SQL migrations and py.typed, and the runner finds them there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from msstore import migrations

from .test_extras import CORE, NEVER_CORE, WORKBOOK, split_requirements

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_ships_and_finds_the_migrations(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("msstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(m.filename for m in migrations.load())
    assert sorted(Path(n).name for n in names if n.startswith("msstore/sql/")) == shipped
    assert "msstore/py.typed" in names
    # what `pip install msstore` (no extras) pulls in: the core only, no notebook stack
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip()
                for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    core, extras = split_requirements(requires)
    assert core == CORE and not core & NEVER_CORE
    assert WORKBOOK <= extras["workbook"]

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, msstore.migrations as m; "
             "print(json.dumps([str(m.default_directory())] + "
             "[[x.filename, x.checksum] for x in m.load()]))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    directory, *found = json.loads(out)
    assert Path(directory) == site / "msstore" / "sql"
    assert found == [[m.filename, m.checksum] for m in migrations.load()]
