"""Enforces the one-way import rules of the style guide (section 2.2)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "alignment"

# Top-level modules each pure subpackage may import.
_PURE_ALLOWED = {
  "jax",
  "jaxlib",
  "numpy",
  "jaxtyping",
  "beartype",
  "typing",
  "typing_extensions",
  "functools",
  "math",
  "dataclasses",
  "collections",
  "enum",
  "itertools",
  "os",
  "warnings",
  "abc",
  "operator",
  "string",
  "re",
}
_PURE = {
  "ops": {"alignment.array_types", "alignment.ops"},
  "losses": {"alignment.array_types", "alignment.ops", "alignment.losses"},
  "advantages": {
    "alignment.array_types",
    "alignment.ops",
    "alignment.advantages",
  },
}


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.lineno, node.module or ""


@pytest.mark.parametrize("subpackage", sorted(_PURE))
def test_pure_subpackages_import_only_arrays(subpackage):
  allowed_internal = _PURE[subpackage]
  bad = []
  for path in sorted((PKG / subpackage).rglob("*.py")):
    for lineno, name in _imports(path):
      top = name.split(".")[0]
      if top == "alignment":
        if not any(
          name == a or name.startswith(a + ".") for a in allowed_internal
        ):
          bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
      elif top not in _PURE_ALLOWED and top not in sys.stdlib_module_names:
        bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
  assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_models_data_sharding_only_imported_by_allowed_packages():
  restricted = ("alignment.models", "alignment.data", "alignment.sharding")
  allowed_importers = (
    "rewards",
    "sampling",
    "trainers",
    "models",
    "data",
    "sharding",
    "main.py",
    "pipeline.py",
    "evaluation",
    "config_lib.py",
  )
  bad = []
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG)
    if rel.parts[0] in allowed_importers:
      continue
    for lineno, name in _imports(path):
      if any(name == r or name.startswith(r + ".") for r in restricted):
        bad.append(f"alignment/{rel}:{lineno} imports {name}")
  assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_importing_losses_does_not_import_heavy_packages():
  code = (
    "import sys, alignment.losses, alignment.ops, alignment.advantages\n"
    "heavy = [m for m in ('flax', 'orbax', 'tensorflow_datasets', 'grain',"
    " 'tensorflow', 'torch', 'ml_collections', 'optax')"
    " if m in sys.modules]\n"
    "print(','.join(heavy))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
    env={"JAX_PLATFORMS": "cpu", "PATH": ""},
  )
  assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
