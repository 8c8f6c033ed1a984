"""The README's Python snippets run unedited, as a newcomer would paste each into a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from msstore import services

README = Path(__file__).resolve().parents[2] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


#: each snippet (found by a name only it uses) and the output it must print, exactly
EXPECTED = {
    "msstore.HybridStateManager": r"revision \d+: \{'step': 3\}\nlifecycle: 1 row\(s\) in "
                                  r"PostgreSQL\n\{'status': 'pending'\}\nsummarise \{'doc': 17\}: "
                                  r"done on attempt 1\n",
    "MsstoreSaver": r"\['plan', 'act'\]: 4 checkpoints, the oldest at step -1\n",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_readme_snippet_is_a_complete_script(name: str, tmp_path: Path, database_url: str,
                                                  endpoints: services.Endpoints) -> None:
    snippets = python_snippets()
    assert len(snippets) == len(EXPECTED)  # a new snippet needs its expected output here
    (snippet,) = [s for s in snippets if name in s]
    assert "asyncio.run(main())" in snippet and "uuid.uuid4()" in snippet
    script = tmp_path / "example.py"
    script.write_text(snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSTORE_")}
    env |= {services.DATABASE_URL_ENV: database_url, services.NATS_URL_ENV: endpoints.nats_url}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(EXPECTED[name], out.stdout), out.stdout
