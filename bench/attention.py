r"""Dense vs blockwise (FlashAttention-style) attention: memory and time.

Two measurements, each printed with the blockwise/dense ratio:

1. The attention of the ``small`` preset alone (``H = 8`` query heads,
   ``KV = 4`` key/value heads, head dim ``N = 64``), ``B = 4`` rows, a
   causal mask, at ``L`` in ``--lengths``: one training step of it,
   ``jax.value_and_grad`` of ``sum(attention(q, k, v) * c)`` w.r.t. q, k and
   v, jitted. ``dense`` is ``ops.dense_attention`` (the model's
   ``attention_impl="dense"``: ``[B, KV, G, L, L]`` float32 scores),
   ``blockwise`` is ``ops.blockwise_attention`` with the model's default
   tiles (``ModelConfig.attention_q_block x attention_kv_block``).
   Memory is XLA's compiled ``memory_analysis()`` temp bytes (the inputs
   and outputs are not counted). Time is the median over ``--rounds``
   rounds that run dense and blockwise once each in turn (a shared
   machine's drift hits both alike); the ratio is the median of the
   per-round ratios.

2. With ``--dpo``, a full DPO train step of the ``small`` preset (policy +
   frozen reference forward, backward, AdamW: ``bench/ours.py``'s
   ``build``, the step ``bench/run_all.py`` measures as ``dpo_long``),
   2 pairs at ``L = 1024`` (prompt 64 + completion 959 + EOS), once per
   ``attention_impl`` in a fresh subprocess. Reported: the process's peak
   RSS (``ru_maxrss``: imports, model, compilation and the steps, the
   figure ``run_all.py`` compares with TRL), the RSS growth during one
   already-compiled step (Linux ``VmHWM`` reset via
   ``/proc/self/clear_refs``) and that step's wall time.

  python bench/attention.py                        # L = 128 512 1024 2048
  python bench/attention.py --lengths 256 --rounds 5
  python bench/attention.py --dpo                  # + full DPO step (slow)
  python bench/attention.py --q-block 256 --kv-block 256   # tile sweep
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _protocol  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alignment import models, ops  # noqa: E402

MIB = 2**20


def _inputs(batch, length, config, seed=0):
  rng = np.random.default_rng(seed)
  kv, n = config.n_kv_heads, config.head_dim
  group = config.n_heads // kv
  normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
  q = normal(batch, kv, group, length, n)
  k, v = normal(batch, kv, length, n), normal(batch, kv, length, n)
  idx = np.arange(length)
  allowed = np.broadcast_to(idx[:, None] >= idx[None], (batch, length, length))
  c = normal(batch, kv, group, length, n)
  return q, k, v, jnp.asarray(allowed), c


def _step(attention):
  def loss(q, k, v, allowed, c):
    return jnp.sum(attention(q, k, v, allowed) * c)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def attention_table(args):
  config = models.get_preset("small")
  q_block = args.q_block or config.attention_q_block
  kv_block = args.kv_block or config.attention_kv_block
  variants = {
    "dense": ops.dense_attention,
    "blockwise": lambda q, k, v, a: ops.blockwise_attention(
      q, k, v, a, q_block=q_block, kv_block=kv_block
    ),
  }
  print(
    f"small preset attention (H={config.n_heads}, KV={config.n_kv_heads}, "
    f"N={config.head_dim}), B={args.batch}, causal; blockwise tiles "
    f"{q_block} x {kv_block}; value_and_grad w.r.t. q, k, v"
  )
  header = (
    f"{'L':>6} {'dense MiB':>10} {'block MiB':>10} {'mem ratio':>10} "
    f"{'dense ms':>10} {'block ms':>10} {'time ratio':>11}"
  )
  print(header)
  rows = []
  for length in args.lengths:
    inputs = _inputs(args.batch, length, config)
    compiled, temp = {}, {}
    for name, fn in variants.items():
      compiled[name] = _step(fn).lower(*inputs).compile()
      temp[name] = compiled[name].memory_analysis().temp_size_in_bytes
      jax.block_until_ready(compiled[name](*inputs))  # warm-up
    times = {name: [] for name in variants}
    ratios = []
    for _ in range(args.rounds):
      for name in variants:
        start = time.perf_counter()
        jax.block_until_ready(compiled[name](*inputs))
        times[name].append(time.perf_counter() - start)
      ratios.append(times["blockwise"][-1] / times["dense"][-1])
    ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    row = dict(
      length=length,
      dense_temp_mib=temp["dense"] / MIB,
      blockwise_temp_mib=temp["blockwise"] / MIB,
      memory_ratio=temp["blockwise"] / temp["dense"],
      dense_ms=ms["dense"],
      blockwise_ms=ms["blockwise"],
      time_ratio=statistics.median(ratios),
    )
    rows.append(row)
    print(
      f"{length:>6} {row['dense_temp_mib']:>10.1f} "
      f"{row['blockwise_temp_mib']:>10.1f} {row['memory_ratio']:>10.3f} "
      f"{row['dense_ms']:>10.1f} {row['blockwise_ms']:>10.1f} "
      f"{row['time_ratio']:>11.3f}",
      flush=True,
    )
  return rows


def _dpo_child(impl, warmup):
  """In a subprocess: one small-preset DPO step with ``attention_impl``."""
  import ours  # noqa: PLC0415

  spec = ours.spec_for(
    "dpo",
    "small",
    batch=2,
    prompt_len=64,
    completion_len=959,
    model_overrides={"attention_impl": impl},
  )
  built = ours.build(spec)
  for _ in range(warmup):  # compiles
    built.step()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _protocol.proc_status_kib("VmRSS")
  start = time.perf_counter()
  built.step()
  seconds = time.perf_counter() - start
  out = dict(
    impl=impl,
    step_s=seconds,
    step_rss_growth_mib=(_protocol.proc_status_kib("VmHWM") - before) / 1024,
    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  )
  print(json.dumps(out))


def dpo_table(args):
  print(
    "\nsmall-preset DPO train step, 2 pairs x L=1024 (4 sequences), "
    "fresh process per attention_impl"
  )
  rows = {}
  for impl in ("dense", "blockwise"):
    cmd = [sys.executable, __file__, "--dpo-child", impl]
    cmd += ["--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
      print(out.stderr[-3000:])
      raise SystemExit(f"DPO child {impl} failed")
    rows[impl] = json.loads(out.stdout.strip().splitlines()[-1])
  d, b = rows["dense"], rows["blockwise"]
  print(f"{'':>22} {'dense':>10} {'blockwise':>10} {'ratio':>8}")
  for key, label in (
    ("peak_rss_mib", "peak RSS MiB"),
    ("step_rss_growth_mib", "step RSS growth MiB"),
    ("step_s", "step s"),
  ):
    print(
      f"{label:>22} {d[key]:>10.1f} {b[key]:>10.1f} {b[key] / d[key]:>8.3f}"
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048]
  )
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--q-block", type=int, default=0, help="0: default")
  parser.add_argument("--kv-block", type=int, default=0, help="0: default")
  parser.add_argument("--dpo", action="store_true", help="full DPO step")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--json", default="", help="write the results here")
  parser.add_argument("--dpo-child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.dpo_child:
    return _dpo_child(args.dpo_child, args.warmup)
  results = {
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "cpus": os.cpu_count(),
    "attention": attention_table(args) if args.lengths else [],
  }
  if args.dpo:
    results["dpo"] = dpo_table(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
