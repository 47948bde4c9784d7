"""The embedded default: a complete small RLHF pipeline, every stage real.

1. **SFT**: a tiny policy is fine-tuned on generated demonstrations of the
   letters task (``alignment/data/synthetic.py``).
2. **Preference data**: two completions per prompt are sampled from the SFT
   policy and labelled by the gold reward with Bradley–Terry noise; a
   held-out split is kept for evaluation.
3. **Reward model**: initialised from the SFT policy's backbone, trained on
   those pairs (Bradley–Terry), evaluated on the held-out pairs (accuracy,
   ECE, Brier, reliability diagram).
4. **DPO**: the SFT policy is aligned against the *learned* reward: fresh
   SFT samples are paired and labelled by the reward model, and DPO trains
   on them with the SFT policy as reference.
5. **GRPO**: the SFT policy is aligned online with the learned reward model
   as the reward (group-normalised advantages, clipped objective, k3 KL).
6. **Report**: gold reward, learned reward, KL to the SFT policy and win
   rate against it, for SFT, DPO and GRPO, in the console, ``report.json``,
   ``report.md`` and PNG plots in the workdir.

Each stage writes into its own subdirectory of the workdir and resumes from
its checkpoint if the pipeline is restarted. The stage configs are
``config.sft``, ``config.reward_model``, ``config.dpo``, ``config.grpo``
(each a complete trainer config), so ``--config.grpo.total_steps=...``
changes one stage.
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment import data as data_lib
from alignment.data import synthetic
from alignment.trainers import (
  _data,
  _setup,
  policy_eval,
  preference,
  reward_model,
  rl,
  sft,
)


def _log(msg: str):
  if jax.process_index() == 0:
    print(f"[pipeline] {msg}", flush=True)


def _done(workdir: pathlib.Path, name: str) -> bool:
  return (workdir / f"{name}.done").exists()


def _mark(workdir: pathlib.Path, name: str, payload: dict):
  if jax.process_index() == 0:
    tmp = workdir / f".{name}.done.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.replace(workdir / f"{name}.done")


def _drop_empty(rows, name):
  """Drops pairs with an empty completion (the policy emitted EOS first);
  the data pipeline rejects those rows, so they are counted and reported."""
  kept = [r for r in rows if r["chosen"].strip() and r["rejected"].strip()]
  if len(kept) < len(rows):
    _log(
      f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} pairs with "
      "an empty completion"
    )
  return kept


def _sample_pairs(evaluator: policy_eval.PolicyEvaluator, params, seed):
  out, texts = evaluator.sample(params, seed, num_samples=2, temperature=1.0)
  a, b = texts[0::2], texts[1::2]
  return out, a, b


def generate_preference_data(
  config, sft_params, graphdef, rest, tokenizer, task, data_dir: pathlib.Path
):
  """Samples SFT completion pairs and labels them with noisy gold prefs."""
  rows = {}
  for split, n, seed in (
    ("train", config.pairs.num_train, 1),
    ("eval", config.pairs.num_eval, 2),
  ):
    prompts = task.prompts(n, config.pairs.prompt_seed + seed)
    ev = policy_eval.PolicyEvaluator(
      graphdef,
      rest,
      tokenizer,
      prompts,
      max_prompt_len=config.sft.data.max_prompt_len,
      max_new_tokens=config.sft.data.max_completion_len,
    )
    _, a, b = _sample_pairs(ev, sft_params, config.pairs.sample_seed + seed)
    labelled = task.label_pairs(
      prompts, a, b, seed=config.pairs.label_seed + seed
    )
    labelled = _drop_empty(labelled, f"pairs_{split}")
    data_lib.write_jsonl(labelled, data_dir / f"pairs_{split}.jsonl")
    rows[split] = labelled
  return rows


def relabel_with_reward_model(
  config,
  sft_params,
  graphdef,
  rest,
  tokenizer,
  task,
  score_fn,
  data_dir: pathlib.Path,
):
  """Fresh SFT pairs labelled by the learned reward (DPO's data)."""
  prompts = task.prompts(config.dpo_pairs.num, config.pairs.prompt_seed + 3)
  ev = policy_eval.PolicyEvaluator(
    graphdef,
    rest,
    tokenizer,
    prompts,
    max_prompt_len=config.sft.data.max_prompt_len,
    max_new_tokens=config.sft.data.max_completion_len,
  )
  out, a, b = _sample_pairs(ev, sft_params, config.pairs.sample_seed + 3)
  tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
  attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
  scores = np.asarray(score_fn(tokens, attn))
  sa, sb = scores[0::2], scores[1::2]
  rows = []
  for p, x, y, s1, s2 in zip(prompts, a, b, sa, sb, strict=True):
    chosen, rejected = (x, y) if s1 >= s2 else (y, x)
    rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
  rows = _drop_empty(rows, "pairs_dpo")
  data_lib.write_jsonl(rows, data_dir / "pairs_dpo.jsonl")
  agree = np.mean(
    (sa >= sb)
    == (task.gold_rewards(prompts, a) >= task.gold_rewards(prompts, b))
  )
  return rows, float(agree)


@_setup.in_mesh_context(config_of=lambda config: config.sft)
def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs every stage; returns the final report dict."""
  t0 = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = workdir / "data"
  data_dir.mkdir(exist_ok=True)
  task = synthetic.LettersTask(**dict(config.task))
  tokenizer = _data.tokenizer_of(config.sft)

  # 1. SFT ------------------------------------------------------------------
  _log(
    f"stage 1/5: SFT of a '{config.sft.model.preset}' policy on "
    f"generated demonstrations ({config.sft.total_steps} steps)"
  )
  sft_state, sft_run = sft.run(config.sft, str(workdir / "sft"))
  sft_params = sft_state["params"]
  graphdef, rest = sft_run.model.graphdef, sft_run.model.rest

  # 2. Preference pairs from the SFT policy ---------------------------------
  if not _done(workdir, "pairs"):
    _log(
      "stage 2/5: sampling SFT completion pairs, labelling by the gold "
      "reward with Bradley-Terry noise"
    )
    rows = generate_preference_data(
      config, sft_params, graphdef, rest, tokenizer, task, data_dir
    )
    _mark(workdir, "pairs", {k: len(v) for k, v in rows.items()})

  # 3. Reward model ---------------------------------------------------------
  config.reward_model.data.path = str(data_dir / "pairs_train.jsonl")
  config.reward_model.eval_data.path = str(data_dir / "pairs_eval.jsonl")
  config.dpo.data.path = str(data_dir / "pairs_dpo.jsonl")
  _log(
    f"stage 3/5: reward model ({config.reward_model.loss.name}, "
    f"{config.reward_model.total_steps} steps)"
  )
  rm_state, rm_run, rm_report = reward_model.run(
    config.reward_model,
    str(workdir / "reward_model"),
    backbone_params=sft_params if config.rm_from_sft else None,
  )
  rm_score = reward_model.make_score_fn(
    rm_run.model.graphdef, rm_run.model.rest
  )
  rm_params = rm_state["params"]

  def reward_fn(tokens, attention_mask):
    return rm_score(rm_params, tokens, attention_mask)

  reward_fn_jit = jax.jit(reward_fn)
  _log(
    f"reward model held-out accuracy {rm_report.get('eval_accuracy', 0):.3f}"
    f" on {rm_report.get('eval_pairs', 0)} pairs (chance 0.5)"
  )

  # 4. DPO against the learned reward ---------------------------------------
  if not _done(workdir, "dpo_pairs"):
    _log("stage 4/5: DPO on SFT pairs labelled by the learned reward")
    _, agree = relabel_with_reward_model(
      config,
      sft_params,
      graphdef,
      rest,
      tokenizer,
      task,
      reward_fn_jit,
      data_dir,
    )
    _mark(workdir, "dpo_pairs", {"gold_agreement": agree})
  dpo_state, _ = preference.run(
    config.dpo,
    str(workdir / "dpo"),
    init_params=sft_params,
    reference_params=sft_params,
  )

  # 5. GRPO against the learned reward --------------------------------------
  _log(
    f"stage 5/5: GRPO with the learned reward ({config.grpo.total_steps} "
    "iterations)"
  )
  grpo_state, _, _ = rl.run(
    config.grpo,
    str(workdir / "grpo"),
    init_params=sft_params,
    reference_params=sft_params,
    reward_params=rm_params,
    reward_model=(rm_run.model.graphdef, rm_run.model.rest),
  )

  # 6. Report ---------------------------------------------------------------
  _log("evaluating SFT, DPO and GRPO policies on held-out prompts")
  evaluator = policy_eval.PolicyEvaluator(
    graphdef,
    rest,
    tokenizer,
    task.prompts(config.report.num_prompts, config.report.prompt_seed),
    max_prompt_len=config.sft.data.max_prompt_len,
    max_new_tokens=config.sft.data.max_completion_len,
    task=task,
    reward_fn=reward_fn_jit,
  )
  policies = {
    "sft": sft_params,
    "dpo": dpo_state["params"],
    "grpo": grpo_state["params"],
  }
  results = {}
  for name, params in policies.items():
    results[name] = evaluator.evaluate(
      params,
      sft_params,
      seed=config.report.seed,
      num_samples=config.report.num_samples,
    )
  report = {
    "reward_model": rm_report,
    "policies": {
      k: {m: v for m, v in r.items() if m != "examples"}
      for k, r in results.items()
    },
    "examples": {k: r["examples"] for k, r in results.items()},
    "demonstration_gold_reward": task.expected_demonstration_reward(),
    "wall_seconds": time.perf_counter() - t0,
  }
  if jax.process_index() == 0:
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    md = render_report(report)
    (workdir / "report.md").write_text(md)
    plot_report(report, workdir)
    print(md, flush=True)
  return report


_COLUMNS = (
  ("gold_reward", "gold reward"),
  ("learned_reward", "learned reward"),
  ("kl_to_reference", "KL to SFT"),
  ("win_rate_vs_reference", "gold win rate vs SFT"),
  ("completion_length", "length"),
)


def _rm_breakdown(rm: dict) -> str:
  """``; per subset: easy 0.9 (n=12), ...; best-of-4 0.5 on n lists``
  (the parts the reward-model report has)."""
  out = ""
  by = rm.get("eval_accuracy_by_subset") or {}
  if by:
    n = rm.get("eval_pairs_by_subset", {})
    out += "; per subset: " + ", ".join(
      f"{k} {v:.3f} (n={n.get(k, 0)})" for k, v in by.items()
    )
  for key, value in rm.items():
    if key.startswith("eval_best_of_") and key.endswith("_accuracy"):
      size = key[len("eval_best_of_") : -len("_accuracy")]
      lists = rm.get(f"eval_best_of_{size}_lists", 0)
      out += (
        f"; best-of-{size} {value:.3f} on {lists} lists "
        f"(chance {1 / int(size):.2f})"
      )
  return out


def render_report(report: dict) -> str:
  rm = report["reward_model"]
  lines = [
    "# Default pipeline report",
    "",
    f"Reward model: held-out accuracy **{rm.get('eval_accuracy', 0):.3f}**"
    f" on {rm.get('eval_pairs', 0)} pairs (chance 0.5), ECE "
    f"{rm.get('eval_ece', 0):.3f}, Brier {rm.get('eval_brier', 0):.3f}"
    + _rm_breakdown(rm)
    + ".",
    "",
    "| policy | " + " | ".join(c for _, c in _COLUMNS) + " |",
    "|---" * (len(_COLUMNS) + 1) + "|",
  ]
  for name, r in report["policies"].items():
    cells = [
      f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k, _ in _COLUMNS
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  sft_gold = report["policies"]["sft"].get("gold_reward", 0.0)
  lines.append("")
  for name in ("dpo", "grpo"):
    gold = report["policies"][name].get("gold_reward", 0.0)
    lines.append(
      f"- {name.upper()} changes the gold reward by "
      f"{gold - sft_gold:+.3f} over SFT ({sft_gold:.3f} → "
      f"{gold:.3f})."
    )
  lines.append(f"- Wall time {report['wall_seconds']:.0f} s.")
  return "\n".join(lines) + "\n"


def plot_report(report: dict, workdir: pathlib.Path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(report["policies"])
  keys = [
    ("gold_reward", "gold reward"),
    ("learned_reward", "learned reward"),
    ("kl_to_reference", "KL to SFT"),
  ]
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
  for ax, (k, title) in zip(axes, keys, strict=True):
    vals = [report["policies"][n].get(k, 0.0) for n in names]
    ax.bar(names, vals, color=["#888", "#3a7", "#37a"][: len(names)])
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(workdir / "report.png", dpi=110)
  plt.close(fig)
