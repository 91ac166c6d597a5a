"""The documentation's code runs: every ```python block of the README and of docs/.

Each page's ``python`` blocks run in order, as one script, in a fresh process inside an
empty directory (blocks fenced as ``py`` are fragments and are not run; see the
conventions on docs/index.md). Also: the README's test command is the one CI runs, and
the options page lists every option of the manager.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.options import OPTION_NAMES

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest"


def pages() -> list:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if "_build" not in p.parts and FENCE.search(p.read_text())]


def blocks(page: Path) -> list:
    return FENCE.findall(page.read_text())


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks(page)))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{page.name}:\n{done.stdout}\n{done.stderr}"


def test_readme_quickstart_is_run() -> None:
    assert blocks(ROOT / "README.md"), "the README's quickstart must be a ```python block"


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in ci, "the README's test command must be a line of .ci/run, verbatim"


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


def test_options_page_lists_every_option() -> None:
    text = (ROOT / "docs" / "reference" / "options.md").read_text()
    missing = [name for name in OPTION_NAMES if f"`{name}`" not in text]
    assert not missing, f"docs/reference/options.md lacks {missing}"
