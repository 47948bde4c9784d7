r"""Every benchmark against its peers, side by side, on this machine.

  .venv/bin/python bench/run_all.py            # full run (~50 min, 2 cores)
  .venv/bin/python bench/run_all.py --quick    # tiny preset only, minutes
  .venv/bin/python bench/run_all.py --only dpo --presets small --rounds 5

What it does:

1. Creates the peers' virtual environments if missing
   (``bench/peers/setup_venvs.py``: ``.venv-oracle`` with torch 2.13.0 CPU,
   trl 1.16.0, transformers 5.23.0; ``.venv-tunix`` with google-tunix 0.1.7)
   and looks for jemalloc (``libjemalloc2``).
2. Runtime-settings probe, per preset and for the DPO and the reward-model
   step each: the step under each allocator of ``ALLOCATORS`` for both
   frameworks (glibc's defaults; glibc keeping freed memory, as
   ``alignment.main`` does with ``ALIGNMENT_MALLOC=keep``: both XLA:CPU and torch otherwise
   fault every step's temporaries in again; jemalloc, ``LD_PRELOAD``,
   keeping dirty pages), ours each also data-parallel over one
   host device per core (``--probe-devices``; XLA:CPU runs the many small
   ops of a tiny model on one thread each, so splitting the batch over
   devices is how JAX uses the cores there, as ``FAKE_DEVICES=2
   launch/local.sh`` does); for TRL also with one torch thread
   (``OMP_NUM_THREADS=1``: on a loaded machine OpenMP's spinning threads
   can slow torch several times). Each framework then runs that step under
   the setting that served it best (GRPO under the DPO step's allocator,
   on one device; JAX's allocator choice also applies to Tunix, which
   shares XLA's runtime, on one device). The long pairs, the peak-memory
   benchmark, run every side under glibc's defaults (``MEMORY_SETTING``):
   a keeping allocator would report its cache's high-water mark.
3. For the ``tiny`` and ``small`` presets, the DPO train step (ours, TRL
   ``DPOTrainer`` in float32 and with TRL's defaults, Tunix ``DPOTrainer``),
   the reward-model train step (ours, TRL ``RewardTrainer``) and one GRPO
   iteration: sampling + update (ours, TRL ``GRPOTrainer``, Tunix
   ``GRPOLearner``). Same Llama configuration (our preset's), same batch,
   sequence lengths, group size, optimiser (AdamW, constant lr, clip 1.0).
   Each side is a worker subprocess (``bench/ours.py``,
   ``bench/peers/*_worker.py``) that builds and compiles once; the workers
   then take turns, ``--steps`` steps each (preset default: tiny 10,
   small 2), for ``--rounds`` rounds (tiny 9, small 3) with
   the order reversed every other round (A B C, C B A, ...), so slow drift
   of a shared machine hits every side alike. Reported: median step time
   over rounds (of each round's median) with its min-max spread, tokens/s
   (sequence positions per step / median step time), process CPU s/step,
   and the worker's peak RSS (``ru_maxrss``: imports, model, compilation,
   every step). Ratios are medians of per-round ratios.
4. The other helpers' benchmarks, when present: ``bench/logprobs.py``
   (chunked vs naive log-probs at large vocabulary), ``bench/sampling.py``
   (ours vs transformers ``generate``), ``bench/data.py``; a script that is
   missing is reported as not run.

Results: ``bench/results/<benchmark>.json``, ``bench/results/run.json``
(machine, venvs, runtime settings, targets) and ``bench/results/
README_table.md`` (the README includes it). Worker logs go to
``bench/results/raw/`` (git-ignored).
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _protocol  # noqa: E402

from alignment import host_memory  # noqa: E402

PY = {
  "ours": ROOT / ".venv" / "bin" / "python",
  "trl": ROOT / ".venv-oracle" / "bin" / "python",
  "tunix": ROOT / ".venv-tunix" / "bin" / "python",
}
SCRIPT = {
  "ours": HERE / "ours.py",
  "trl": HERE / "peers" / "trl_worker.py",
  "tunix": HERE / "peers" / "tunix_worker.py",
}
FRAMEWORK = {"ours": "jax", "tunix": "jax", "trl": "torch"}
# Steps whose runtime settings are probed each (the others use DPO's).
PROBED_TASKS = ("dpo", "rm")
LABEL = {
  "ours": "ours (alignment, JAX)",
  "trl": "TRL 1.16, fp32, no grad. ckpt",
  "trl-defaults": "TRL 1.16, its defaults (bf16, grad. ckpt)",
  "tunix": "Tunix 0.1.7",
}
NOT_AVAILABLE = {
  ("rm", "tunix"): "Tunix 0.1.7 has no reward-model trainer",
}
TASK_TITLE = {
  "dpo": "DPO train step",
  "rm": "reward-model train step",
  "grpo": "GRPO iteration (sampling + update)",
  "dpo_long": "DPO train step, long pairs (peak memory)",
}

# Shapes per preset: small enough for 2 shared CPU cores, the same on
# every side. GRPO: B prompts x G samples, P prompt + T sampled tokens.
SHAPES = {
  "tiny": {
    "pairs": dict(batch=8, prompt_len=64, completion_len=63),
    "grpo": dict(batch=4, num_generations=4, prompt_len=32, completion_len=32),
    # Steps of 15-300 ms: many short rounds, so that a burst of load on the
    # shared machine moves a few per-round ratios, not the median (3 rounds
    # of 3 steps gave the tiny DPO ratio 1.07-1.61x from run to run).
    "steps": 10,
    "rounds": 9,
  },
  "small": {
    "pairs": dict(batch=2, prompt_len=64, completion_len=63),
    "grpo": dict(batch=2, num_generations=4, prompt_len=32, completion_len=32),
    # Where the [B, L, V] logits dominate a DPO step's memory (V = 32000):
    # the regime of the memory target.
    "pairs_long": dict(batch=2, prompt_len=64, completion_len=959),
    "steps": 2,
    "rounds": 3,
  },
}
COMMON = dict(
  learning_rate=1e-6, max_grad_norm=1.0, weight_decay=0.0, seed=0, warmup=2
)
TARGETS = {
  "speed_vs_trl": 1.5,
  "speed_vs_tunix": 1.0,
  "memory_vs_trl_dpo_large_vocab": 0.5,
}


# ----------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------


class Worker:
  """One side of one benchmark: a subprocess speaking bench/_protocol.py."""

  def __init__(self, side, spec, env_extra, log_path):
    self.side = side
    base = "trl" if side.startswith("trl") else side.split("@")[0]
    self.cmd = [str(PY[base]), str(SCRIPT[base]), json.dumps(spec)]
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(env_extra)
    if FRAMEWORK[base] == "jax":
      env.setdefault("JAX_PLATFORMS", "cpu")
    self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
    self.proc = subprocess.Popen(
      self.cmd,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
      env=env,
      cwd=ROOT,
    )
    self.events = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.ready = None
    self.error = None
    self.rounds = []
    self.cpu_rounds = []
    self.done = None

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith(_protocol.MARK):
        self.events.put(json.loads(line[len(_protocol.MARK) :]))
      else:
        self.log.write(line)
    self.events.put({"event": "eof"})

  def wait(self, timeout):
    try:
      ev = self.events.get(timeout=timeout)
    except queue.Empty:
      self.kill(f"no answer within {timeout:.0f} s")
      return None
    if ev["event"] == "error":
      self.error = ev["reason"]
    elif ev["event"] == "eof":
      self.error = self.error or (
        f"worker exited (code {self.proc.wait()}) without a result; see "
        f"{self.log.name}"
      )
      return None
    return ev

  def start(self, timeout):
    ev = self.wait(timeout)
    if ev is not None and ev["event"] == "ready":
      self.ready = ev

  def run(self, steps, timeout):
    if self.error or not self.ready:
      return
    self.proc.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
    self.proc.stdin.flush()
    ev = self.wait(timeout)
    if ev is not None and ev["event"] == "timed":
      self.rounds.append(ev["step_s"])
      self.cpu_rounds.append(ev["cpu_s"])

  def quit(self, timeout=60):
    if self.proc.poll() is None and self.ready and not self.error:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        ev = self.wait(timeout)
        if ev is not None and ev["event"] == "done":
          self.done = ev
      except BrokenPipeError:
        pass
    self.kill(None)

  def kill(self, reason):
    if reason and not self.error:
      self.error = reason
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self.log.flush()


ALLOCATORS = ("glibc", "glibc-keep", "jemalloc")
"""``glibc``: the C library's defaults (blocks over 32 MiB, and those of
threads off the main arena, mapped and unmapped per allocation, so every
step faults its temporaries in again); ``glibc-keep``: glibc told to keep
freed memory (``alignment.host_memory.keep_env()``, what ``alignment.main``
sets with ``ALIGNMENT_MALLOC=keep``); ``jemalloc``: ``LD_PRELOAD`` jemalloc with
:data:`JEMALLOC_CONF` (it keeps dirty pages too)."""

JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"


MEMORY_TASKS = ("dpo_long",)
"""Benchmarks of peak memory, run under :data:`MEMORY_SETTING`, not the
probe's fastest setting."""

MEMORY_SETTING = {"jax": "glibc", "torch": "glibc"}


def runtime_env(setting, jemalloc_path):
  """Env of a runtime setting ``"<allocator>[,t<threads>][,d<devices>]"``.

  ``<allocator>``: one of :data:`ALLOCATORS`.
  ``t<n>``: torch intra-op threads (``OMP_NUM_THREADS``). ``d<n>``: the JAX
  CPU backend split into n host devices
  (``--xla_force_host_platform_device_count``, as ``FAKE_DEVICES=n
  launch/local.sh`` does), over which our pair steps run data-parallel.
  """
  env = {}
  allocator, *rest = setting.split(",")
  if allocator not in ALLOCATORS:
    raise ValueError(
      f"runtime setting {setting!r}: allocator {allocator!r}; valid "
      f"choices are {', '.join(ALLOCATORS)}"
    )
  if allocator == "glibc-keep":
    env.update(host_memory.keep_env())
  elif allocator == "jemalloc" and jemalloc_path:
    env.update(LD_PRELOAD=jemalloc_path, MALLOC_CONF=JEMALLOC_CONF)
  for r in rest:
    if r.startswith("t"):
      env["OMP_NUM_THREADS"] = r[1:]
    elif r.startswith("d"):
      flags = os.environ.get("XLA_FLAGS", "")
      env["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={int(r[1:])}"
      ).strip()
  return env


def single_device(setting):
  """``setting`` without its ``d<n>`` part (for the steps not probed for it
  and for Tunix, whose trainers we run unsharded)."""
  return ",".join(p for p in setting.split(",") if not p.startswith("d"))


def run_benchmark(name, sides, spec_of, args, env_of, notes=None):
  """Starts every side, interleaves step blocks, returns the result dict."""
  raw = pathlib.Path(args.out) / "raw"
  raw.mkdir(parents=True, exist_ok=True)
  print(f"\n== {name}: {', '.join(sides)}", flush=True)
  t0 = time.perf_counter()
  workers = {}
  for side in sides:
    workers[side] = Worker(
      side, spec_of(side), env_of(side), raw / f"{name}.{side}.log"
    )
  for w in workers.values():
    w.start(args.start_timeout)
  live = [s for s in sides if workers[s].ready]
  rounds = args.rounds or spec_of(sides[0])["rounds"]
  for r in range(rounds):
    order = live if r % 2 == 0 else live[::-1]
    for side in order:
      workers[side].run(spec_of(side)["steps"], args.step_timeout)
  for w in workers.values():
    w.quit()
  result = summarise(name, sides, workers, spec_of, env_of, notes or {})
  result["wall_s"] = time.perf_counter() - t0
  info = machine_info()
  result["measured"] = {"date_utc": info["date_utc"], "commit": info["commit"]}
  print_result(result)
  return result


def _median(xs):
  return statistics.median(xs) if xs else None


def summarise(name, sides, workers, spec_of, env_of, notes):
  out = {"name": name, "sides": {}, "notes": notes}
  for side in sides:
    w = workers[side]
    spec = spec_of(side)
    entry = {
      "label": LABEL.get(side.split("@")[0], side),
      "command": " ".join(w.cmd[:2]),
      "env": env_of(side),
    }
    if w.error and not w.rounds:
      entry.update(status="not run", reason=w.error)
    elif not w.rounds:
      entry.update(status="not run", reason="no timed steps")
    else:
      per_round = [_median(r) for r in w.rounds]
      cpu_round = [_median(r) for r in w.cpu_rounds]
      med = _median(per_round)
      tokens = w.ready["tokens_per_step"]
      entry.update(
        status="ok",
        tokens_per_step=tokens,
        steps_per_round=spec["steps"],
        rounds_step_s=w.rounds,
        rounds_cpu_s=w.cpu_rounds,
        median_step_s=med,
        spread_step_s=[min(per_round), max(per_round)],
        tokens_per_s=tokens / med,
        tokens_per_s_spread=[tokens / max(per_round), tokens / min(per_round)],
        cpu_s_per_step=_median(cpu_round),
        warmup_s=w.ready["warmup_s"],
        rss_setup_mib=w.ready["rss_setup_kib"] / 1024,
        peak_rss_mib=(w.done or {}).get("peak_rss_kib", 0) / 1024 or None,
        info=w.ready["info"],
      )
      if w.error:
        entry["warning"] = w.error
    out["sides"][side] = entry
  # Ratios of ours against each peer: medians of per-round ratios.
  ours = out["sides"].get("ours") or next(
    (v for k, v in out["sides"].items() if k.startswith("ours")), None
  )
  out["ratios"] = {}
  if ours and ours.get("status") == "ok":
    for side, entry in out["sides"].items():
      if side.startswith("ours") or entry.get("status") != "ok":
        continue
      n = min(len(ours["rounds_step_s"]), len(entry["rounds_step_s"]))
      speed = [
        _median(entry["rounds_step_s"][i]) / _median(ours["rounds_step_s"][i])
        for i in range(n)
      ]
      cpu = [
        _median(entry["rounds_cpu_s"][i]) / _median(ours["rounds_cpu_s"][i])
        for i in range(n)
      ]
      mem = None
      if ours.get("peak_rss_mib") and entry.get("peak_rss_mib"):
        mem = ours["peak_rss_mib"] / entry["peak_rss_mib"]
      out["ratios"][side] = {
        "speedup": _median(speed),
        "speedup_spread": [min(speed), max(speed)],
        "cpu_speedup": _median(cpu),
        "memory_ratio": mem,
        "same_tokens_per_step": ours["tokens_per_step"]
        == entry["tokens_per_step"],
        "same_ids": ours["info"].get("ids_checksum")
        == entry["info"].get("ids_checksum"),
      }
  return out


def print_result(result):
  for side, e in result["sides"].items():
    if e["status"] != "ok":
      print(f"  {side:<22} not run: {e['reason']}", flush=True)
      continue
    ratio = result["ratios"].get(side)
    extra = ""
    if ratio:
      extra = (
        f"  ours x{ratio['speedup']:.2f} faster "
        f"(cpu x{ratio['cpu_speedup']:.2f})"
      )
      if ratio["memory_ratio"]:
        extra += f", memory {ratio['memory_ratio']:.2f}x"
    print(
      f"  {side:<22} {e['tokens_per_s']:>9.0f} tok/s  step "
      f"{e['median_step_s']:.3f} s [{e['spread_step_s'][0]:.3f}-"
      f"{e['spread_step_s'][1]:.3f}]  cpu {e['cpu_s_per_step']:.3f} s  "
      f"peak {e['peak_rss_mib'] or 0:.0f} MiB{extra}",
      flush=True,
    )


# ----------------------------------------------------------------------------
# The benchmarks
# ----------------------------------------------------------------------------


def model_spec(preset):
  from alignment.models import get_preset  # noqa: PLC0415

  cfg = dataclasses.asdict(get_preset(preset))
  return {
    k: v
    for k, v in cfg.items()
    if v is None or isinstance(v, (int, float, str, bool))
  }


def make_spec(task, preset, args, side):
  shapes = SHAPES[preset]
  spec = dict(COMMON, task=task, preset=preset, model=model_spec(preset))
  if task == "dpo_long":  # the workers run it as a DPO step
    spec.update(task="dpo", **shapes["pairs_long"])
  else:
    spec.update(shapes["grpo"] if task == "grpo" else shapes["pairs"])
  spec["steps"] = args.steps or shapes["steps"]
  spec["rounds"] = shapes["rounds"]
  if task in ("dpo", "dpo_long"):
    spec["beta"] = 0.1
  if task == "grpo":
    spec["beta"] = 0.04
  if side.startswith("trl"):
    spec["variant"] = "defaults" if side.startswith("trl-defaults") else "fp32"
  return spec


def machine_info():
  cpu = ""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem = ""
  try:
    for line in open("/proc/meminfo"):
      if line.startswith("MemTotal"):
        mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
  except OSError:
    pass
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=False,
  ).stdout.strip()
  return {
    "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    "platform": platform.platform(),
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory": mem,
    "load_average_start": os.getloadavg(),
    "commit": commit,
    "python": platform.python_version(),
  }


def run_external(script, argv, timeout):
  """Runs another helper's benchmark script; returns its captured output."""
  path = HERE / script
  if not path.exists():
    return {"status": "not run", "reason": f"bench/{script} is not there"}
  cmd = [str(PY["ours"]), str(path), *argv]
  print(f"\n== {script} {' '.join(argv)}", flush=True)
  t0 = time.perf_counter()
  try:
    res = subprocess.run(
      cmd,
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=timeout,
      check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
  except subprocess.TimeoutExpired:
    return {
      "status": "not run",
      "reason": f"timed out after {timeout} s",
      "command": " ".join(cmd[1:]),
    }
  out = {
    "command": "python " + " ".join(cmd[1:]),
    "output": res.stdout,
    "wall_s": time.perf_counter() - t0,
  }
  print(res.stdout[-4000:], flush=True)
  if res.returncode:
    out.update(status="failed", reason=res.stderr[-1500:])
  else:
    out["status"] = "ok"
  return out


def main():
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny preset, 2 rounds, no settings probe",
  )
  parser.add_argument("--presets", default="tiny,small")
  parser.add_argument(
    "--only", default="dpo,rm,grpo,dpo_long,logprobs,sampling,data"
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=0,
    help="rounds per benchmark (0: preset default, tiny 9, small 3)",
  )
  parser.add_argument(
    "--steps",
    type=int,
    default=0,
    help="steps per side per round (0: preset default)",
  )
  parser.add_argument(
    "--allocator",
    default="auto",
    choices=("auto", "glibc", "glibc-keep", "jemalloc"),
    help="auto: probe the allocators (and torch threads) per preset and step",
  )
  parser.add_argument(
    "--probe-devices",
    type=int,
    default=os.cpu_count() or 1,
    help="also probe our DPO / RM steps data-parallel over this many host "
    "devices (default: one per core; 1: do not)",
  )
  parser.add_argument(
    "--no-trl-defaults",
    action="store_true",
    help="skip the TRL-defaults (bf16 + ckpt) side",
  )
  parser.add_argument(
    "--no-setup", action="store_true", help="do not create the peer venvs"
  )
  parser.add_argument("--start-timeout", type=float, default=900)
  parser.add_argument("--step-timeout", type=float, default=600)
  parser.add_argument("--out", default=str(HERE / "results"))
  parser.add_argument(
    "--render",
    action="store_true",
    help="only re-render README_table.md from the JSON files in --out",
  )
  args = parser.parse_args()
  if args.render:
    render_only(pathlib.Path(args.out))
    return
  if args.quick:
    args.presets = "tiny"
    args.rounds = min(args.rounds or 2, 2)
    if args.allocator == "auto":
      args.allocator = "jemalloc"
  only = set(args.only.split(","))
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()

  setup_cmd = [
    sys.executable,
    str(HERE / "peers" / "setup_venvs.py"),
    "--jemalloc",
  ] + (["--check"] if args.no_setup else [])
  setup = [
    json.loads(line)
    for line in subprocess.run(
      setup_cmd, capture_output=True, text=True, check=False, cwd=ROOT
    ).stdout.splitlines()
    if line.startswith("{")
  ]
  venv_ok = {d["venv"]: d for d in setup if "venv" in d}
  jemalloc = next((d["jemalloc"] for d in setup if "jemalloc" in d), None)
  unavailable = {}
  for side, venv in (("trl", ".venv-oracle"), ("tunix", ".venv-tunix")):
    if not venv_ok.get(venv, {}).get("ok"):
      unavailable[side] = (
        f"{venv} unavailable: {venv_ok.get(venv, {}).get('reason', '?')}"
      )

  run = {
    "machine": machine_info(),
    "setup": setup,
    "targets": TARGETS,
    "args": vars(args),
  }
  print(json.dumps(run["machine"]), flush=True)
  results = {}

  # Runtime settings per framework, preset and step: allocator (glibc or
  # jemalloc) and, for torch, intra-op threads (all cores, or 1: on a
  # loaded machine OpenMP's spinning threads can cost torch several times).
  # The DPO and RM steps are probed each (one allocator can suit one step
  # and not the other: the tiny RM step ran 1.5x slower under jemalloc);
  # GRPO uses the DPO step's choice; the long pairs MEMORY_SETTING.
  default = "jemalloc" if jemalloc and args.allocator != "glibc" else "glibc"
  chosen = {}
  run["settings"] = {}
  for preset in args.presets.split(","):
    chosen[preset] = {
      task: {"jax": default, "torch": default} for task in PROBED_TASKS
    }
    for task in PROBED_TASKS:
      if not (args.allocator == "auto" and task in only):
        continue
      allocators = ["glibc", "glibc-keep"] + (["jemalloc"] if jemalloc else [])
      probe = [f"ours@{a}" for a in allocators]
      if args.probe_devices > 1:
        # glibc's two settings only (jemalloc over two devices never won
        # and its workers hold the most memory: 10 concurrent workers of the
        # small DPO step come close to this machine's 23 GiB).
        probe += [
          f"ours@{a},d{args.probe_devices}" for a in ("glibc", "glibc-keep")
        ]
      if "trl" not in unavailable:
        probe += [f"trl@{a}" for a in allocators] + [f"trl@{allocators[-1]},t1"]
      res = run_benchmark(
        f"settings_{task}_{preset}",
        probe,
        lambda side, preset=preset, task=task: make_spec(
          task, preset, args, side.split("@")[0]
        ),
        args,
        lambda side: runtime_env(side.split("@")[1], jemalloc),
        notes={"purpose": "pick each framework's allocator and threads"},
      )
      res.update(probe_task=task, preset=preset)
      results[res["name"]] = res
      (out_dir / f"{res['name']}.json").write_text(json.dumps(res, indent=1))
      for fw, base in (("jax", "ours"), ("torch", "trl")):
        ok = {
          side.split("@")[1]: e["median_step_s"]
          for side, e in res["sides"].items()
          if side.startswith(base + "@") and e.get("status") == "ok"
        }
        if ok:
          chosen[preset][task][fw] = min(ok, key=ok.get)
  run["settings"] = {"chosen": chosen, "jemalloc_path": jemalloc}
  (out_dir / "run.json").write_text(json.dumps(run, indent=1))
  print(f"runtime settings: {chosen}", flush=True)

  def env_for(preset, task="dpo"):
    setting = chosen[preset][task if task in PROBED_TASKS else "dpo"]

    def env_of(side):
      base = side.split("@")[0]
      fw = FRAMEWORK["trl" if base.startswith("trl") else base]
      if task in MEMORY_TASKS:
        # Peak memory of the step, not of an allocator's cache: the C
        # library's defaults for every side (a keeping allocator holds the
        # high-water mark of overlapping steps: 5010 vs 3171 MiB for ours,
        # 6953 vs 6970 for TRL's, in the 2026-11-22 19:37 run).
        return runtime_env(single_device(MEMORY_SETTING[fw]), jemalloc)
      if base == "ours" and task in PROBED_TASKS:
        return runtime_env(setting[fw], jemalloc)
      return runtime_env(single_device(setting[fw]), jemalloc)

    return env_of

  for preset in args.presets.split(","):
    for task in ("dpo", "rm", "grpo", "dpo_long"):
      if task not in only:
        continue
      if task == "dpo_long" and "pairs_long" not in SHAPES[preset]:
        continue
      sides = ["ours", "trl"]
      if not args.no_trl_defaults:
        sides.append("trl-defaults")
      sides.append("tunix")
      notes = {}
      run_sides = []
      for side in sides:
        base = "trl" if side.startswith("trl") else side
        reason = NOT_AVAILABLE.get((task, base)) or unavailable.get(base)
        if reason:
          notes[side] = reason
        else:
          run_sides.append(side)
      name = f"{task}_{preset}"
      res = run_benchmark(
        name,
        run_sides,
        lambda side, task=task, preset=preset: make_spec(
          task, preset, args, side
        ),
        args,
        env_for(preset, task),
        notes,
      )
      res.update(
        task=task, preset=preset, spec=make_spec(task, preset, args, "ours")
      )
      for side, reason in notes.items():
        res["sides"][side] = {
          "label": LABEL[side],
          "status": "not run",
          "reason": reason,
        }
      results[name] = res
      (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))

  quick = args.quick
  ext_preset = "small" if "small" in chosen else next(iter(chosen))
  os.environ.update(env_for(ext_preset, "external")("ours"))
  if "logprobs" in only:
    results["logprobs"] = run_external(
      "logprobs.py",
      ["--quick"]
      if quick
      else ["--vocabs", "32768", "--length", "512", "--repeats", "3"],
      timeout=900,
    )
  if "sampling" in only:
    results["sampling"] = run_external(
      "sampling.py",
      (
        ["--quick"]
        if quick
        else ["--new-tokens", "128", "--rounds", "3", "--no-cache-budget", "5"]
      )
      + ["--no-positions", "--json", str(out_dir / "sampling_raw.json")],
      timeout=900,
    )
  if "data" in only:
    results["data"] = run_external(
      "data.py",
      ["--quick", "--json", str(out_dir / "data_raw.json")],
      timeout=600,
    )
  for key in ("logprobs", "sampling", "data"):
    if key in results:
      results[key]["allocator"] = chosen[ext_preset]["dpo"]["jax"]
      (out_dir / f"{key}.json").write_text(json.dumps(results[key], indent=1))

  run["machine"]["load_average_end"] = os.getloadavg()
  run["wall_s"] = time.perf_counter() - t_start
  run["benchmarks"] = list(results)
  (out_dir / "run.json").write_text(json.dumps(run, indent=1))
  table = render_table(run, results)
  (out_dir / "README_table.md").write_text(table)
  print("\n" + table, flush=True)


def render_only(out_dir):
  """Re-renders README_table.md from the JSON files of a (partial) run."""
  run = json.loads((out_dir / "run.json").read_text())
  names = run.get("benchmarks") or [
    f"{kind}_{preset}"
    for preset in ("tiny", "small")
    for kind in ("settings_dpo", "settings_rm", "dpo", "rm", "grpo", "dpo_long")
  ] + ["logprobs", "sampling", "data"]
  results = {}
  for name in names:
    path = out_dir / f"{name}.json"
    if path.exists():
      results[name] = json.loads(path.read_text())
  run.setdefault("wall_s", 0.0)
  run["machine"].setdefault("load_average_end", [float("nan")])
  table = render_table(run, results)
  (out_dir / "README_table.md").write_text(table)
  print(table)


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def _settings_text(preset, c):
  """``chosen[preset]``: per probed step (or, in older runs, one setting)."""
  if "jax" in c:
    return (
      f"{preset}: JAX sides (ours, Tunix) {c['jax']}, torch (TRL) {c['torch']}"
    )
  return f"{preset}: " + ", ".join(
    f"{task.upper() if task != 'rm' else 'RM'} step JAX {s['jax']} / torch"
    f" {s['torch']}"
    for task, s in c.items()
  )


def _fmt_ratio(x):
  return "–" if x is None else f"{x:.2f}x"


def render_table(run, results):
  m = run["machine"]
  lines = [
    f"Measured {m['date_utc']} UTC on {m['cpu'] or m['platform']}, "
    f"{m['cores']} cores, {m['memory']} RAM ({m['platform']}), commit "
    f"`{m['commit']}`; load average {m['load_average_start'][0]:.1f} at "
    f"start, {m.get('load_average_end', [0])[0]:.1f} at end (shared "
    f"machine: compare ratios, not absolute figures). Runtime settings "
    f"(allocator[,torch threads][,JAX host devices], the faster of each "
    f"framework's probe; GRPO and Tunix on one device; the long pairs, "
    f"a peak-memory benchmark, glibc defaults for every side): "
    + "; ".join(
      _settings_text(preset, c)
      for preset, c in run["settings"]["chosen"].items()
    )
    + (
      f". Total wall time {run['wall_s'] / 60:.1f} min."
      if run.get("wall_s")
      else ". Partial run (re-rendered with --render)."
    ),
    "",
    "tokens/s = sequence positions per step / median step time (median of "
    "per-round medians; [min–max] over rounds). CPU = process CPU seconds "
    "per step (all threads). Peak = worker's peak RSS. 'ours ×' = median "
    "of per-round (peer step time / our step time): >1 means ours is "
    "faster; 'mem' = our peak RSS / the peer's.",
    "",
    "| benchmark | side | tokens/s [spread] | step s | CPU s/step | peak "
    "RSS MiB | ours × (wall) | ours × (CPU) | mem ours/peer |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  order = [
    k for k in results if not k.startswith(("logprobs", "sampling", "data"))
  ]
  for key in order:
    res = results[key]
    if "task" in res:
      spec = res["spec"]
      if res["task"] == "grpo":
        shape = (
          f"B={spec['batch']}×G={spec['num_generations']}, "
          f"P={spec['prompt_len']}+T={spec['completion_len']}"
        )
      else:
        shape = (
          f"B={spec['batch']} pairs, L="
          f"{spec['prompt_len'] + spec['completion_len'] + 1}"
        )
      title = (
        f"{TASK_TITLE[res['task']]}, {res['preset']} "
        f"(V={spec['model']['vocab_size']}, {shape})"
      )
    else:
      probed = res.get("probe_task", "dpo")
      title = (
        f"runtime-settings probe, {key.rsplit('_', 1)[1]} "
        f"{TASK_TITLE[probed].split(' train')[0]} step"
      )
    for side, e in res["sides"].items():
      if e["status"] != "ok":
        lines.append(
          f"| {title} | {e.get('label', side)} | not run: "
          f"{e['reason'][:160]} | | | | | | |"
        )
        continue
      r = res["ratios"].get(side, {})
      label = e["label"] + (f" [{side.split('@')[1]}]" if "@" in side else "")
      lines.append(
        f"| {title} | {label} | {e['tokens_per_s']:.0f} "
        f"[{e['tokens_per_s_spread'][0]:.0f}–"
        f"{e['tokens_per_s_spread'][1]:.0f}] | {e['median_step_s']:.3f} | "
        f"{e['cpu_s_per_step']:.3f} | {e['peak_rss_mib'] or 0:.0f} | "
        f"{_fmt_ratio(r.get('speedup'))} | "
        f"{_fmt_ratio(r.get('cpu_speedup'))} | "
        f"{_fmt_ratio(r.get('memory_ratio'))} |"
      )
  other_runs = sorted(
    {
      (res["measured"]["date_utc"], res["measured"]["commit"], key)
      for key, res in results.items()
      if res.get("measured", {}).get("commit") not in (None, m["commit"])
    }
  )
  if other_runs:
    lines += [""] + [
      f"`{key}` rows: a separate run, {date} UTC, commit `{commit}`."
      for date, commit, key in other_runs
    ]
  lines += ["", "Targets (issue 8):", ""]
  lines += targets_lines(results)
  for key, title in (
    ("logprobs", "Log-prob path (bench/logprobs.py)"),
    ("sampling", "Sampling (bench/sampling.py)"),
    ("data", "Data pipeline (bench/data.py)"),
  ):
    if key not in results:
      continue
    r = results[key]
    lines += ["", f"{title}:", ""]
    if r["status"] != "ok":
      lines.append(f"not run: {r['reason'][-300:]}")
    else:
      lines += [f"`{r['command']}`", "", "```", r["output"].rstrip(), "```"]
  return "\n".join(lines) + "\n"


def targets_lines(results):
  out = []
  for task in ("dpo", "rm", "grpo"):
    for preset in ("tiny", "small"):
      res = results.get(f"{task}_{preset}")
      if not res:
        continue
      for peer, target in (
        ("trl", TARGETS["speed_vs_trl"]),
        ("tunix", TARGETS["speed_vs_tunix"]),
      ):
        r = res["ratios"].get(peer)
        if r is None:
          why = res["sides"].get(peer, {}).get("reason", "not run")
          out.append(
            f"- {TASK_TITLE[task]}, {preset}: ≥{target}x {peer} "
            f"speed: not measured ({why[:120]})"
          )
          continue
        met = "met" if r["speedup"] >= target else "NOT met"
        out.append(
          f"- {TASK_TITLE[task]}, {preset}: ≥{target}x {peer} "
          f"speed: {met} ({r['speedup']:.2f}x wall, "
          f"{r['cpu_speedup']:.2f}x CPU)"
        )
  for key in ("dpo_tiny", "dpo_small", "dpo_long_small"):
    res = results.get(key)
    if not res or res["spec"]["model"]["vocab_size"] < 32000:
      continue
    preset = res["preset"]
    spec = res["spec"]
    length = spec["prompt_len"] + spec["completion_len"] + 1
    r = res["ratios"].get("trl")
    if r and r["memory_ratio"]:
      met = (
        "met"
        if r["memory_ratio"] <= TARGETS["memory_vs_trl_dpo_large_vocab"]
        else "NOT met"
      )
      out.append(
        f"- DPO peak memory ≤0.5x TRL at V="
        f"{res['spec']['model']['vocab_size']} ({preset}, L={length}): {met} "
        f"({r['memory_ratio']:.2f}x)"
      )
  return out


if __name__ == "__main__":
  main()
