r"""Fused (chunked) vs naive per-token log-probs: memory and fwd+bwd time.

Compares, for ``hidden [B, T, D]``, ``unembedding [D, V]``, ``targets``:

* ``naive``: ``ops.token_logps(hidden @ W, targets)`` (materialises
  ``[B, T, V]`` logits, and their gradient in the backward pass);
* ``fused``: ``ops.fused_token_logps(hidden, W, targets)`` with its
  defaults: a dense head of the first ``ops.fused_dense_rows(V)`` rows (one
  untiled product, logits kept for the backward pass; 256 rows at
  V = 32768), then tiles of ``chunk_size x vocab_chunk_size``, recomputed
  in the backward pass;
* ``fused:tiles``: the same with ``dense_rows=0``, tiles only;
* ``floor``: the matmul work that any implementation must do, the forward
  ``[B·T, D] x [D, V]`` product and the two backward products with a given
  cotangent ``G [B·T, V]``: ``sum(h @ W * G)`` (XLA fuses the product into
  the reduction, so it is never written out), ``G @ W.T`` and ``h.T @ G``
  (``h.T`` passed in pre-transposed: the fast matmul path on XLA:CPU);
* ``floor_vjp``: the same three products as ``jax.value_and_grad`` of
  ``sum(h @ W * G)`` compiles them (XLA:CPU takes the transposed-operand
  ``h.T @ G`` through a slower path);
* ``trl``: TRL's chunked log-prob, ``trl.kernels.ChunkedLogProbFunction``
  (trl 1.16, torch, CPU), the function TRL's trainers call for a fused LM
  head, with the arguments they pass (no bias, temperature 1, vocabulary
  tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE`` = 32768 columns, its own token
  tiles of 4096 rows, log-probs only). Without Triton (always on CPU) TRL
  folds each tile with torch ops instead of its Triton kernel. It runs in
  a persistent subprocess of the oracle venv (``.venv-oracle``) on the same
  arrays (passed as ``.npy`` files; W as the ``[V, D]`` contiguous weight
  of an ``nn.Linear``), forward + backward of the same ``sum(c · logps)``
  w.r.t. hidden and W; torch uses its default intra-op threads. Its
  log-probs and gradients are compared with ours (max abs difference).
  Skipped, with the reason printed, without the venv or with ``--no-trl``.

Each variant is ``jax.value_and_grad`` of ``sum(c * logps)`` w.r.t. hidden
and W, jitted. Memory is XLA's compiled ``memory_analysis()`` (temp +
output bytes; the inputs are not counted) and, with ``--rss`` (Linux), the
peak RSS of a fresh subprocess per variant during one run of the already
compiled function, minus its RSS before that run. TRL has no compiled
memory analysis: its memory is only that RSS growth (a fresh worker, after
a small warm-up run, so torch's one-time initialisation is not counted),
measured whenever the TRL side runs, together with the same RSS measure of
``fused`` for a like-for-like comparison; the ``temp+out`` column is XLA's
number and does not exist for torch.
Time is measured in rounds that run every variant once in turn
(A B C A B C ...); the table shows medians of wall time and of process CPU
time (all threads), and the ratios are medians of the per-round wall-time
ratios, so slow drift of a shared machine cancels.

  python bench/logprobs.py            # B=4 T=1024 D=512, V=32768 and 131072
  python bench/logprobs.py --quick    # small sizes, seconds
  python bench/logprobs.py --configs 1024:4096,512:None   # tile sweep
  python bench/logprobs.py --batch 1 --length 256 --vocabs 32000 --no-trl
      # few rows (a DPO / GRPO step's completions): all in the dense head
  python bench/logprobs.py --rss --repeats 0   # memory only (no TRL)
  python bench/logprobs.py --json bench/results/logprobs.json
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _protocol  # bench/ is on sys.path: the script's own folder
import numpy as np

if "--trl-worker" not in sys.argv:  # the TRL worker's venv has no JAX
  import jax
  import jax.numpy as jnp

  from alignment import ops

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_ORACLE_PYTHON = _ROOT / ".venv-oracle" / "bin" / "python"


# --------------------------------------------------------------------------
# TRL side: runs in the oracle venv, imports torch and trl only.
# --------------------------------------------------------------------------


def _trl_worker():
  """Serves requests (one JSON line each) on stdin/stdout.

  ``{"op": "load", "dir": d}`` reads ``hidden, w, targets, c`` (``.npy``);
  ``{"op": "run"}`` times one forward + backward; ``{"op": "save"}`` writes
  ``logps, grad_hidden, grad_w`` (W's gradient as ``[D, V]``) to ``d``;
  ``{"op": "rss"}`` warms up on a small slice, then reports the peak RSS
  growth of one full run (Linux ``VmHWM`` after ``clear_refs``).
  """
  import torch  # noqa: PLC0415
  from trl.kernels import ChunkedLogProbFunction  # noqa: PLC0415

  try:
    from trl.trainer.utils import (  # noqa: PLC0415
      _CHUNKED_LOGPROB_CHUNK_SIZE as chunk,
    )
  except ImportError:
    chunk = 32768
  from trl.kernels import chunked_logprob  # noqa: PLC0415

  state = {}

  def run(h, w, t, c):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    logps = ChunkedLogProbFunction.apply(
      h, w, None, t, 1.0, chunk, None, 1.0, ("log_probs",)
    )[0]
    (c * logps).sum().backward()
    return logps.detach(), h.grad, w.grad

  for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    reply = {}
    if op == "load":
      d = pathlib.Path(req["dir"])
      hidden = np.load(d / "hidden.npy")
      n = hidden.shape[0] * hidden.shape[1]
      state.update(
        dir=d,
        h=torch.from_numpy(hidden.reshape(n, -1)),
        # nn.Linear layout [V, D], contiguous, as TRL's trainers pass it.
        w=torch.from_numpy(np.ascontiguousarray(np.load(d / "w.npy").T)),
        t=torch.from_numpy(np.load(d / "targets.npy").reshape(n)).long(),
        c=torch.from_numpy(np.load(d / "c.npy").reshape(n)),
      )
      reply = dict(
        chunk_size=chunk,
        token_chunk_size=chunked_logprob.TOKEN_CHUNK_SIZE,
        triton=bool(chunked_logprob._use_triton(torch.device("cpu"))),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        trl=__import__("trl").__version__,
      )
    elif op == "run":
      args = (state["h"], state["w"], state["t"], state["c"])
      w0, c0 = time.perf_counter(), time.process_time()
      run(*args)
      reply = dict(
        seconds=time.perf_counter() - w0, cpu_seconds=time.process_time() - c0
      )
    elif op == "save":
      logps, gh, gw = run(state["h"], state["w"], state["t"], state["c"])
      np.save(state["dir"] / "trl_logps.npy", logps.numpy())
      np.save(state["dir"] / "trl_grad_hidden.npy", gh.numpy())
      np.save(state["dir"] / "trl_grad_w.npy", gw.numpy().T)
    elif op == "rss":
      small = slice(0, 64)
      run(
        state["h"][small],
        state["w"][:1024],
        state["t"][small] % 1024,
        state["c"][small],
      )
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      before = _protocol.proc_status_kib("VmRSS")
      run(state["h"], state["w"], state["t"], state["c"])
      reply = dict(rss_kib=_protocol.proc_status_kib("VmHWM") - before)
    print(json.dumps(reply), flush=True)


class _TrlClient:
  """A persistent TRL worker process in the oracle venv."""

  def __init__(self):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    self.proc = subprocess.Popen(
      [str(_ORACLE_PYTHON), __file__, "--trl-worker"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      text=True,
    )

  def __call__(self, **req):
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"TRL worker died during {req}")
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=120)


def _trl_rss_bytes(workdir):
  client = _TrlClient()
  try:
    client(op="load", dir=str(workdir))
    return client(op="rss")["rss_kib"] * 1024
  finally:
    client.close()


def _write_inputs(inputs, workdir):
  for name, x in zip(("hidden", "w", "targets", "c"), inputs, strict=True):
    np.save(workdir / f"{name}.npy", np.asarray(x))


def _trl_agreement(inputs, workdir):
  """Max abs differences of TRL's log-probs and gradients from ours."""
  hidden, w, targets, c = inputs
  n = hidden.shape[0] * hidden.shape[1]
  logps = jax.jit(ops.fused_token_logps)(hidden, w, targets)
  gh, gw = jax.jit(
    jax.grad(
      lambda h, w: jnp.sum(c * ops.fused_token_logps(h, w, targets)), (0, 1)
    )
  )(hidden, w)
  ours = dict(
    logps=np.asarray(logps).reshape(n),
    grad_hidden=np.asarray(gh).reshape(n, -1),
    grad_w=np.asarray(gw),
  )
  out = {}
  for k, v in ours.items():
    theirs = np.load(workdir / f"trl_{k}.npy")
    out[k] = float(np.max(np.abs(theirs - v)))
    out[k + "_scale"] = float(np.max(np.abs(v)))
  return out


def _inputs(batch, length, width, vocab, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  hidden = jnp.asarray(normal(batch, length, width))
  w = jnp.asarray(normal(width, vocab) / np.float32(np.sqrt(width)))
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  c = jnp.asarray(normal(batch, length))
  return hidden, w, targets, c


def _variant(name, args):
  """Returns ``(jitted fn, its extra array inputs)`` for a variant name."""
  n = args.batch * args.length
  if name in ("floor", "floor_vjp"):
    g = jnp.asarray(
      np.random.default_rng(1).standard_normal(
        (n, args.vocab), dtype=np.float32
      )
    )
  if name == "floor_vjp":  # what jax.grad makes of a bare matmul

    def floor_vjp(h, w, t, c, g):
      del t, c
      h2 = h.reshape(n, -1)
      return jax.value_and_grad(lambda h2, w: jnp.sum((h2 @ w) * g), (0, 1))(
        h2, w
      )

    return jax.jit(floor_vjp), (g,)
  if name == "floor":  # the three products, each in a fast layout

    def floor(h, w, t, c, g, h_t):
      del t, c
      h2 = h.reshape(n, -1)
      return jnp.sum((h2 @ w) * g), g @ w.T, h_t @ g

    h_t = jnp.zeros((args.width, n), jnp.float32) + 0.5  # [D, B·T] operand
    return jax.jit(floor), (g, h_t)
  if name == "naive":
    fn = lambda h, w, t: ops.token_logps(h @ w, t)
  else:  # "fused", "fused:tiles" or "fused:<chunk>:<vocab_chunk>[:<dense>]"
    kwargs = {}
    if name == "fused:tiles":
      kwargs = dict(dense_rows=0)
    elif name != "fused":
      _, chunk, vocab_chunk, *dense = name.split(":")
      kwargs = dict(
        chunk_size=int(chunk),
        vocab_chunk_size=None if vocab_chunk == "None" else int(vocab_chunk),
        dense_rows=int(dense[0]) if dense else 0,
      )
    fn = lambda h, w, t: ops.fused_token_logps(h, w, t, **kwargs)

  def loss(h, w, t, c):
    return jax.value_and_grad(lambda h, w: jnp.sum(c * fn(h, w, t)), (0, 1))(
      h, w
    )

  return jax.jit(loss), ()


def _compiled_bytes(name, args, inputs):
  fn, extra = _variant(name, args)
  mem = fn.lower(*inputs, *extra).compile().memory_analysis()
  return mem.temp_size_in_bytes + mem.output_size_in_bytes


def _rss_child(args):
  """Runs in a subprocess: prints the RSS growth from running (not compiling).

  Linux only: resets the address space's RSS high-water mark (``VmHWM``, via
  ``/proc/self/clear_refs``) after compiling, then reports the new peak minus
  the resident size before the run.
  """
  inputs = _inputs(args.batch, args.length, args.width, args.vocab)
  fn, extra = _variant(args.rss_child, args)
  compiled = fn.lower(*inputs, *extra).compile()
  jax.block_until_ready((inputs, extra))
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _protocol.proc_status_kib("VmRSS")
  jax.block_until_ready(compiled(*inputs, *extra))
  print(json.dumps({"rss_kib": _protocol.proc_status_kib("VmHWM") - before}))


def _rss_bytes(name, args):
  cmd = [
    sys.executable,
    __file__,
    "--rss-child",
    name,
    "--batch",
    str(args.batch),
    "--length",
    str(args.length),
    "--width",
    str(args.width),
    "--vocab",
    str(args.vocab),
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])["rss_kib"] * 1024


def _time(names, args, inputs, trl=None):
  """Interleaved rounds; ``trl`` (a `_TrlClient`) adds the variant "trl"."""
  fns = {n: _variant(n, args) for n in names}
  for fn, extra in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*inputs, *extra))
  if trl is not None:
    trl(op="run")  # warm up
  wall = {n: [] for n in names + (["trl"] if trl else [])}
  cpu = {n: [] for n in wall}
  for _ in range(args.repeats):
    for n, (fn, extra) in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*inputs, *extra))
      wall[n].append(time.perf_counter() - w0)
      cpu[n].append(time.process_time() - c0)
    if trl is not None:
      reply = trl(op="run")
      wall["trl"].append(reply["seconds"])
      cpu["trl"].append(reply["cpu_seconds"])
  del fns
  return wall, cpu


def _ratio(a, b):
  return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _machine():
  return (
    f"{platform.platform()}; {platform.processor() or platform.machine()}"
    f"; os.cpu_count()={os.cpu_count()}; jax {jax.__version__} "
    f"({jax.default_backend()}); XLA_FLAGS={os.environ.get('XLA_FLAGS')}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="B=2 T=256 D=128, V=4096 and 16384"
  )
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--vocabs", default="32768,131072")
  parser.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--configs",
    default="",
    help="extra fused tiles 'chunk:vocab_chunk[:dense_rows],...'",
  )
  parser.add_argument(
    "--no-naive",
    action="store_true",
    help="skip the naive variant (tile sweeps)",
  )
  parser.add_argument(
    "--rss",
    action="store_true",
    help="also measure RSS growth, one subprocess each",
  )
  parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--trl-worker", action="store_true", help="internal")
  parser.add_argument(
    "--no-trl", action="store_true", help="skip TRL's chunked log-prob"
  )
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()
  if args.trl_worker:
    return _trl_worker()
  if args.rss_child:
    return _rss_child(args)
  if args.quick:
    args.batch, args.length, args.width = 2, 256, 128
    if args.vocabs == "32768,131072":
      args.vocabs = "4096,16384"
  names = ["fused", "fused:tiles"] + ([] if args.no_naive else ["naive"])
  names += ["floor", "floor_vjp"]
  names += [f"fused:{c}" for c in args.configs.split(",") if c]
  print(f"machine: {_machine()}")
  print(
    "load average at start (1, 5, 15 min): "
    + ", ".join(f"{x:.1f}" for x in os.getloadavg())
  )
  print(
    f"fused defaults: chunk_size={ops.FUSED_DEFAULT_CHUNK_SIZE}, "
    f"vocab_chunk_size={ops.FUSED_DEFAULT_VOCAB_CHUNK_SIZE}; "
    f"{args.repeats} interleaved rounds; float32"
  )
  trl, workdir = None, None
  if args.no_trl:
    print("trl: skipped (--no-trl)")
  elif args.repeats == 0:
    print("trl: skipped (memory-only mode)")
  elif not _ORACLE_PYTHON.exists():
    print(f"trl: skipped ({_ORACLE_PYTHON} not found)")
  else:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_logprobs_"))
    trl = _TrlClient()
  results = dict(machine=_machine(), args=vars(args), rows=[])
  try:
    _run(args, names, trl, workdir, results)
  finally:
    if trl is not None:
      trl.close()
      shutil.rmtree(workdir, ignore_errors=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


def _run(args, names, trl, workdir, results):
  """The tables, one per vocabulary size (``trl``: `_TrlClient` or None)."""
  for vocab in (int(v) for v in args.vocabs.split(",")):
    args.vocab = vocab
    inputs = _inputs(args.batch, args.length, args.width, vocab)
    print(
      f"\nB={args.batch} T={args.length} D={args.width} V={vocab} "
      f"(logits {args.batch * args.length * vocab * 4 / 2**30:.2f} GiB)"
    )
    mem = {n: _compiled_bytes(n, args, inputs) for n in names}
    rss = {n: _rss_bytes(n, args) for n in names} if args.rss else {}
    if trl is not None:
      _write_inputs(inputs, workdir)
      info = trl(op="load", dir=str(workdir))
      results["trl"] = info
      print(
        f"trl {info['trl']} (torch {info['torch']}, "
        f"{info['threads']} threads): ChunkedLogProbFunction, vocabulary "
        f"tiles {info['chunk_size']}, token tiles "
        f"{info['token_chunk_size']}, Triton "
        f"{'yes' if info['triton'] else 'no (torch fallback)'}"
      )
      if "fused" not in rss:
        rss["fused"] = _rss_bytes("fused", args)
      rss["trl"] = _trl_rss_bytes(workdir)
    if args.repeats == 0:  # memory only
      print(
        f"{'variant':<22}{'temp+out MiB':>13}{'RSS+ MiB':>10}"
        f"{'mem/naive':>10}{'RSS/naive':>10}"
      )
      for n in names:
        row = f"{n:<22}{mem[n] / 2**20:>13.0f}"
        row += f"{rss[n] / 2**20:>10.0f}" if rss else f"{'':>10}"
        if "naive" in mem:
          row += f"{mem[n] / mem['naive']:>10.3f}"
          if rss:
            row += f"{rss[n] / max(rss['naive'], 1):>10.3f}"
        print(row, flush=True)
      continue
    wall, cpu = _time(names, args, inputs, trl)
    shown = names + (["trl"] if trl else [])
    head = (
      f"{'variant':<22}{'temp+out MiB':>13}"
      + (f"{'RSS+ MiB':>10}" if rss else "")
      + f"{'wall s':>9}{'cpu s':>9}{'mem/naive':>10}"
      f"{'t/naive':>9}{'t/floor':>9}{'cpu/naive':>10}{'cpu/floor':>10}"
    )
    print(head)
    print("-" * len(head))
    for n in shown:
      row = f"{n:<22}" + (
        f"{mem[n] / 2**20:>13.0f}" if n in mem else f"{'-':>13}"
      )
      if rss:
        row += f"{rss[n] / 2**20:>10.0f}" if n in rss else f"{'-':>10}"
      row += (
        f"{statistics.median(wall[n]):>9.2f}{statistics.median(cpu[n]):>9.2f}"
      )
      if "naive" in mem:
        row += (
          f"{mem[n] / mem['naive']:>10.3f}" if n in mem else f"{'-':>10}"
        ) + f"{_ratio(wall[n], wall['naive']):>9.2f}"
      else:
        row += f"{'':>10}{'':>9}"
      row += f"{_ratio(wall[n], wall['floor']):>9.2f}"
      if "naive" in mem:
        row += f"{_ratio(cpu[n], cpu['naive']):>10.2f}"
      else:
        row += f"{'':>10}"
      row += f"{_ratio(cpu[n], cpu['floor']):>10.2f}"
      print(row, flush=True)
      results["rows"].append(
        dict(
          vocab=vocab,
          variant=n,
          temp_out_bytes=mem.get(n),
          rss_bytes=rss.get(n),
          wall_s=statistics.median(wall[n]),
          cpu_s=statistics.median(cpu[n]),
          wall_over_naive=_ratio(wall[n], wall["naive"])
          if "naive" in wall
          else None,
          wall_over_floor=_ratio(wall[n], wall["floor"]),
          wall_over_fused=_ratio(wall[n], wall["fused"]),
          cpu_over_fused=_ratio(cpu[n], cpu["fused"]),
          rounds=args.repeats,
        )
      )
    if trl is not None:
      trl(op="save")
      diff = _trl_agreement(inputs, workdir)
      results.setdefault("trl_agreement", {})[str(vocab)] = diff
      print(
        "trl ÷ fused (interleaved): wall "
        f"{_ratio(wall['trl'], wall['fused']):.2f}, CPU "
        f"{_ratio(cpu['trl'], cpu['fused']):.2f}; RSS growth trl "
        f"{rss['trl'] / 2**20:.0f} MiB vs fused {rss['fused'] / 2**20:.0f} MiB"
        " (memory differs by framework: XLA temp+out is not defined for "
        "torch; RSS growth is measured the same way on both)"
      )
      print(
        "trl vs ours, max abs diff: log-probs "
        f"{diff['logps']:.2e} (max |logp| {diff['logps_scale']:.1f}), "
        f"grad hidden {diff['grad_hidden']:.2e} (max "
        f"{diff['grad_hidden_scale']:.2e}), grad W {diff['grad_w']:.2e} "
        f"(max {diff['grad_w_scale']:.2e})",
        flush=True,
      )
  print(
    "\nload average at end (1, 5, 15 min): "
    + ", ".join(f"{x:.1f}" for x in os.getloadavg())
  )


if __name__ == "__main__":
  main()
