r"""Decode throughput of the KV-cache sampler, on CPU.

Three ways to generate ``T`` greedy tokens after ``P = 16`` prompt tokens,
for batch ``B`` in {1, 32} and ``T`` in {128, 512}:

* ``cache``: `alignment.sampling.Sampler` (prefill, then ``while_loop``s
  of one-token decode steps against the KV cache, which grows in segments
  of 128, 256, 512 new tokens: the default ``cache_segment=128``);
* ``no-cache``: a jitted loop that recomputes a full forward over the prefix
  at every step and takes the argmax at its last position (the prefix is
  rounded up to a power of two, via ``lax.switch``, so its cost grows with
  the position as recomputation's does);
* ``hf``: transformers' ``LlamaForCausalLM.generate`` (greedy, its default
  dynamic KV cache, float32, ``torch.inference_mode``), from the oracle venv
  (``.venv-oracle``), in a subprocess that loads the *same weights*: our
  model is exported with `alignment.models.export_hf_checkpoint`, so the
  two greedy outputs are compared too (``agree``: fraction of generated
  tokens equal to ours, position by position, first row);
* ``tunix``: Tunix's ``tunix.generate.sampler.Sampler`` (greedy, KV cache
  of ``P + T`` slots, float32) on Tunix's own ``Llama3`` model, loaded from
  the same exported checkpoint with Tunix's safetensors loader, from
  ``.venv-tunix`` (``bench/peers/tunix_sampler_worker.py``, a persistent
  subprocess under the same XLA flags as ours); its outputs are compared
  with ours the same way. Skipped, with the reason printed, when the venv
  is missing or with ``--no-tunix``.

EOS is disabled on every side (``eos_id=-1`` here, ``eos_token_id=None``
there, an id outside the vocabulary for Tunix), so every run produces
exactly ``B·T`` tokens. Time is wall time of the whole call (prefill
included, compile excluded), in rounds that run ``cache``, ``hf`` and
``tunix`` in turn (A B C A B C ...); ratios are medians of per-round
ratios, so slow drift of a shared machine cancels. ``hf`` runs under glibc
malloc and, when ``libjemalloc.so.2`` is found, also under jemalloc
(``LD_PRELOAD``); ratios are against the faster of the two. ``no-cache``
runs once per cell (``--no-cache-budget`` skips cells predicted to take
longer; the prediction is printed instead, marked ``~``). All sides run
on one thread by default (``--threads``: ``torch.set_num_threads``, and
XLA's Eigen pool off, also in the Tunix worker): on a loaded machine
two-thread torch ``generate`` ran about ten times slower than one-thread.
The ratio of process CPU times is printed too; timesharing with other jobs
disturbs it less than wall time.

A second table times the cost of one decode step (process CPU time) at
prefix positions {16, 64, 128, 256, 512}, batch 32: ``S=528`` is a step
against a cache of 528 slots (what a single-segment sampler allocates for
T = 512) filled up to the position (a ``fori_loop`` of 16 steps, divided
by 16); ``S=position+16`` the same against the smallest cache that fits
(about what the segmented sampler uses); ``no-cache`` is one full forward
over exactly that prefix. The cache works if a step's cost does not grow
with the position at a fixed cache size (first column), and the attention
over empty slots is what the second column saves.

Configurations (Llama layout, byte vocabulary V = 260, tied embeddings):
``tiny`` is the tiny preset (D 64, 2 layers, d_ff 128), dominated by
per-step overheads; ``d256`` is D 256, 4 layers, 4 heads (2 KV), head dim
64, d_ff 704 (3.0M parameters), small but not trivial. Both use RoPE base
1e6 (``rope_theta``), the base Tunix 0.1.7's ``Llama3`` applies whatever
its config says, so that all sides compute the same function (the base
does not change the cost).

  python bench/sampling.py             # both configs, full grid
  python bench/sampling.py --quick     # tiny only, T in {32, 64}, 1 round
  python bench/sampling.py --configs d256 --rounds 5
  python bench/sampling.py --threads 2   # both sides on two threads
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_ORACLE_PYTHON = _ROOT / ".venv-oracle" / "bin" / "python"
_TUNIX_PYTHON = _ROOT / ".venv-tunix" / "bin" / "python"
_TUNIX_WORKER = _ROOT / "bench" / "peers" / "tunix_sampler_worker.py"
_JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
_PROMPT_LEN = 16
_POSITIONS = (16, 64, 128, 256, 512)
_STEPS_PER_TIMING = 16

# rope_theta 1e6: Tunix 0.1.7's Llama3 ignores its config's rope_theta and
# always uses 1e6 (see bench/peers/tunix_sampler_worker.py).
_CONFIGS = {
  "tiny": dict(max_len=2048, init_std=0.2, rope_theta=1e6),
  "d256": dict(
    rope_theta=1e6,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    d_ff=704,
    max_len=2048,
    init_std=0.1,
  ),
}


# --------------------------------------------------------------------------
# transformers side: runs in the oracle venv, imports torch only.
# --------------------------------------------------------------------------


def _hf_worker(threads):
  """Serves ``generate`` requests (one JSON line each) on stdin/stdout."""
  import torch  # noqa: PLC0415
  from transformers import LlamaForCausalLM  # noqa: PLC0415

  torch.set_num_threads(threads)

  models = {}
  for line in sys.stdin:
    req = json.loads(line)
    if req["model_dir"] not in models:
      model = LlamaForCausalLM.from_pretrained(
        req["model_dir"], dtype=torch.float32
      ).eval()
      model.generation_config.eos_token_id = None
      models[req["model_dir"]] = model
    model = models[req["model_dir"]]
    prompts = torch.tensor(req["prompts"], dtype=torch.long)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
      out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=req["new_tokens"],
        pad_token_id=req["pad_id"],
      )
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    new = out[:, prompts.shape[1] :]
    assert new.shape[1] == req["new_tokens"], new.shape
    reply = dict(
      seconds=seconds,
      cpu_seconds=cpu,
      first_row=new[0].tolist(),
      threads=torch.get_num_threads(),
      versions=dict(
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
      ),
    )
    print(json.dumps(reply), flush=True)


class _HfClient:
  """A persistent worker process in the oracle venv."""

  def __init__(self, allocator: str, threads: int):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("LD_PRELOAD", None)
    if allocator == "jemalloc":
      env["LD_PRELOAD"] = _JEMALLOC
      env.setdefault("MALLOC_CONF", "retain:true,background_thread:true")
    self.allocator = allocator
    self.proc = subprocess.Popen(
      [str(_ORACLE_PYTHON), __file__, "--hf-worker", f"--threads={threads}"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      text=True,
    )

  def generate(self, model_dir, prompts, new_tokens, pad_id):
    req = dict(
      model_dir=str(model_dir),
      prompts=prompts.tolist(),
      new_tokens=new_tokens,
      pad_id=pad_id,
    )
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"transformers worker ({self.allocator}) died")
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


class _TunixClient:
  """A persistent Tunix sampler worker in ``.venv-tunix``."""

  allocator = "tunix"

  def __init__(self):
    env = dict(os.environ)  # the same XLA_FLAGS (threads) as ours
    env.pop("LD_PRELOAD", None)
    self.proc = subprocess.Popen(
      [str(_TUNIX_PYTHON), str(_TUNIX_WORKER)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      text=True,
    )

  def generate(self, model_dir, prompts, new_tokens, pad_id=None):
    del pad_id  # the worker pads with an id outside the vocabulary
    req = dict(
      model_dir=str(model_dir), prompts=prompts.tolist(), new_tokens=new_tokens
    )
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("Tunix worker died")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"Tunix sampler: {reply['error']}")
    return reply

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _tunix_client(args):
  """`_TunixClient`, or None with the reason printed."""
  if args.no_tunix:
    print("tunix side: skipped (--no-tunix)", flush=True)
    return None
  if not _TUNIX_PYTHON.exists():
    print(f"tunix side: skipped ({_TUNIX_PYTHON} not found)", flush=True)
    return None
  return _TunixClient()


# --------------------------------------------------------------------------
# JAX side.
# --------------------------------------------------------------------------


def _build(name):
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from alignment.models import build_model, get_preset  # noqa: PLC0415

  config = get_preset("tiny", **_CONFIGS[name])
  model = nnx.eval_shape(
    lambda: build_model("causal_lm", config, rngs=nnx.Rngs(0))
  )
  graphdef, _ = nnx.split(model)
  state = jax.jit(
    lambda: nnx.state(build_model("causal_lm", config, rngs=nnx.Rngs(0)))
  )()
  return config, nnx.merge(graphdef, state)


def _buckets(length):
  sizes, size = [], 32
  while True:
    sizes.append(size)
    if size >= length:
      return sizes
    size *= 2


def _no_cache_generate(graphdef, rest, new_tokens):
  """Jitted greedy loop recomputing the prefix forward at every step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  @jax.jit
  def generate(params, prompts):
    model = nnx.merge(graphdef, params, rest)
    b, p = prompts.shape
    sizes = _buckets(p + new_tokens)
    buf = jnp.zeros((b, sizes[-1]), jnp.int32).at[:, :p].set(prompts)
    w = model.unembedding()

    def branch(size):
      def run(buf, last):
        hidden = model.hidden(buf[:, :size])
        h = jax.lax.dynamic_index_in_dim(hidden, last, axis=1, keepdims=False)
        logits = jnp.einsum(
          "bd,dv->bv", h, w, preferred_element_type=jnp.float32
        )
        return jnp.argmax(logits, -1).astype(jnp.int32)

      return run

    branches = [branch(s) for s in sizes]
    limits = jnp.asarray(sizes, jnp.int32)

    def step(t, buf):
      length = p + t  # tokens known so far
      index = jnp.sum((limits < length).astype(jnp.int32))
      token = jax.lax.switch(index, branches, buf, length - 1)
      return jax.lax.dynamic_update_slice(buf, token[:, None], (0, length))

    buf = jax.lax.fori_loop(0, new_tokens, step, buf)
    return buf[:, p : p + new_tokens]

  return generate


def _decode_step_timer(graphdef, rest, batch, slots):
  """Jitted: ``_STEPS_PER_TIMING`` cached decode steps from a given fill."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  def prefill(params, prompts):
    model = nnx.merge(graphdef, params, rest)
    cache = model.init_cache(batch, slots)
    hidden, cache = model.hidden(prompts, cache=cache)
    return hidden[:, -1], cache

  def steps(params, h, cache):
    model = nnx.merge(graphdef, params, rest)
    w = model.unembedding()

    def body(_, carry):
      h, cache = carry
      token = jnp.argmax(h @ w, -1).astype(jnp.int32)
      hidden, cache = model.hidden(token[:, None], cache=cache, decode=True)
      return hidden[:, 0], cache

    return jax.lax.fori_loop(0, _STEPS_PER_TIMING, body, (h, cache))

  return jax.jit(prefill), jax.jit(steps, donate_argnums=(2,))


def _time(fn):
  """``(wall seconds, process CPU seconds, result)`` of ``fn()``."""
  import jax  # noqa: PLC0415

  start, cpu = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, time.process_time() - cpu, out


def _agree(a, b):
  a, b = list(a), list(b)
  return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _median_ratio(num, den):
  return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _throughput_table(
  name, config, model, args, clients, tunix, workdir, results
):
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from alignment.models import export_hf_checkpoint  # noqa: PLC0415
  from alignment.sampling import Sampler  # noqa: PLC0415

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  model_dir = export_hf_checkpoint(model, config, workdir / name)
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  no_cache_rate = {}  # batch -> seconds per unit of prefix work
  for batch in args.batches:
    prompts = rng.integers(0, 256, (batch, _PROMPT_LEN)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    for new in args.new_tokens:
      sampler = Sampler(
        graphdef, rest, max_new_tokens=new, eos_id=-1, pad_id=config.pad_id
      )

      def cache_run(sampler=sampler, prompts=prompts, mask=mask):
        return sampler.generate(params, prompts, mask, key, greedy=True)

      compile_s, _, out = _time(cache_run)
      ours = np.asarray(out.completion_tokens[0])
      for c in clients:  # warm-up (first-call costs)
        c.generate(model_dir, prompts, 4, config.pad_id)
      tunix_compile_s, tunix_error = None, None
      if tunix is not None:  # compiles per (B, P, T): warm up the full call
        try:
          tunix_compile_s = tunix.generate(model_dir, prompts, new)["seconds"]
        except RuntimeError as e:
          tunix_error = str(e)
          print(f"  tunix B={batch} T={new}: not run: {e}", flush=True)
      peers = list(clients)
      if tunix is not None and tunix_error is None:
        peers.append(tunix)
      wall = {"cache": [], **{c.allocator: [] for c in peers}}
      cpu = {k: [] for k in wall}
      agree = {}
      for _ in range(args.rounds):  # A B C A B C ...
        seconds, cpu_seconds, _ = _time(cache_run)
        wall["cache"].append(seconds)
        cpu["cache"].append(cpu_seconds)
        for c in peers:
          reply = c.generate(model_dir, prompts, new, config.pad_id)
          wall[c.allocator].append(reply["seconds"])
          cpu[c.allocator].append(reply["cpu_seconds"])
          agree[c.allocator] = _agree(ours, reply["first_row"])
          if c is tunix:
            results["tunix_versions"] = reply["versions"] | dict(
              rope_theta=reply["rope_theta"]
            )
          else:
            results["hf_versions"] = reply["versions"] | dict(
              threads=reply["threads"]
            )
      hf = [c.allocator for c in clients]
      best = min(hf, key=lambda k: statistics.median(wall[k]))
      row = dict(
        config=name,
        batch=batch,
        new_tokens=new,
        compile_s=compile_s,
        tok_s={k: batch * new / statistics.median(v) for k, v in wall.items()},
        cpu_tok_s={
          k: batch * new / statistics.median(v) for k, v in cpu.items()
        },
        hf_best=best,
        cache_over_hf=_median_ratio(wall[best], wall["cache"]),
        cache_over_hf_cpu=_median_ratio(cpu[best], cpu["cache"]),
        agree=agree[best],
        rounds=args.rounds,
      )
      if "tunix" in wall:
        row.update(
          tunix_compile_s=tunix_compile_s,
          cache_over_tunix=_median_ratio(wall["tunix"], wall["cache"]),
          cache_over_tunix_cpu=_median_ratio(cpu["tunix"], cpu["cache"]),
          agree_tunix=agree["tunix"],
        )
      elif tunix_error is not None:
        row["tunix_error"] = tunix_error
      # No-cache: one timed run, unless predicted (from the previous cell of
      # this batch, scaled by the prefix work) to exceed the budget.
      work = sum(
        min(s for s in _buckets(_PROMPT_LEN + new) if s >= n)
        for n in range(_PROMPT_LEN, _PROMPT_LEN + new)
      )
      predicted = no_cache_rate.get(batch, 0.0) * work
      if predicted > args.no_cache_budget:
        seconds, measured = predicted, False
      else:
        fn = _no_cache_generate(graphdef, rest, new)
        _time(lambda fn=fn, p=prompts: fn(params, p))  # compile
        seconds, _, toks = _time(lambda fn=fn, p=prompts: fn(params, p))
        np.testing.assert_array_equal(toks, out.completion_tokens)
        no_cache_rate[batch] = seconds / work
        measured = True
      row["tok_s"]["no-cache"] = batch * new / seconds
      row["no_cache_measured"] = measured
      row["cache_over_no_cache"] = row["tok_s"]["cache"] / (
        batch * new / seconds
      )
      results["throughput"].append(row)
      _print_row(row)


def _position_table(name, model, args):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = max(args.batches)
  full_slots = max(_POSITIONS) + _STEPS_PER_TIMING
  rng = np.random.default_rng(1)
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest).hidden(t)[:, -1])
  out = []
  for pos in _POSITIONS:
    prompts = jnp.asarray(rng.integers(0, 256, (batch, pos)), jnp.int32)
    row = dict(config=name, batch=batch, position=pos)
    for label, slots in (("cache_ms", full_slots), ("fit_ms", pos + 16)):
      prefill, steps = _decode_step_timer(graphdef, rest, batch, slots)
      jax.block_until_ready(steps(params, *prefill(params, prompts)))
      per_step = []
      for _ in range(args.rounds):
        h, cache = jax.block_until_ready(prefill(params, prompts))
        _, cpu_seconds, _ = _time(
          lambda h=h, c=cache, steps=steps: steps(params, h, c)
        )
        per_step.append(cpu_seconds / _STEPS_PER_TIMING)
      row[label] = 1e3 * statistics.median(per_step)
    jax.block_until_ready(forward(params, prompts))  # compile
    row["no_cache_ms"] = 1e3 * statistics.median(
      _time(lambda p=prompts: forward(params, p))[1] for _ in range(args.rounds)
    )
    out.append(row)
    print(
      f"  {name:5s} B={batch:<3d} position {pos:4d}: cache "
      f"{row['cache_ms']:7.3f} ms (S={full_slots})  {row['fit_ms']:7.3f} ms "
      f"(S=position+16)  no-cache {row['no_cache_ms']:8.3f} ms  per step",
      flush=True,
    )
  return out


def _print_row(row):
  t = row["tok_s"]
  hf = "  ".join(
    f"hf[{k}] {t[k]:8.0f}"
    for k in sorted(t)
    if k not in ("cache", "no-cache", "tunix")
  )
  tunix = ""
  if "tunix" in t:
    tunix = (
      f"\n        tunix {t['tunix']:8.0f} tok/s | cache/tunix "
      f"{row['cache_over_tunix']:5.2f}x (CPU time "
      f"{row['cache_over_tunix_cpu']:5.2f}x)  agree {row['agree_tunix']:.2f}"
      f"  (tunix compile+first call {row['tunix_compile_s']:.1f} s)"
    )
  mark = " " if row["no_cache_measured"] else "~"
  print(
    f"  {row['config']:5s} B={row['batch']:<3d} T={row['new_tokens']:<4d} "
    f"tok/s: cache {t['cache']:8.0f}  {hf}  no-cache {mark}{t['no-cache']:7.0f}"
    f"  | cache/hf {row['cache_over_hf']:5.2f}x (CPU time "
    f"{row['cache_over_hf_cpu']:5.2f}x)  cache/no-cache "
    f"{mark}{row['cache_over_no_cache']:6.1f}x  agree {row['agree']:.2f}"
    + tunix,
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hf-worker", action="store_true", help="internal")
  parser.add_argument("--configs", default="tiny,d256")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--new-tokens", default="128,512")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="intra-op threads on both sides (torch.set_num_threads; XLA's "
    "Eigen pool is disabled when 1)",
  )
  parser.add_argument(
    "--no-cache-budget",
    type=float,
    default=60.0,
    help="skip no-cache cells predicted to take longer (seconds)",
  )
  parser.add_argument("--no-positions", action="store_true")
  parser.add_argument(
    "--no-tunix", action="store_true", help="skip the Tunix sampler side"
  )
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args()
  if args.hf_worker:
    _hf_worker(args.threads)
    return
  if args.threads == 1:  # before JAX is imported
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
      " intra_op_parallelism_threads=1"
    )
  if args.quick:
    args.configs, args.new_tokens, args.rounds = "tiny", "32,64", 1
  args.configs = args.configs.split(",")
  args.batches = [int(b) for b in args.batches.split(",")]
  args.new_tokens = [int(t) for t in args.new_tokens.split(",")]

  import jax  # noqa: PLC0415

  allocators = ["glibc"] + (["jemalloc"] if os.path.exists(_JEMALLOC) else [])
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs ({platform.machine()}), threads {args.threads}, "
    f"load average {os.getloadavg()[0]:.1f}, this process LD_PRELOAD="
    f"{os.environ.get('LD_PRELOAD', '-')}; transformers under {allocators}",
    flush=True,
  )
  clients = [_HfClient(a, args.threads) for a in allocators]
  tunix = _tunix_client(args)
  results = {"throughput": [], "positions": [], "args": vars(args)}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      for name in args.configs:
        config, model = _build(name)
        print(f"\n{name}: {config.num_params() / 1e6:.2f}M params", flush=True)
        _throughput_table(
          name,
          config,
          model,
          args,
          clients,
          tunix,
          pathlib.Path(tmp),
          results,
        )
        if not args.no_positions:
          results["positions"] += _position_table(name, model, args)
  finally:
    for c in clients + ([tunix] if tunix is not None else []):
      c.close()
  print(f"\ntransformers side: {results.get('hf_versions')}")
  print(f"tunix side: {results.get('tunix_versions')}")
  print(f"load average at the end: {os.getloadavg()[0]:.1f}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
