"""The documentation's code runs: the ```python blocks of the README and of the docs pages
that opt in with the MyST comment line ``% test: run the python blocks``.

Each such page's ``python`` blocks run in order, as one script, in a fresh process inside
an empty directory (see the conventions on docs/index.md). Pages without the marker show
fragments, or include their programs from examples/, which other tests run. Also: the
README's test command is the one CI runs, and the options page lists every option of the manager.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt.options import OPTION_NAMES

ROOT = Path(__file__).resolve().parents[1]
MARKER = "% test: run the python blocks"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest"


def pages() -> list:
    found = [p for p in sorted((ROOT / "docs").rglob("*.md")) if "_build" not in p.parts]
    marked = [p for p in found if MARKER in p.read_text().splitlines()]
    return [ROOT / "README.md", *marked]


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
    assert all(blocks(page) for page in pages()), "a page marked to run has no ```python block"
    assert len(pages()) >= 3, "the tutorial and the retention page run their code"


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
