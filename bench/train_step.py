r"""Tokens per second of our DPO, reward-model and GRPO train steps.

No peers: builds the same compiled steps as the peer comparison's worker
(``bench/ours.py``: ``build(spec)``, the shapes of ``bench/run_all.py``'s
``SHAPES``) in this one process and times them. For GRPO it also splits an
iteration into its stages:

* ``sample``: KV-cache sampling of ``G`` completions per prompt
  (``sampling.Sampler.generate``) and building the rollout arrays;
* ``score``: reward, reference log-probs (and the old-policy forward
  when the update is not on-policy), group advantages;
* ``update``: one train step (policy forward + backward, AdamW).

Every step blocks until its results exist. Steps of the different
benchmarks run in rounds (A B C, C B A, ...) so the drift of a shared
machine hits them alike; reported are the median step time over all timed
steps, its spread over rounds (min–max of per-round medians), process CPU
seconds per step (all threads) and tokens/s = tokens per step / median step
time (DPO and RM: ``2·B·L`` tokens of chosen + rejected; GRPO: ``B·G·(P+T)``).

  python bench/train_step.py                       # tiny and small, all tasks
  python bench/train_step.py --presets tiny --rounds 2
  python bench/train_step.py --tasks grpo --set on_policy=false   # A/B
  python bench/train_step.py --json bench/results/train_step.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ours  # noqa: E402
import run_all  # noqa: E402

TASKS = ("dpo", "rm", "grpo")


def _shape(task, preset):
  shapes = run_all.SHAPES[preset]
  return dict(shapes["grpo"] if task == "grpo" else shapes["pairs"])


def _commit():
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
      check=False,
    )
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
      check=False,
    )
  except OSError:
    return None
  return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _median(xs):
  return statistics.median(xs) if xs else None


def _parse_set(items):
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    if not _:
      raise SystemExit(f"--set wants key=value (JSON value), got {item!r}")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def measure(names, built, args):
  """Warm-up, then ``args.rounds`` rounds of ``args.steps`` steps each."""
  for name in names:
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      built[name].step()
    print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
  res = {n: {"step": [], "cpu": [], "rounds": [], "stages": {}} for n in names}
  for r in range(args.rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      per_round = []
      for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        for stage, fn in built[name].stages:
          s0 = time.perf_counter()
          fn()
          res[name]["stages"].setdefault(stage, []).append(
            time.perf_counter() - s0
          )
        wall = time.perf_counter() - w0
        res[name]["step"].append(wall)
        res[name]["cpu"].append(time.process_time() - c0)
        per_round.append(wall)
      res[name]["rounds"].append(_median(per_round))
  out = {}
  for name in names:
    r = res[name]
    tokens = built[name].tokens_per_step
    med = _median(r["step"])
    stages = {s: _median(v) for s, v in r["stages"].items()}
    total = sum(stages.values())
    out[name] = {
      "tokens_per_step": tokens,
      "median_step_s": med,
      "round_medians_s": r["rounds"],
      "step_s": r["step"],
      "tokens_per_s": tokens / med,
      "tokens_per_s_spread": [
        tokens / max(r["rounds"]),
        tokens / min(r["rounds"]),
      ],
      "cpu_s_per_step": _median(r["cpu"]),
      "stages_s": stages,
      "stage_share": {s: v / total for s, v in stages.items()},
      "info": built[name].info,
    }
  return out


def render(results):
  lines = [
    "| step | preset | tokens/step | step s | tokens/s [spread] | CPU s |"
    " GRPO: sample / score / update |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, r in results.items():
    task, preset = name.split("_", 1)
    preset = preset.replace("+", " +")
    share = ""
    if task == "grpo":
      sh, st = r["stage_share"], r["stages_s"]
      share = " / ".join(
        f"{st[k]:.2f} s ({100 * sh[k]:.0f}%)"
        for k in ("sample", "score", "update")
      )
    lo, hi = r["tokens_per_s_spread"]
    lines.append(
      f"| {task} | {preset} | {r['tokens_per_step']} | "
      f"{r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} "
      f"[{lo:.0f}–{hi:.0f}] | {r['cpu_s_per_step']:.2f} | {share} |"
    )
  return "\n".join(lines)


def render_ab(results, suffix):
  """Time of each ``name + suffix`` over ``name``'s: per-round ratios."""
  lines = [
    f"| step | plain s | {suffix} s | time {suffix} ÷ plain (median, "
    "min–max over rounds) |",
    "| --- | --- | --- | --- |",
  ]
  for name, r in results.items():
    other = results.get(name + suffix)
    if other is None:
      continue
    ratios = [
      b / a
      for a, b in zip(
        r["round_medians_s"], other["round_medians_s"], strict=True
      )
    ]
    lines.append(
      f"| {name} | {r['median_step_s']:.3f} | {other['median_step_s']:.3f} "
      f"| {_median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="steps per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="spec override for every benchmark (JSON value), e.g. "
    "on_policy=false, dtype=bfloat16, logps_chunk_size=512",
  )
  parser.add_argument(
    "--ab",
    default="",
    metavar="KEY=VALUE",
    help="also build every benchmark with this spec override (named "
    "'<task>_<preset>+KEY=VALUE'), interleaved with the plain one, and "
    "report the speed ratio",
  )
  parser.add_argument("--json", default="", help="also write results here")
  args = parser.parse_args()
  overrides = _parse_set(args.set)
  variants = [("", {})]
  if args.ab:
    variants.append((f"+{args.ab}", _parse_set([args.ab])))
  names, built = [], {}
  for preset in args.presets.split(","):
    for task in args.tasks.split(","):
      if task not in TASKS:
        raise SystemExit(f"--tasks: {task!r} not in {TASKS}")
      for suffix, extra in variants:
        name = f"{task}_{preset}{suffix}"
        spec = ours.spec_for(
          task, preset, **{**_shape(task, preset), **overrides, **extra}
        )
        t0 = time.perf_counter()
        built[name] = ours.build(spec)
        built[name].info["setup_s"] = time.perf_counter() - t0
        names.append(name)
  import jax  # noqa: PLC0415 - imported by ours.build already

  load = os.getloadavg()
  print(f"load average at start {load[0]:.1f}", flush=True)
  results = measure(names, built, args)
  table = render(results)
  if args.ab:
    table += "\n\n" + render_ab(results, f"+{args.ab}")
  print(table)
  if args.json:
    doc = {
      "date": time.strftime("%Y-%m-%d %H:%M"),
      "machine": f"{platform.platform()}; os.cpu_count()={os.cpu_count()}"
      f"; jax {jax.__version__} ({jax.default_backend()})",
      "commit": _commit(),
      "allocator": os.environ.get("LD_PRELOAD", "") or "glibc",
      "load_average_start": load,
      "load_average_end": os.getloadavg(),
      "args": vars(args),
      "results": results,
      "table": table,
    }
    with open(args.json, "w") as f:
      json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
