r"""Fused (chunked) vs naive per-token log-probs: memory and fwd+bwd time.

Compares, for ``hidden [B, T, D]``, ``unembedding [D, V]``, ``targets``:

* ``naive``: ``ops.token_logps(hidden @ W, targets)`` (materialises
  ``[B, T, V]`` logits, and their gradient in the backward pass);
* ``fused``: ``ops.fused_token_logps(hidden, W, targets)`` (tiles of
  ``chunk_size x vocab_chunk_size``, recomputed in the backward pass);
* ``floor``: the matmul work that any implementation must do, the forward
  ``[B·T, D] x [D, V]`` product and the two backward products with a given
  cotangent ``G [B·T, V]``: ``sum(h @ W * G)`` (XLA fuses the product into
  the reduction, so it is never written out), ``G @ W.T`` and ``h.T @ G``
  (``h.T`` passed in pre-transposed: the fast matmul path on XLA:CPU);
* ``floor_vjp``: the same three products as ``jax.value_and_grad`` of
  ``sum(h @ W * G)`` compiles them (XLA:CPU takes the transposed-operand
  ``h.T @ G`` through a slower path).

Each variant is ``jax.value_and_grad`` of ``sum(c * logps)`` w.r.t. hidden
and W, jitted. Memory is XLA's compiled ``memory_analysis()`` (temp +
output bytes; the inputs are not counted) and, with ``--rss`` (Linux), the
peak RSS of a fresh subprocess per variant during one run of the already
compiled function, minus its RSS before that run.
Time is measured in rounds that run every variant once in turn
(A B C A B C ...); the table shows medians of wall time and of process CPU
time (all threads), and the ratios are medians of the per-round wall-time
ratios, so slow drift of a shared machine cancels.

  python bench/logprobs.py            # B=4 T=1024 D=512, V=32768 and 131072
  python bench/logprobs.py --quick    # small sizes, seconds
  python bench/logprobs.py --configs 1024:4096,512:None   # tile sweep
  python bench/logprobs.py --rss --repeats 0   # memory only
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignment import ops


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
  else:  # "fused" or "fused:<chunk>:<vocab_chunk>"
    kwargs = {}
    if name != "fused":
      _, chunk, vocab_chunk = name.split(":")
      kwargs = dict(
        chunk_size=int(chunk),
        vocab_chunk_size=None if vocab_chunk == "None" else int(vocab_chunk),
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


def _proc_status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


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
  before = _proc_status_kib("VmRSS")
  jax.block_until_ready(compiled(*inputs, *extra))
  print(json.dumps({"rss_kib": _proc_status_kib("VmHWM") - before}))


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


def _time(names, args, inputs):
  fns = {n: _variant(n, args) for n in names}
  for fn, extra in fns.values():  # compile and warm up
    jax.block_until_ready(fn(*inputs, *extra))
  wall = {n: [] for n in names}
  cpu = {n: [] for n in names}
  for _ in range(args.repeats):
    for n, (fn, extra) in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*inputs, *extra))
      wall[n].append(time.perf_counter() - w0)
      cpu[n].append(time.process_time() - c0)
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
    "--configs", default="", help="extra fused tiles 'chunk:vocab_chunk,...'"
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
  args = parser.parse_args()
  if args.rss_child:
    return _rss_child(args)
  if args.quick:
    args.batch, args.length, args.width = 2, 256, 128
    if args.vocabs == "32768,131072":
      args.vocabs = "4096,16384"
  names = ["fused"] + ([] if args.no_naive else ["naive"])
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
  for vocab in (int(v) for v in args.vocabs.split(",")):
    args.vocab = vocab
    inputs = _inputs(args.batch, args.length, args.width, vocab)
    print(
      f"\nB={args.batch} T={args.length} D={args.width} V={vocab} "
      f"(logits {args.batch * args.length * vocab * 4 / 2**30:.2f} GiB)"
    )
    mem = {n: _compiled_bytes(n, args, inputs) for n in names}
    rss = {n: _rss_bytes(n, args) for n in names} if args.rss else {}
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
    wall, cpu = _time(names, args, inputs)
    head = (
      f"{'variant':<22}{'temp+out MiB':>13}"
      + (f"{'RSS+ MiB':>10}" if rss else "")
      + f"{'wall s':>9}{'cpu s':>9}{'mem/naive':>10}"
      f"{'t/naive':>9}{'t/floor':>9}{'cpu/naive':>10}{'cpu/floor':>10}"
    )
    print(head)
    print("-" * len(head))
    for n in names:
      row = f"{n:<22}{mem[n] / 2**20:>13.0f}"
      if rss:
        row += f"{rss[n] / 2**20:>10.0f}"
      row += (
        f"{statistics.median(wall[n]):>9.2f}{statistics.median(cpu[n]):>9.2f}"
      )
      if "naive" in mem:
        row += (
          f"{mem[n] / mem['naive']:>10.3f}"
          f"{_ratio(wall[n], wall['naive']):>9.2f}"
        )
      else:
        row += f"{'':>10}{'':>9}"
      row += f"{_ratio(wall[n], wall['floor']):>9.2f}"
      if "naive" in mem:
        row += f"{_ratio(cpu[n], cpu['naive']):>10.2f}"
      else:
        row += f"{'':>10}"
      row += f"{_ratio(cpu[n], cpu['floor']):>10.2f}"
      print(row, flush=True)
  print(
    "\nload average at end (1, 5, 15 min): "
    + ", ".join(f"{x:.1f}" for x in os.getloadavg())
  )


if __name__ == "__main__":
  main()
