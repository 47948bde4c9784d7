"""Runs the README's example blocks exactly as written."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
  r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", re.DOTALL
)


def test_readme_has_examples():
  assert _BLOCK.findall(README.read_text())


def test_readme_examples_run():
  for code in _BLOCK.findall(README.read_text()):
    out = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=README.parent,
      timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
