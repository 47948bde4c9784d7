"""Worker side of the benchmark harness (stdlib only: every venv imports it).

A worker is a subprocess that builds one side of one benchmark (ours, TRL,
Tunix) once, compiles / warms it up, then runs training steps on demand so
that the parent can interleave the sides step block by step block
(A B A B ...) without paying start-up and compilation again. Only one side
runs at a time: the others wait, blocked on their stdin.

Protocol (one JSON object per line; the worker's own lines on stdout start
with ``MARK`` so library prints are ignored):

* worker → ``{"event": "ready", "tokens_per_step": n, "warmup_s": [...],
  "rss_setup_kib": k, "info": {...}}`` after its warm-up steps;
* parent → ``{"cmd": "run", "steps": k}``; worker → ``{"event": "timed",
  "step_s": [...], "cpu_s": [...]}`` (wall time and process CPU time, all
  threads, of each of the k steps, each step blocked until its results
  exist);
* parent → ``{"cmd": "quit"}``; worker → ``{"event": "done",
  "peak_rss_kib": k}`` (``ru_maxrss`` of the whole worker process: imports,
  model, compilation, every step) and exits.

A worker that cannot run a configuration sends ``{"event": "error",
"reason": ...}`` and exits; the table then says why.
"""

import json
import os
import resource
import sys
import time
import traceback

MARK = "@@BENCH "


def emit(obj) -> None:
  sys.stdout.write(MARK + json.dumps(obj) + "\n")
  sys.stdout.flush()


def peak_rss_kib() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def proc_status_kib(field: str) -> int:
  """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def read_spec() -> dict:
  """The benchmark spec: JSON in ``argv[1]`` (written by ``run_all.py``)."""
  return json.loads(sys.argv[1])


def allocator() -> str:
  preload = os.environ.get("LD_PRELOAD", "")
  return (
    "jemalloc"
    if "jemalloc" in preload
    else ("tcmalloc" if "tcmalloc" in preload else "glibc")
  )


class StepServer:
  """Counts steps, times them and answers the parent between step blocks.

  Push-style, so it works both for a loop we own (``for ...: t = step();
  server.on_step(t)``) and inside a peer's training loop (a callback that
  calls :meth:`on_step` at the end of each step and blocks there).
  """

  def __init__(self, *, warmup: int, tokens_per_step: int, info: dict):
    self.warmup = warmup
    self.tokens_per_step = tokens_per_step
    self.info = dict(info, allocator=allocator(), pid=os.getpid())
    self.warmup_s = []
    self.pending = 0
    self.times = []
    self.cpu = []
    self.rss_setup = peak_rss_kib()

  def start(self) -> None:
    """Call after set-up; with ``warmup=0`` this already waits for work."""
    if self.warmup == 0:
      self._ready()

  def _ready(self) -> None:
    emit(
      {
        "event": "ready",
        "tokens_per_step": self.tokens_per_step,
        "warmup_s": self.warmup_s,
        "rss_setup_kib": self.rss_setup,
        "info": self.info,
      }
    )
    self._next_command()

  def _next_command(self) -> None:
    line = sys.stdin.readline()
    if not line:
      os._exit(0)
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      emit({"event": "done", "peak_rss_kib": peak_rss_kib()})
      sys.stdout.flush()
      os._exit(0)
    self.pending = int(cmd["steps"])
    self.times = []
    self.cpu = []

  def on_step(self, seconds: float, cpu_seconds: float) -> None:
    if len(self.warmup_s) < self.warmup:
      self.warmup_s.append(seconds)
      if len(self.warmup_s) == self.warmup:
        self._ready()
      return
    self.times.append(seconds)
    self.cpu.append(cpu_seconds)
    if len(self.times) >= self.pending:
      emit({"event": "timed", "step_s": self.times, "cpu_s": self.cpu})
      self._next_command()


class StepTimer:
  """``begin()`` / ``end()`` around a step; ``end`` reports to the server."""

  def __init__(self, server: StepServer):
    self.server = server
    self.t0 = self.c0 = None

  def begin(self) -> None:
    self.t0, self.c0 = time.perf_counter(), time.process_time()

  def end(self) -> None:
    wall = time.perf_counter() - self.t0
    cpu = time.process_time() - self.c0
    self.server.on_step(wall, cpu)


def run_loop(server: StepServer, step) -> None:
  """Times ``step()`` (which must block until its results exist) forever."""
  server.start()
  timer = StepTimer(server)
  while True:
    timer.begin()
    step()
    timer.end()


def fail(reason: str) -> None:
  emit({"event": "error", "reason": reason})
  sys.stdout.flush()
  os._exit(0)


def guarded(main) -> None:
  """Runs ``main()``; any exception becomes an ``error`` event."""
  try:
    main()
  except SystemExit:
    raise
  except BaseException as e:  # noqa: BLE001 - reported to the parent
    tb = traceback.format_exc(limit=-12)
    sys.stderr.write(tb)
    fail(f"{type(e).__name__}: {str(e)[:400]}")


def char_vocab(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
  """Token id ↔ one character, so that text of n characters is n tokens.

  Peers that only take text (TRL's trainers) get the same token ids as our
  side this way. Special ids map to ``<pad>``, ``<bos>``, ``<eos>``.
  """
  specials = {pad_id: "<pad>", bos_id: "<bos>", eos_id: "<eos>"}
  return {specials.get(i, chr(0x100 + i)): i for i in range(vocab_size)}


def text_of(ids) -> str:
  return "".join(chr(0x100 + int(i)) for i in ids)


def random_ids(spec: dict, shape, salt: int):
  """Deterministic random token ids (no special ids), the same on every side."""
  import numpy as np  # noqa: PLC0415 - every venv has numpy

  special = {
    spec["model"]["pad_id"],
    spec["model"]["bos_id"],
    spec["model"]["eos_id"],
  }
  normal = np.array(
    [i for i in range(spec["model"]["vocab_size"]) if i not in special]
  )
  rng = np.random.default_rng(spec.get("seed", 0) * 1000 + salt)
  return normal[rng.integers(0, len(normal), shape)]


def preference_ids(spec: dict):
  """``(prompt [B, P], chosen [B, C], rejected [B, C])`` ids; each
  completion is followed by EOS on every side (TRL appends it)."""
  b, p, c = spec["batch"], spec["prompt_len"], spec["completion_len"]
  return (
    random_ids(spec, (b, p), 1),
    random_ids(spec, (b, c), 2),
    random_ids(spec, (b, c), 3),
  )
