"""The README's Python examples run as written.

A reader is meant to use the corruption and model APIs from these examples alone, so
each fenced ```python block is executed in a fresh subprocess (its own interpreter, as a
reader's would be); its assertions are the check.
"""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks() -> list[str]:
    return _BLOCK.findall(README.read_text())


def test_readme_has_the_api_examples():
    blocks = _python_blocks()
    # The corruption example and the model example (issues 2 and 3).
    assert any("uc.umd_loss" in b and "uc.random_masking" in b for b in blocks), "corruption example missing"
    assert any("um.Model" in b and "model.represent" in b for b in blocks), "model example missing"


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = _python_blocks()[index]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
