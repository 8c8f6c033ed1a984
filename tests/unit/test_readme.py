"""The README renders and stays inside the repository: every table has its delimiter row,
every relative link names a file that exists (a clone, a forge and the wheel's description
all show the same README)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DELIMITER = re.compile(r"\|(\s*:?-{3,}:?\s*\|)+")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside ``` code fences."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def tables(text: str) -> list[tuple[int, list[str]]]:
    """Each markdown table: (first line number, its lines)."""
    found: list[tuple[int, list[str]]] = []
    previous = -2
    for number, line in _outside_fences(text):
        if line.startswith("|"):
            if number == previous + 1:
                found[-1][1].append(line)
            else:
                found.append((number, [line]))
            previous = number
    return found


def test_every_table_has_a_delimiter_row_and_even_columns() -> None:
    found = tables(README.read_text())
    assert len(found) >= 5  # the value mapping, keys, map, performance, state folder
    for number, lines in found:
        assert len(lines) >= 2 and DELIMITER.fullmatch(lines[1].strip()), \
            f"README.md:{number}: table without a |---| row under its header"
        columns = lines[0].count("|")
        assert lines[1].count("|") == columns, f"README.md:{number}: delimiter row width"


def test_the_checker_sees_a_missing_delimiter() -> None:
    assert not DELIMITER.fullmatch("| a | b |")
    (number, lines), = tables("text\n\n| a | b |\n| 1 | 2 |\n")
    assert number == 3 and not DELIMITER.fullmatch(lines[1])


def test_every_relative_link_resolves_inside_the_repository() -> None:
    links = [m.group(1) or m.group(2) for _, line in _outside_fences(README.read_text())
             for m in LINK.finditer(line)]
    assert links, "no links found: the pattern is broken"
    for target in links:
        if re.match(r"[a-z]+://|mailto:", target) or target.startswith("#"):
            continue
        path = (ROOT / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{target} points outside the repository"
        assert path.exists(), f"{target} does not exist"
