"""Creates (or verifies) the peers' virtual environments from pinned versions.

  python bench/peers/setup_venvs.py            # both, if missing or wrong
  python bench/peers/setup_venvs.py --check    # only report, change nothing
  python bench/peers/setup_venvs.py --jemalloc # also apt-get libjemalloc2

* ``.venv-oracle``: torch 2.13.0 (CPU), trl 1.16.0, transformers 5.23.0
  (``requirements-trl.txt``); the oracle generators share it.
* ``.venv-tunix``: google-tunix 0.1.7 and its JAX stack
  (``requirements-tunix.txt``), separate because tunix pins
  ``safetensors<0.8``, which transformers 5.23 cannot use.

A venv whose pinned packages already have the pinned versions is left as
it is; otherwise the pins are installed into it (creating it first if
needed). The main install and the test suite never need these venvs.
Prints one JSON line per venv: ``{"venv", "ok", "versions", "reason"}``.
Standard library only.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENVS = {
  ".venv-oracle": HERE / "requirements-trl.txt",
  ".venv-tunix": HERE / "requirements-tunix.txt",
}
JEMALLOC_CANDIDATES = (
  "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
  "/usr/lib64/libjemalloc.so.2",
  "/usr/local/lib/libjemalloc.so.2",
)


def pins(requirements: pathlib.Path) -> dict[str, str]:
  out = {}
  for line in requirements.read_text().splitlines():
    line = line.split("#")[0].strip()
    if "==" in line:
      name, version = line.split("==")
      out[name.strip().lower().replace("_", "-")] = version.strip()
  return out


def installed(venv: pathlib.Path) -> dict[str, str]:
  py = venv / "bin" / "python"
  if not py.exists():
    return {}
  code = (
    "import importlib.metadata as m, json;"
    "print(json.dumps({d.metadata['Name'].lower().replace('_','-'): "
    "d.version for d in m.distributions()}))"
  )
  out = subprocess.run(
    [str(py), "-c", code], capture_output=True, text=True, check=False
  )
  if out.returncode:
    return {}
  return json.loads(out.stdout)


def mismatches(venv, requirements) -> list[str]:
  have = installed(venv)
  bad = []
  for name, version in pins(requirements).items():
    got = have.get(name)
    # torch's CPU wheel reports 2.13.0+cpu.
    if got is None or got.split("+")[0] != version:
      bad.append(f"{name}=={version} (found {got})")
  return bad


def ensure(venv_name: str, requirements: pathlib.Path, check: bool) -> dict:
  venv = ROOT / venv_name
  bad = mismatches(venv, requirements)
  if not bad:
    return {"venv": venv_name, "ok": True, "versions": pins(requirements)}
  if check:
    return {"venv": venv_name, "ok": False, "reason": "; ".join(bad)}
  py = venv / "bin" / "python"
  steps = []
  if not py.exists():
    steps.append([sys.executable, "-m", "venv", str(venv)])
  steps.append([str(py), "-m", "pip", "install", "-q", "-U", "pip"])
  steps.append([str(py), "-m", "pip", "install", "-q", "-r", str(requirements)])
  for cmd in steps:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, check=False)
    if res.returncode:
      return {
        "venv": venv_name,
        "ok": False,
        "reason": f"{' '.join(cmd[-3:])} exited {res.returncode}",
      }
  bad = mismatches(venv, requirements)
  if bad:
    return {"venv": venv_name, "ok": False, "reason": "; ".join(bad)}
  return {"venv": venv_name, "ok": True, "versions": pins(requirements)}


def find_jemalloc() -> str | None:
  for path in JEMALLOC_CANDIDATES:
    if os.path.exists(path):
      return path
  return None


def ensure_jemalloc(install: bool) -> str | None:
  path = find_jemalloc()
  if path or not install:
    return path
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    return None
  for cmd in (
    ["apt-get", "update", "-q"],
    ["apt-get", "install", "-y", "-q", "libjemalloc2"],
  ):
    subprocess.run(cmd, check=False, capture_output=True)
  return find_jemalloc()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true")
  parser.add_argument(
    "--jemalloc",
    action="store_true",
    help="apt-get install libjemalloc2 if missing (root)",
  )
  parser.add_argument("--only", default="", help="comma-separated venvs")
  args = parser.parse_args()
  wanted = [v for v in VENVS if not args.only or v in args.only.split(",")]
  for name in wanted:
    print(json.dumps(ensure(name, VENVS[name], args.check)), flush=True)
  print(json.dumps({"jemalloc": ensure_jemalloc(args.jemalloc)}), flush=True)


if __name__ == "__main__":
  main()
