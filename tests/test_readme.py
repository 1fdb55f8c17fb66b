"""The code blocks of README.md and docs/*.md run as written, and so do the examples in the docstrings.

The Markdown blocks run in a scratch copy of a checkout (its files linked, `../shared` beside it), in fresh
processes: the ```python blocks of each file together, in order, then each ```bash block. ```shell blocks need the
network or an install and are not run.
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT, REPO, SHARED, require_shared, run_python

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder that looks like a checkout (the repository's files linked into it) with ../shared beside it."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if not entry.name.startswith(".") and entry.name != "scratch":
            (root / entry.name).symlink_to(entry)
    (tmp_path / "shared").symlink_to(require_shared(SHARED))
    return root


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
@pytest.mark.slow
def test_markdown_code_blocks_run(document: Path, checkout: Path, tmp_path: Path):
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    python = blocks(document, "python")
    if python:
        out = run_python("\n".join(python), cwd=checkout, env_extra=env)
        if document.name == "README.md":
            assert "torch.Size([1, 16])" in out
    for script in blocks(document, "bash"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=checkout,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env},
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
        )
        assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_readme_is_for_users():
    """At most about 300 lines, and no measurements history: design and speed notes live in docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert not re.search(r"\b[0-9a-f]{7}\b(?![0-9a-f])", readme.replace("2510.27688", "")), "a commit hash"


@pytest.mark.parametrize("module", ["modeling_calm", "heads_calm", "generation_calm", "evaluate_calm", "utils_calm"])
def test_docstring_examples_run(module: str):
    found = doctest.testmod(
        importlib.import_module(f"calm_transformers.{module}"), extraglobs={"torch": __import__("torch")}
    )
    assert found.failed == 0
    if module != "utils_calm":
        assert found.attempted > 0
