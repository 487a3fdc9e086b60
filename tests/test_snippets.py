"""The README's and docs' snippets marked `<!-- snippet: run -->` run as written (the cheap ones).

Python blocks run in a fresh interpreter, shell blocks in bash with this environment's `reformer` on the
PATH, each in an empty directory that holds a small `novel.txt`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- snippet: run -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", re.S)
NOVEL = ("On an exceptionally hot evening early in July a young man came out of the garret in which he lodged "
         "in S. Place and walked slowly, as though in hesitation, towards K. bridge.\n" * 200)


def snippets() -> list[tuple[str, str, str]]:
    """(where, language, code) of every marked block."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1), match.group(2)))
    return found


def test_the_marked_snippets_are_found():
    found = snippets()
    assert {lang for _, lang, _ in found} == {"python", "bash"}
    assert len(found) == sum(path.read_text().count(MARK) for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    assert (ROOT / "README.md").read_text().count(MARK) >= 2  # the command line and the Python API


@pytest.mark.parametrize("where, language, code", snippets(), ids=[w for w, _, _ in snippets()])
def test_snippet_runs_as_written(tmp_path, where, language, code):
    (tmp_path / "novel.txt").write_text(NOVEL)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-c", code]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
