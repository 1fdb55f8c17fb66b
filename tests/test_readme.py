"""The README's Python examples run as written (in a fresh process, in a scratch folder beside ../shared)."""

from __future__ import annotations

import re

from conftest import REPO, SHARED, require_shared, run_python


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_examples_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 2
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(require_shared(SHARED))  # examples refer to ../shared as a checkout does
    out = run_python("\n".join(blocks), cwd=work, env_extra={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "torch.Size([1, 16])" in out
