"""Policy evaluation: gold / learned reward, KL to the reference, win rate,
best-of-N curves, on held-out prompts."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment import evaluation, sampling
from alignment.data import synthetic
from alignment.trainers import _lm


def task_of(config):
  """The synthetic task behind ``config.data`` (for gold rewards), or None."""
  data = config.get("data", {})
  if data.get("source", "") != "synthetic":
    return None
  task_cfg = dict(data.get("task", {}) or {})
  return synthetic.LettersTask(**task_cfg)


class PolicyEvaluator:
  """Samples completions for fixed prompts and scores them.

  Args:
    graphdef, rest: the policy's static graph and non-param state.
    tokenizer: the tokenizer.
    prompts: host-side list of prompt strings.
    max_prompt_len / max_new_tokens: shapes for the sampler.
    task: synthetic task for gold rewards (or None).
    reward_fn: optional ``(tokens, attention_mask) -> [N]`` learned reward.
  """

  def __init__(
    self,
    graphdef,
    rest,
    tokenizer,
    prompts,
    *,
    max_prompt_len,
    max_new_tokens,
    task=None,
    reward_fn=None,
    chunk_size=2048,
  ):
    self.graphdef, self.rest = graphdef, rest
    self.tokenizer = tokenizer
    self.prompts = list(prompts)
    self.task = task
    self.reward_fn = reward_fn
    self.sampler = sampling.Sampler(
      graphdef,
      rest,
      max_new_tokens=max_new_tokens,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
    )
    rows = []
    for p in self.prompts:
      ids = (
        [tokenizer.bos_id] if tokenizer.bos_id is not None else []
      ) + tokenizer.encode(p)
      if len(ids) > max_prompt_len:
        raise ValueError(
          f"evaluation prompt {p!r} has {len(ids)} tokens, "
          f"more than max_prompt_len={max_prompt_len}."
        )
      rows.append(ids)
    self.prompt_tokens = np.full(
      (len(rows), max_prompt_len), tokenizer.pad_id, np.int32
    )
    self.prompt_mask = np.zeros((len(rows), max_prompt_len), bool)
    for i, ids in enumerate(rows):
      self.prompt_tokens[i, max_prompt_len - len(ids) :] = ids
      self.prompt_mask[i, max_prompt_len - len(ids) :] = True

    @jax.jit
    def seq_logps(params, tokens, attention_mask, loss_mask):
      model = nnx.merge(graphdef, params, rest)
      lp, _ = _lm.completion_token_logps(
        model, tokens, attention_mask, attention_mask, chunk_size=chunk_size
      )
      return jnp.sum(jnp.where(loss_mask, lp, 0.0), axis=1)

    self._seq_logps = seq_logps

  def sample(
    self, params, seed, *, num_samples=1, temperature=1.0, greedy=False
  ):
    out = self.sampler.generate(
      params,
      jnp.asarray(self.prompt_tokens),
      jnp.asarray(self.prompt_mask),
      jax.random.key(seed),
      num_samples=num_samples,
      temperature=temperature,
      greedy=greedy,
    )
    toks = np.asarray(out.completion_tokens)
    mask = np.asarray(out.completion_mask)
    texts = [
      self.tokenizer.decode(t[m].tolist())
      for t, m in zip(toks, mask, strict=True)
    ]
    return out, texts

  def _tokens(self, out):
    tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], 1)
    attn = jnp.concatenate([out.prompt_mask, out.completion_mask], 1)
    p = out.prompt_tokens.shape[1]
    loss_mask = jnp.concatenate(
      [jnp.zeros((tokens.shape[0], p - 1), bool), out.completion_mask], 1
    )
    return tokens, attn, loss_mask

  def evaluate(
    self,
    params,
    ref_params=None,
    *,
    seed=0,
    num_samples=4,
    temperature=1.0,
    best_of=(1, 2, 4),
  ):
    """Metrics of ``params`` (and vs ``ref_params`` if given)."""
    out, texts = self.sample(
      params, seed, num_samples=num_samples, temperature=temperature
    )
    prompts = [p for p in self.prompts for _ in range(num_samples)]
    report = {
      "num_completions": len(texts),
      "completion_length": float(
        np.mean(np.asarray(out.completion_mask).sum(1))
      ),
    }
    tokens, attn, loss_mask = self._tokens(out)
    gold = None
    if self.task is not None:
      gold = self.task.gold_rewards(prompts, texts)
      report["gold_reward"] = float(np.mean(gold))
      report["gold_reward_std"] = float(np.std(gold))
    learned = None
    if self.reward_fn is not None:
      learned = np.asarray(self.reward_fn(tokens, attn))
      report["learned_reward"] = float(np.mean(learned))
    if ref_params is not None:
      lp = np.asarray(self._seq_logps(params, tokens, attn, loss_mask))
      rlp = np.asarray(self._seq_logps(ref_params, tokens, attn, loss_mask))
      report["kl_to_reference"] = float(np.mean(lp - rlp))
      if gold is not None:
        _, ref_texts = self.sample(
          ref_params, seed + 1, num_samples=num_samples, temperature=temperature
        )
        ref_gold = self.task.gold_rewards(prompts, ref_texts)
        report["win_rate_vs_reference"] = evaluation.win_rate(gold, ref_gold)
    if gold is not None and learned is not None and num_samples > 1:
      g = gold.reshape(-1, num_samples)
      s = learned.reshape(-1, num_samples)
      ns = [n for n in best_of if n <= num_samples]
      curve = evaluation.best_of_n_curve(s, g, ns)
      for n, v in zip(ns, np.asarray(curve.gold), strict=False):
        report[f"best_of_{n}_gold"] = float(v)
    report["examples"] = [
      {"prompt": p, "completion": c}
      for p, c in list(zip(prompts, texts, strict=True))[:4]
    ]
    return report


def evaluator_for(
  config,
  graphdef,
  rest,
  tokenizer,
  *,
  reward_fn=None,
  num_prompts=64,
  seed=10_000,
):
  """A :class:`PolicyEvaluator` on held-out synthetic prompts."""
  task = task_of(config)
  if task is None:
    return None
  prompts = task.prompts(num_prompts, seed)
  return PolicyEvaluator(
    graphdef,
    rest,
    tokenizer,
    prompts,
    max_prompt_len=config.data.max_prompt_len,
    max_new_tokens=config.data.max_completion_len,
    task=task,
    reward_fn=reward_fn,
    chunk_size=config.get("logps_chunk_size", 2048),
  )
