r"""Expands a config's ``get_sweep(add)`` into runs.

  # print one command per sweep point (pipe to sh, or to a scheduler)
  python launch/sweep.py configs/preference.py:runlocal --root=runs/sweep
  # run them one after another here, then print a table of final metrics
  python launch/sweep.py configs/preference.py:runlocal --root=runs/sweep --run
  # only collect the table of an existing sweep
  python launch/sweep.py configs/preference.py:runlocal --root=runs/sweep --collect

Extra ``--config.k=v`` arguments after ``--`` are passed to every run.
"""

import argparse
import importlib.util
import json
import pathlib
import re
import shlex
import subprocess
import sys


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or spec.loader is None:
    raise SystemExit(f"sweep: cannot load config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sweep_points(config_arg: str) -> list[dict]:
  path, _, arg = config_arg.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"sweep: {path} defines no get_sweep(add)")
  points: list[dict] = []
  module.get_sweep(lambda **kw: points.append(dict(kw)))
  config = module.get_config(arg or None)
  for i, point in enumerate(points):
    for key in point:
      node = config
      for part in key.split("."):
        if part not in node:
          raise SystemExit(f"sweep point {i}: config has no key {key!r}")
        node = node[part]
  return points


def _slug(point: dict) -> str:
  text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
  return re.sub(r"[^A-Za-z0-9_.=-]", "-", text)[:80] or "base"


def commands(
  config_arg: str, root: str, extra: list[str], python: str = sys.executable
) -> list[tuple[str, list[str]]]:
  out = []
  for i, point in enumerate(sweep_points(config_arg)):
    workdir = str(pathlib.Path(root) / f"{i:03d}_{_slug(point)}")
    cmd = [
      python,
      "-m",
      "alignment.main",
      f"--config={config_arg}",
      f"--workdir={workdir}",
    ]
    cmd += [f"--config.{k}={v}" for k, v in point.items()] + extra
    out.append((workdir, cmd))
  return out


def final_metrics(workdir: str) -> dict:
  """Last row of every metrics_*.jsonl in a run's workdir."""
  result = {}
  for path in sorted(pathlib.Path(workdir).glob("metrics_*.jsonl")):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if lines:
      stage = path.stem.removeprefix("metrics_")
      for k, v in json.loads(lines[-1]).items():
        if isinstance(v, (int, float)):
          result[f"{stage}/{k}"] = v
  return result


def table(rows: list[tuple[str, dict]]) -> str:
  keys = sorted({k for _, m in rows for k in m})
  keys = [k for k in keys if not k.endswith("/step")] or keys
  head = "| run | " + " | ".join(keys) + " |"
  sep = "|---" * (len(keys) + 1) + "|"
  body = [
    "| "
    + name
    + " | "
    + " | ".join(f"{m[k]:.4g}" if k in m else "-" for k in keys)
    + " |"
    for name, m in rows
  ]
  return "\n".join([head, sep, *body])


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("config")
  parser.add_argument("--root", required=True)
  parser.add_argument("--run", action="store_true")
  parser.add_argument("--collect", action="store_true")
  # Everything after "--" goes to every run (argparse would reject
  # "--config.k=v" words after the positional config argument).
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if "--" in argv:
    extra = argv[argv.index("--") + 1 :]
    argv = argv[: argv.index("--")]
  args = parser.parse_args(argv)
  cmds = commands(args.config, args.root, extra)
  if not (args.run or args.collect):
    for _, cmd in cmds:
      print(shlex.join(cmd))
    return 0
  failed = []
  if args.run:
    for workdir, cmd in cmds:
      print(f"[sweep] {shlex.join(cmd)}", flush=True)
      if subprocess.run(cmd, check=False).returncode:
        failed.append(workdir)
  rows = [(pathlib.Path(w).name, final_metrics(w)) for w, _ in cmds]
  print(table(rows))
  (pathlib.Path(args.root) / "sweep_results.md").write_text(table(rows) + "\n")
  if failed:
    print(f"[sweep] {len(failed)} run(s) failed: {failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
