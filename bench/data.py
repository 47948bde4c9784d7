r"""Input-pipeline throughput vs a tiny-model DPO train step (CPU).

For preference data it measures, in one process and in interleaved rounds
(pipeline, step, pipeline, step, ...; medians of per-round values, so the
drift of a shared machine cancels):

* ``pipeline``: examples/s through ``make_preference_iterator`` — array_record
  read + decode, tokenise, truncate, pad, batch (one Python thread);
* ``step``: examples/s of a jitted DPO train step of the ``tiny`` preset
  (``alignment.models``: 2 layers, d=64, byte vocabulary): policy forward +
  backward on chosen and rejected, frozen-reference forward, DPO loss, Adam;
* ``ratio = pipeline / step``: > 1 means the input pipeline keeps ahead of
  the step even when run serially on the same cores;
* ``overlap``: wall time per step of the loop ``batch = next(it); state =
  step(state, batch)`` (JAX dispatches the step asynchronously, so the next
  batch is built while it runs) relative to the step alone on a fixed batch:
  1.00 means the pipeline costs the loop nothing.

Two shapes: ``default`` is the default run's DPO stage (letters task, batch
32, prompts <= 8 and completions <= 9 tokens, L = 17); ``long`` is HH-like
text (prompts 100-900 bytes kept from the end, responses 50-600 bytes,
batch 8, 256 + 256 tokens, byte tokenizer).

  python bench/data.py               # both shapes, a few minutes
  python bench/data.py --quick       # fewer rounds
  taskset -c 0,1 python bench/data.py   # pin to 2 cores on a larger machine
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignment import losses, models
from alignment.data import pipeline, records
from alignment.data.tokenizer import ByteTokenizer
from alignment.trainers import preference as preference_trainer

_WORDS = (
  "the a reward model policy prefers answer question because step "
  "gradient value token data batch train loss human assistant what "
  "how why when please explain short long good bad"
).split()


def _text(rng, lo, hi):
  n = int(rng.integers(lo, hi))
  out = []
  while sum(len(w) + 1 for w in out) < n:
    out.append(_WORDS[int(rng.integers(len(_WORDS)))])
  return " ".join(out)[:n] or "x"


def _long_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    prompt = "\n\nHuman: " + _text(rng, 100, 900) + "\n\nAssistant: "
    rows.append(
      {
        "prompt": prompt,
        "chosen": _text(rng, 50, 600),
        "rejected": _text(rng, 50, 600),
      }
    )
  return rows


def _setting(name, root, rows):
  if name == "default":
    cfg = dict(
      source="synthetic",
      data_dir=root,
      max_prompt_len=8,
      max_completion_len=9,
      num_examples=rows,
    )
    return cfg, 32
  path = records.write_jsonl(_long_rows(rows), os.path.join(root, "l.jsonl"))
  cfg = dict(
    source="jsonl",
    path=str(path),
    data_dir=root,
    max_prompt_len=256,
    max_completion_len=256,
    prompt_truncation="keep_end",
  )
  return cfg, 8


def _make_step(batch_size, length):
  """Jitted DPO step of the tiny preset; returns (step, state)."""
  cfg = models.get_preset("tiny")
  model = models.build_model("causal_lm", cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ref = jax.tree.map(jnp.copy, params)
  tx = optax.adam(1e-4)

  def loss_fn(p, batch):
    lc, lr, _, _ = preference_trainer.paired_logps(
      nnx.merge(graphdef, p, rest), batch, chunk_size=2048
    )
    rc, rr, _, _ = preference_trainer.paired_logps(
      nnx.merge(graphdef, jax.lax.stop_gradient(ref), rest),
      batch,
      chunk_size=2048,
    )
    loss, _ = losses.dpo_loss(lc.sum(1), lr.sum(1), rc.sum(1), rr.sum(1))
    mask = batch.example_mask.astype(jnp.float32)
    return jnp.sum(loss * mask) / jnp.maximum(mask.sum(), 1.0)

  @jax.jit
  def step(state, batch):
    p, opt = state
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  del batch_size, length
  return step, (params, tx.init(params))


def _device(batch):
  return jax.tree.map(jnp.asarray, batch)


def run(name, args, root):
  cfg, bs = _setting(name, root, args.rows)
  tok = ByteTokenizer()
  t0 = time.perf_counter()
  it = pipeline.make_preference_iterator(
    cfg, tok, batch_size=bs, process_index=0, process_count=1
  )
  build_s = time.perf_counter() - t0
  first = next(it)
  length = first.chosen_tokens.shape[1]
  step, state = _make_step(bs, length)
  t0 = time.perf_counter()
  state, loss = step(state, _device(first))
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  fixed = _device(first)
  k = args.batches if name == "default" else args.long_batches
  pipe, stepr, overlap = [], [], []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    for _ in range(k):
      next(it)
    pipe.append(k * bs / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(k):
      state, loss = step(state, fixed)
    loss.block_until_ready()
    alone = time.perf_counter() - t0
    stepr.append(k * bs / alone)
    t0 = time.perf_counter()
    for _ in range(k):
      state, loss = step(state, _device(next(it)))
    loss.block_until_ready()
    overlap.append((time.perf_counter() - t0) / alone)
  ratios = [p / s for p, s in zip(pipe, stepr, strict=True)]
  stats = it.stats
  return {
    "setting": name,
    "batch": bs,
    "length": int(length),
    "pipeline_ex_s": statistics.median(pipe),
    "step_ex_s": statistics.median(stepr),
    "ratio": statistics.median(ratios),
    "overlap": statistics.median(overlap),
    "build_s": build_s,
    "compile_s": compile_s,
    "truncated_prompts": stats.get("truncated_prompts", 0),
    "truncated_completions": stats.get("truncated_completions", 0),
    "rows": stats.get("rows", 0),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--settings", default="default,long")
  ap.add_argument("--rows", type=int, default=4096)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument(
    "--batches",
    type=int,
    default=20,
    help="batches per round and side (default shape)",
  )
  ap.add_argument(
    "--long_batches",
    type=int,
    default=3,
    help="batches per round and side (long shape)",
  )
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  if args.quick:
    args.rounds, args.batches, args.long_batches, args.rows = 3, 8, 2, 1024
  print(
    f"# {platform.node()} {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} cpus, affinity "
    f"{len(os.sched_getaffinity(0))}, jax {jax.__version__} "
    f"({jax.default_backend()}), python {sys.version.split()[0]}"
  )
  results = []
  with tempfile.TemporaryDirectory() as root:
    for name in args.settings.split(","):
      results.append(run(name, args, os.path.join(root, name)))
  print(
    "| setting | B x L | pipeline ex/s | DPO step ex/s | ratio | "
    "overlap | build s | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    print(
      f"| {r['setting']} | {r['batch']} x {r['length']} | "
      f"{r['pipeline_ex_s']:.0f} | {r['step_ex_s']:.0f} | "
      f"{r['ratio']:.2f} | {r['overlap']:.2f} | {r['build_s']:.2f} | "
      f"{r['compile_s']:.2f} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
