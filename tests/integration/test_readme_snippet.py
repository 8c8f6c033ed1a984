"""The README's package snippet runs unedited, as a newcomer would paste it into a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from msstore import services

README = Path(__file__).resolve().parents[2] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_snippet_is_a_complete_script(tmp_path: Path, database_url: str,
                                                 endpoints: services.Endpoints) -> None:
    (snippet,) = python_snippets()  # one package snippet: the one this test keeps runnable
    assert "asyncio.run(main())" in snippet and "uuid.uuid4()" in snippet
    script = tmp_path / "example.py"
    script.write_text(snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSSTORE_")}
    env |= {services.DATABASE_URL_ENV: database_url, services.NATS_URL_ENV: endpoints.nats_url}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"revision \d+: \{'step': 3\}\nlifecycle: 1 row\(s\) in PostgreSQL\n"
                        r"\{'status': 'pending'\}\nsummarise \{'doc': 17\}: done on attempt 1\n",
                        out.stdout), \
        out.stdout
