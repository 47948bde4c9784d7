r"""Grain pipelines: canonical rows → fixed-shape NumPy batches.

``make_<kind>_iterator(data_config, tokenizer, *, batch_size, seed, ...)``
returns a :class:`DataIterator` over :mod:`batches` types. The stream is a
``grain.MapDataset`` of source indices — shuffled with ``seed`` (a new
order every epoch), repeated ``num_epochs`` times (None: forever) — read
per host at positions ``process_index, process_index + process_count, ...``,
so hosts see disjoint slices that together cover every epoch and the union
of one step's host batches is one contiguous chunk of the global stream.
Everything is a pure function of (config, seed, position): the iterator's
state is the next position plus counters, JSON-serialisable, and restores
exactly in a fresh process.

Sequence layout (every training batch). A row is right-padded
``[bos?, prompt…, completion…, eos, pad…]`` of length
``L = max_prompt_len + max_completion_len``: the prompt part (BOS included,
when the tokenizer has ``bos_id``) holds at most ``max_prompt_len`` tokens
and the completion part (EOS included) at most ``max_completion_len``.
``completion_mask`` is True on the completion and its EOS. Prompts for
generation (:class:`PromptBatch`) are left-padded to ``max_prompt_len``.
With ``padding="bucket"`` the padded length is the smallest of
``bucket_lengths`` (default: L/4, L/2, 3L/4, L rounded up to multiples of 8)
that fits the batch's longest row, so shapes stay few.

Truncation. A completion longer than its budget is cut on the right (its
EOS is then cut too) and counted (``stats["truncated_completions"]``). A
prompt longer than ``max_prompt_len`` is a bad row (``prompt_too_long``) by
default — ``on_error="raise"`` stops with an error naming the row's file,
line and field, ``"skip"`` counts it — unless ``prompt_truncation`` is
``"keep_end"`` (drop tokens from the left, keeping BOS and the end of the
prompt nearest the completion; TRL's ``keep_end``) or ``"keep_start"``,
which truncate and count (``stats["truncated_prompts"]``).

Chat templates. With ``chat_template="auto"`` (default) a tokenizer that
ships a template renders the prompt (its ``prompt_messages``, or the prompt
text as one user turn) with ``add_generation_prompt=True``; ``"none"``
always uses the plain prompt text; any other string is used as the Jinja
template. The completion follows as is, then EOS.

Filler rows. ``example_mask`` is False on rows that carry no example: the
padding of a final partial batch of a finite stream (unless
``drop_remainder``), slots past the end of the data on hosts that got one
example fewer, and, in finite streams, bad rows skipped under
``on_error="skip"`` (so every host yields the same number of batches). A
filler row repeats a real example, so its contents are finite and valid.
In infinite streams a skipped row is simply passed over.

Packing (SFT, ``packing=True``): consecutive examples are concatenated into
rows of length L (greedy, in stream order) and :class:`PackedSFTBatch`
adds ``segment_ids`` (1, 2, ... per example, 0 on padding), which the
model's attention and position ids use.

Data config keys (``config_lib.data`` makes the block): ``source``
(``synthetic``, ``jsonl``, ``parquet``, a :data:`builders.BUILDERS` name,
or ``tfds:<name>``), ``path``, ``split``, ``data_dir`` (builds go there;
default ``<path>/../tfds``, or ``$ALIGNMENT_DATA_DIR``, or
``~/.cache/alignment/data``), ``max_prompt_len``, ``max_completion_len``,
``shuffle``, ``num_epochs``, ``on_error``, ``padding``, ``bucket_lengths``,
``packing``, ``drop_remainder``, ``field_map``, ``prompt_truncation``,
``chat_template``, ``builder_options``, ``max_responses`` (K of ranked
lists), ``max_steps`` (S of step labels), ``step_separator``,
``ref_logps_path`` (precomputed reference log-probs), and for
``synthetic``: ``num_examples``, ``task_seed``, ``task`` (LettersTask
fields).
"""

import collections
import hashlib
import json
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from alignment.data import batches as batch_lib
from alignment.data import builders, synthetic
from alignment.data import records as rec
from alignment.data.records import DataError, RowError
from alignment.data.tokenizer import apply_chat_template

__all__ = [
  "DataIterator",
  "PackedSFTBatch",
  "default_data_dir",
  "load_rows",
  "make_iterator",
  "make_preference_iterator",
  "make_prompt_iterator",
  "make_ranked_iterator",
  "make_sft_iterator",
  "make_step_iterator",
  "make_unpaired_iterator",
  "precompute_reference_logps",
  "synthetic_rows",
]

log = logging.getLogger("alignment.data")

KINDS = ("sft", "preference", "unpaired", "ranked", "step", "prompt")

DEFAULTS: dict[str, Any] = {
  "source": "synthetic",
  "path": "",
  "split": "train",
  "data_dir": "",
  "max_prompt_len": 16,
  "max_completion_len": 16,
  "shuffle": True,
  "num_epochs": None,
  "on_error": "raise",
  "padding": "max",
  "bucket_lengths": None,
  "packing": False,
  "drop_remainder": False,
  "field_map": {},
  "prompt_truncation": "error",
  "chat_template": "auto",
  "builder_options": {},
  "max_responses": 4,
  "max_steps": 16,
  "step_separator": None,
  "ref_logps_path": "",
  "num_examples": 2048,
  "task_seed": 0,
  "task": {},
}


class PackedSFTBatch(NamedTuple):
  """SFT rows packing several examples: :class:`batches.SFTBatch` fields plus
  ``segment_ids`` ``[B, L]`` int32 (1, 2, ... per example, 0 on padding).
  ``example_mask`` is False only on rows holding no example."""

  tokens: np.ndarray
  attention_mask: np.ndarray
  completion_mask: np.ndarray
  example_mask: np.ndarray
  segment_ids: np.ndarray


# -- config --------------------------------------------------------------------


def _plain(value):
  """ConfigDict / FieldReference → plain Python values."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if (
    hasattr(value, "get")
    and hasattr(value, "keys")
    and not isinstance(value, dict)
  ):
    return {k: _plain(value[k]) for k in value.keys()}
  return value


def _settings(data_config) -> dict:
  cfg = _plain(data_config) if data_config is not None else {}
  cfg = dict(cfg)
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(
      f"unknown data config keys {sorted(unknown)}; valid: {sorted(DEFAULTS)}."
    )
  s = {**DEFAULTS, **{k: v for k, v in cfg.items()}}
  for k in ("field_map", "builder_options", "task"):
    s[k] = dict(s[k] or {})
  for k in ("max_prompt_len", "max_completion_len"):
    if not isinstance(s[k], int) or s[k] < 1:
      raise ValueError(f"data config {k} must be an int >= 1, got {s[k]!r}.")
  choices = {
    "on_error": ("raise", "skip"),
    "padding": ("max", "bucket"),
    "prompt_truncation": ("error", "keep_end", "keep_start"),
  }
  for k, valid in choices.items():
    if s[k] not in valid:
      raise ValueError(f"data config {k}={s[k]!r}; valid: {valid}.")
  if s["num_epochs"] is not None and (
    not isinstance(s["num_epochs"], int) or s["num_epochs"] < 1
  ):
    raise ValueError(
      "data config num_epochs must be None (repeat forever) "
      f"or an int >= 1, got {s['num_epochs']!r}."
    )
  for k in ("max_responses", "max_steps"):
    if not isinstance(s[k], int) or s[k] < 1:
      raise ValueError(f"data config {k} must be an int >= 1, got {s[k]!r}.")
  total = s["max_prompt_len"] + s["max_completion_len"]
  if s["bucket_lengths"]:
    b = sorted({int(x) for x in s["bucket_lengths"]})
    if b[0] < 1:
      raise ValueError("data config bucket_lengths must be >= 1.")
    s["bucket_lengths"] = [x for x in b if x < total] + [total]
  return s


def default_data_dir(data_config) -> pathlib.Path:
  """Where builds are written: ``data_dir``, else ``<path>/../tfds``, else
  ``$ALIGNMENT_DATA_DIR``, else ``~/.cache/alignment/data``."""
  s = _plain(data_config) or {}
  if s.get("data_dir"):
    return pathlib.Path(s["data_dir"])
  if s.get("path"):
    return pathlib.Path(s["path"]).resolve().parent / "tfds"
  env = os.environ.get("ALIGNMENT_DATA_DIR")
  return (
    pathlib.Path(env)
    if env
    else (pathlib.Path.home() / ".cache" / "alignment" / "data")
  )


# -- sources ---------------------------------------------------------------------


def synthetic_rows(
  kind: str,
  *,
  num_examples: int,
  seed: int,
  task: Mapping | None = None,
  max_responses: int = 4,
) -> list[dict]:
  """Rows of the default letters task (``synthetic.LettersTask``).

  ``sft``/``preference``/``prompt`` use the task's own generators;
  ``unpaired`` splits preference pairs into (chosen, True) and
  (rejected, False) rows; ``ranked`` scores ``max_responses``
  demonstrations per prompt by the gold reward; ``step`` makes every
  completion letter a step labelled 1.0 when the letter is in the prompt
  (the gold reward's own per-letter term).
  """
  t = synthetic.LettersTask(**dict(task or {}))
  n = int(num_examples)
  if kind == "sft":
    return t.sft_examples(n, seed)
  if kind == "preference":
    return t.preference_pairs(n, seed)
  if kind == "prompt":
    return [{"prompt": p} for p in t.prompts(n, seed)]
  if kind == "unpaired":
    rows = []
    for r in t.preference_pairs((n + 1) // 2, seed):
      rows.append(
        {"prompt": r["prompt"], "completion": r["chosen"], "label": True}
      )
      rows.append(
        {"prompt": r["prompt"], "completion": r["rejected"], "label": False}
      )
    return rows[:n]
  if kind == "ranked":
    rng = np.random.default_rng([seed, 4])
    rows = []
    for p in t.prompts(n, seed):
      responses = [t.demonstration(p, rng) for _ in range(max_responses)]
      rows.append(
        {
          "prompt": p,
          "responses": responses,
          "scores": [
            float(x) for x in t.gold_rewards([p] * max_responses, responses)
          ],
        }
      )
    return rows
  if kind == "step":
    rng = np.random.default_rng([seed, 5])
    rows = []
    for p in t.prompts(n, seed):
      letters = set(t.prompt_letters(p))
      demo = t.demonstration(p, rng)
      rows.append(
        {
          "prompt": p,
          "steps": list(demo),
          "step_labels": [float(c in letters) for c in demo],
        }
      )
    return rows
  raise ValueError(f"unknown kind {kind!r}; valid: {KINDS}.")


class _Source(NamedTuple):
  rows: Sequence[dict]
  kind: str
  name: str
  report: dict
  has_margin: bool
  fingerprint: str
  has_scores: bool = False
  # Sorted subset names when every preference row names one, else ().
  subsets: tuple = ()
  # K when every preference row has attribute ratings, else 0; and the
  # first rated row's "file:line" (for errors).
  num_ratings: int = 0
  ratings_source: str = ""


class _ConvertedRows(Sequence):
  """A prebuilt tfds dataset with arbitrary fields, converted per row."""

  def __init__(self, src, name, kind, field_map):
    self._src, self._name, self._kind, self._map = src, name, kind, field_map

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    raw = self._src[int(i)]
    raw = {k: _to_python(v) for k, v in raw.items()}
    try:
      row = builders.convert_generic(raw, self._kind, self._map)
    except RowError as e:
      return _BadRow(e, f"tfds:{self._name}[{int(i)}]")
    row["source"] = f"tfds:{self._name}[{int(i)}]"
    row.setdefault("margin", float("nan"))
    return row


class _BadRow(NamedTuple):
  error: RowError
  source: str


def _to_python(v):
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return [_to_python(x) for x in v.tolist()] if v.ndim else v.item()
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, dict):
    return {k: _to_python(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_to_python(x) for x in v]
  return v


def load_rows(data_config, kind: str) -> _Source:
  """Builds (or reuses) the configured source; canonical rows of ``kind``
  or of a kind that ``kind`` can read (see :func:`make_iterator`)."""
  s = _settings(data_config)
  source, path, split = s["source"], s["path"], s["split"]
  data_dir = default_data_dir(s)
  if source.startswith("tfds:"):
    name = source[len("tfds:") :]
    if name not in builders.BUILDERS:
      import tensorflow_datasets as tfds  # noqa: PLC0415

      src = tfds.data_source(name, split=split, data_dir=str(data_dir))
      rows = _ConvertedRows(src, name, kind, s["field_map"])
      fp = hashlib.sha256(
        f"{name}/{split}/{len(src)}/{data_dir}".encode()
      ).hexdigest()[:16]
      return _Source(rows, kind, source, {}, False, fp)
    source = name
  if source == "synthetic":
    key = json.dumps(
      [
        kind,
        s["num_examples"],
        s["task_seed"],
        synthetic.LettersTask(**s["task"]).__dict__,
        s["max_responses"],
      ]
      # Preference rows gained a ``subset`` column: new rows, new file.
      + (["subset"] if kind == "preference" else []),
      sort_keys=True,
    )
    fp = hashlib.sha256(key.encode()).hexdigest()[:16]
    jsonl = data_dir / "synthetic" / fp / f"{kind}.jsonl"
    if not jsonl.exists():  # deterministic content: written once
      rec.write_jsonl(
        synthetic_rows(
          kind,
          num_examples=s["num_examples"],
          seed=s["task_seed"],
          task=s["task"],
          max_responses=s["max_responses"],
        ),
        jsonl,
      )
    options = {"kind": kind}
    if kind == "preference":
      # The task's gold reward of each response is its score column.
      options["field_map"] = {
        "chosen_score": "gold_chosen",
        "rejected_score": "gold_rejected",
      }
    built = builders.build(
      "jsonl",
      path=jsonl,
      split="train",
      data_dir=data_dir,
      on_error=s["on_error"],
      options=options,
    )
  elif source in ("jsonl", "parquet", "generic"):
    if not path:
      raise ValueError(f"data config source={source!r} needs a path.")
    options = {
      "kind": kind,
      "field_map": s["field_map"],
      **s["builder_options"],
    }
    built = builders.build(
      "jsonl",
      path=path,
      split=split,
      data_dir=data_dir,
      on_error=s["on_error"],
      options=options,
    )
  elif source in builders.BUILDERS:
    built = builders.build(
      source,
      path=path or None,
      split=split,
      data_dir=data_dir,
      on_error=s["on_error"],
      options=s["builder_options"],
    )
  else:
    raise ValueError(
      f"unknown data source {source!r}; valid: 'synthetic', 'jsonl', "
      f"'parquet', 'tfds:<name>', {sorted(builders.BUILDERS)}."
    )
  rows = builders.open_source(built)
  return _Source(
    rows,
    built.kind,
    source,
    built.report,
    bool(built.report.get("has_margin", False)),
    pathlib.Path(built.directory).parent.name,
    bool(built.report.get("has_scores", False)),
    tuple(sorted(built.report.get("subsets", {})))
    if built.report.get("has_subsets")
    else (),
    int(built.report.get("num_ratings", 0))
    if built.report.get("has_ratings")
    else 0,
    str(built.report.get("ratings_source", "")),
  )


# -- tokenisation --------------------------------------------------------------


def _default_buckets(total: int) -> list[int]:
  out = set()
  for f in (0.25, 0.5, 0.75):
    b = int(math.ceil(total * f / 8) * 8)
    if 0 < b < total:
      out.add(b)
  return sorted(out) + [total]


class _Encoder:
  """Renders, tokenises and truncates prompts and completions."""

  def __init__(self, tokenizer, s: dict):
    self.tok = tokenizer
    self.max_p = s["max_prompt_len"]
    self.max_c = s["max_completion_len"]
    self.policy = s["prompt_truncation"]
    ct = s["chat_template"]
    if ct == "none":
      self.template = None
    elif ct == "auto":
      self.template = getattr(tokenizer, "chat_template", None) or None
    else:
      self.template = ct
    self.bos = tokenizer.bos_id
    self.eos = tokenizer.eos_id

  def render_prompt(self, row: Mapping) -> str:
    if self.template is None:
      return row["prompt"]
    msgs = row.get("prompt_messages") or ""
    messages = (
      json.loads(msgs) if msgs else [{"role": "user", "content": row["prompt"]}]
    )
    return apply_chat_template(
      self.tok,
      messages,
      add_generation_prompt=True,
      chat_template=self.template,
    )

  def prompt(self, row: Mapping) -> tuple[list[int], bool]:
    """Prompt ids (BOS first when the tokenizer has one) and whether they
    were truncated; RowError ``prompt_too_long`` under the default
    policy."""
    ids = self.tok.encode(self.render_prompt(row))
    if self.bos is not None and (not ids or ids[0] != self.bos):
      ids = [self.bos] + ids
    if len(ids) <= self.max_p:
      return ids, False
    if self.policy == "error":
      raise RowError(
        "prompt_too_long",
        "prompt",
        f"{len(ids)} tokens > max_prompt_len={self.max_p}",
      )
    if self.policy == "keep_start":
      return ids[: self.max_p], True
    head = [self.bos] if self.bos is not None else []
    return head + ids[len(ids) - (self.max_p - len(head)) :], True

  def completion(
    self, text: str, *, eos: bool = True, budget: int | None = None
  ) -> tuple[list[int], bool]:
    """Completion ids (+ EOS), cut on the right to the budget."""
    if not text.strip():
      raise RowError("empty_completion", "completion", "empty completion")
    ids = self.tok.encode(text) + ([self.eos] if eos else [])
    budget = self.max_c if budget is None else budget
    if len(ids) <= budget:
      return ids, False
    return ids[:budget], True


# -- per-kind processing -------------------------------------------------------


def _arr(ids) -> np.ndarray:
  return np.asarray(ids, np.int32)


def _adapt(row: dict, row_kind: str, kind: str) -> dict:
  """A row of ``row_kind`` read as ``kind`` (prompt from any kind; SFT from
  preference pairs, the chosen response as the completion)."""
  if row_kind == kind:
    return row
  if kind == "prompt":
    return {
      "prompt": row["prompt"],
      "prompt_messages": row.get("prompt_messages", ""),
      "answer": row.get("answer", ""),
      "solution": row.get("solution", ""),
      "metadata": row.get("metadata", "{}"),
      "source": row["source"],
    }
  if kind == "sft" and row_kind == "preference":
    return {**row, "completion": row["chosen"]}
  raise ValueError(f"cannot read {row_kind!r} rows as {kind!r} examples.")


def _process(
  kind: str, enc: _Encoder, row: Mapping, index: int, s: dict
) -> dict:
  """One canonical row → token lists (raises RowError)."""
  if kind == "prompt":
    ids, tp = enc.prompt(row)
    return {"ids": _arr(ids), "index": index, "tp": tp, "tc": False}
  p, tp = enc.prompt(row)
  if kind == "sft":
    c, tc = enc.completion(row["completion"])
    return {
      "ids": _arr(p + c),
      "plen": len(p),
      "index": index,
      "tp": tp,
      "tc": tc,
    }
  if kind == "preference":
    try:
      c, tc1 = enc.completion(row["chosen"])
    except RowError as e:
      raise RowError(e.kind, "chosen", e.message) from None
    try:
      r, tc2 = enc.completion(row["rejected"])
    except RowError as e:
      raise RowError(e.kind, "rejected", e.message) from None
    return {
      "chosen": _arr(p + c),
      "rejected": _arr(p + r),
      "plen": len(p),
      "margin": float(row.get("margin", float("nan"))),
      "chosen_score": float(row.get("chosen_score", float("nan"))),
      "rejected_score": float(row.get("rejected_score", float("nan"))),
      "subset": str(row.get("subset", "") or ""),
      "chosen_ratings": list(row.get("chosen_ratings") or ()),
      "rejected_ratings": list(row.get("rejected_ratings") or ()),
      "index": index,
      "tp": tp,
      "tc": tc1 or tc2,
    }
  if kind == "unpaired":
    c, tc = enc.completion(row["completion"])
    return {
      "prompt": p,
      "completion": c,
      "label": bool(row["label"]),
      "index": index,
      "tp": tp,
      "tc": tc,
    }
  if kind == "ranked":
    k = s["max_responses"]
    responses, scores = row["responses"], row["scores"]
    seqs, tc = [], False
    for j, text in enumerate(responses[:k]):
      try:
        c, t = enc.completion(text)
      except RowError as e:
        raise RowError(e.kind, f"responses[{j}]", e.message) from None
      seqs.append(_arr(p + c))
      tc = tc or t
    return {
      "seqs": seqs,
      "plen": len(p),
      "scores": list(scores[:k]),
      "index": index,
      "tp": tp,
      "tc": tc,
      "tl": len(responses) > k,
    }
  if kind == "step":
    sep = s["step_separator"]
    ids, positions, labels = list(p), [], []
    budget = enc.max_c
    steps, step_labels = row["steps"], row["step_labels"]
    tc = False
    for j, (text, lab) in enumerate(zip(steps, step_labels, strict=True)):
      if j >= s["max_steps"]:
        tc = True
        break
      if not text.strip():
        raise RowError("empty_completion", f"steps[{j}]", "empty step")
      chunk = enc.tok.encode(text + sep)
      if len(chunk) > budget:
        tc = True
        break
      budget -= len(chunk)
      ids.extend(chunk)
      positions.append(len(ids) - 1)
      labels.append(float(lab))
    if not positions:
      raise RowError(
        "bad_value",
        "steps[0]",
        f"the first step does not fit max_completion_len={enc.max_c}",
      )
    return {
      "ids": _arr(ids),
      "plen": len(p),
      "positions": positions,
      "labels": labels,
      "index": index,
      "tp": tp,
      "tc": tc,
    }
  raise ValueError(f"unknown kind {kind!r}")


# -- collation -----------------------------------------------------------------


class _Padder:
  def __init__(self, s: dict, pad_id: int):
    self.total = s["max_prompt_len"] + s["max_completion_len"]
    self.max_p = s["max_prompt_len"]
    self.pad = pad_id
    self.buckets = None
    if s["padding"] == "bucket":
      self.buckets = s["bucket_lengths"] or _default_buckets(self.total)
      self.p_buckets = [b for b in _default_buckets(self.max_p)]

  def length(self, longest: int, *, prompt: bool = False) -> int:
    full = self.max_p if prompt else self.total
    if self.buckets is None:
      return full
    for b in self.p_buckets if prompt else self.buckets:
      if b >= longest:
        return b
    return full

  def right(
    self, seqs: Sequence[np.ndarray], plens: Sequence[int], length: int
  ):
    n = len(seqs)
    tokens = np.full((n, length), self.pad, np.int32)
    attn = np.zeros((n, length), bool)
    comp = np.zeros((n, length), bool)
    for i, (x, pl) in enumerate(zip(seqs, plens, strict=True)):
      tokens[i, : len(x)] = x
      attn[i, : len(x)] = True
      comp[i, pl : len(x)] = True
    return tokens, attn, comp


def _collate(
  kind: str, items: list[tuple[dict, bool]], pad: _Padder, s: dict, extras: dict
):
  ex = [e for e, _ in items]
  mask = np.asarray([real for _, real in items], bool)
  if kind == "sft":
    length = pad.length(max(len(e["ids"]) for e in ex))
    t, a, c = pad.right([e["ids"] for e in ex], [e["plen"] for e in ex], length)
    return batch_lib.SFTBatch(t, a, c, mask)
  if kind == "preference":
    length = pad.length(
      max(max(len(e["chosen"]), len(e["rejected"])) for e in ex)
    )
    ct, ca, cc = pad.right(
      [e["chosen"] for e in ex], [e["plen"] for e in ex], length
    )
    rt, ra, rc = pad.right(
      [e["rejected"] for e in ex], [e["plen"] for e in ex], length
    )
    margin = chosen_score = rejected_score = subset_id = None
    chosen_ratings = rejected_ratings = None
    if extras.get("has_margin"):
      margin = np.asarray([e["margin"] for e in ex], np.float32)
    if extras.get("has_scores"):
      chosen_score = np.asarray([e["chosen_score"] for e in ex], np.float32)
      rejected_score = np.asarray([e["rejected_score"] for e in ex], np.float32)
    if extras.get("subsets"):
      ids = {name: i for i, name in enumerate(extras["subsets"])}
      subset_id = np.asarray([ids.get(e["subset"], -1) for e in ex], np.int32)
    if extras.get("num_ratings"):
      chosen_ratings = np.asarray([e["chosen_ratings"] for e in ex], np.float32)
      rejected_ratings = np.asarray(
        [e["rejected_ratings"] for e in ex], np.float32
      )
    ref_c = ref_r = None
    if extras.get("ref") is not None:
      chosen_lp, rejected_lp, have = extras["ref"]
      idx = np.asarray([e["index"] for e in ex])
      if not np.all(have[idx] | ~mask):
        missing = int(idx[mask & ~have[idx]][0])
        raise DataError(
          f"no precomputed reference log-probs for example "
          f"{missing}; rerun precompute_reference_logps",
          kind="missing_field",
          field="ref_chosen_logps",
        )
      ref_c = np.where(mask, chosen_lp[idx], 0.0).astype(np.float32)
      ref_r = np.where(mask, rejected_lp[idx], 0.0).astype(np.float32)
    return batch_lib.PreferenceBatch(
      ct,
      ca,
      cc,
      rt,
      ra,
      rc,
      mask,
      ref_c,
      ref_r,
      margin,
      chosen_score,
      rejected_score,
      subset_id,
      chosen_ratings,
      rejected_ratings,
    )
  if kind == "unpaired":
    n = len(ex)
    seqs = [_arr(e["prompt"] + e["completion"]) for e in ex]
    kl = [
      _arr(ex[i]["prompt"] + ex[(i + 1) % n]["completion"]) for i in range(n)
    ]
    length = pad.length(max(max(len(x) for x in seqs), max(len(x) for x in kl)))
    plens = [len(e["prompt"]) for e in ex]
    t, a, c = pad.right(seqs, plens, length)
    kt, ka, kc = pad.right(kl, plens, length)
    labels = np.asarray([e["label"] for e in ex], bool)
    return batch_lib.UnpairedBatch(t, a, c, labels, mask, kt, ka, kc)
  if kind == "ranked":
    k = s["max_responses"]
    n = len(ex)
    length = pad.length(max(len(x) for e in ex for x in e["seqs"]))
    tokens = np.full((n, k, length), pad.pad, np.int32)
    attn = np.zeros((n, k, length), bool)
    comp = np.zeros((n, k, length), bool)
    scores = np.zeros((n, k), np.float32)
    list_mask = np.zeros((n, k), bool)
    for i, e in enumerate(ex):
      m = len(e["seqs"])
      t, a, c = pad.right(e["seqs"], [e["plen"]] * m, length)
      tokens[i, :m], attn[i, :m], comp[i, :m] = t, a, c
      scores[i, :m] = e["scores"]
      list_mask[i, :m] = True
    return batch_lib.RankedBatch(tokens, attn, comp, scores, list_mask, mask)
  if kind == "step":
    n, smax = len(ex), s["max_steps"]
    length = pad.length(max(len(e["ids"]) for e in ex))
    t, a, _ = pad.right([e["ids"] for e in ex], [e["plen"] for e in ex], length)
    pos = np.zeros((n, smax), np.int32)
    lab = np.zeros((n, smax), np.float32)
    smask = np.zeros((n, smax), bool)
    for i, e in enumerate(ex):
      m = len(e["positions"])
      pos[i, :m], lab[i, :m], smask[i, :m] = e["positions"], e["labels"], True
    return batch_lib.StepBatch(t, a, pos, lab, smask, mask)
  if kind == "prompt":
    n = len(ex)
    length = pad.length(max(len(e["ids"]) for e in ex), prompt=True)
    tokens = np.full((n, length), pad.pad, np.int32)
    pmask = np.zeros((n, length), bool)
    for i, e in enumerate(ex):
      m = len(e["ids"])
      tokens[i, length - m :] = e["ids"]
      pmask[i, length - m :] = True
    index = np.asarray([e["index"] for e in ex], np.int32)
    return batch_lib.PromptBatch(tokens, pmask, index, mask)
  raise ValueError(kind)


def _collate_packed(rows: list[list[dict]], pad: _Padder, batch_size: int):
  length = pad.total
  tokens = np.full((batch_size, length), pad.pad, np.int32)
  attn = np.zeros((batch_size, length), bool)
  comp = np.zeros((batch_size, length), bool)
  seg = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size,), bool)
  for i, row in enumerate(rows):
    pos = 0
    for j, e in enumerate(row, 1):
      n = len(e["ids"])
      tokens[i, pos : pos + n] = e["ids"]
      attn[i, pos : pos + n] = True
      comp[i, pos + e["plen"] : pos + n] = True
      seg[i, pos : pos + n] = j
      pos += n
    mask[i] = bool(row)
  # Rows without examples (end of a finite stream) keep one attended pad
  # token so no attention row is empty.
  attn[~mask, 0] = True
  return PackedSFTBatch(tokens, attn, comp, mask, seg)


# -- the iterator --------------------------------------------------------------

_STATE_VERSION = 1
_FILLER = object()


class DataIterator:
  """Fixed-shape NumPy batches from a random-access row source.

  Attributes:
    stats: counters (``rows``: examples emitted; ``truncated_prompts``;
      ``truncated_completions``; ``truncated_lists``; ``skipped_<kind>``
      for rows skipped here; ``build_skipped_<kind>`` / ``build_dropped_*``
      from the dataset build; ``filler_rows``; ``dropped_remainder_rows``;
      ``batches``; ``epochs_started``).
    records: (prompt iterators) host-side records indexed by
      ``PromptBatch.prompt_index``: dicts with ``prompt`` (raw text),
      ``answer``, ``solution``, ``source`` and any metadata fields.
    last_source_indices: ``[B]`` source row of each row of the last batch
      (-1 on filler rows; packed batches: the first example of each row).
  """

  def __init__(
    self,
    *,
    kind: str,
    rows: Sequence,
    row_kind: str,
    tokenizer,
    settings: dict,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    source_info: _Source,
    ref=None,
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index={process_index} must be in "
        f"[0, process_count={process_count})."
      )
    self.kind = kind
    self._rows = rows
    self._row_kind = row_kind
    self._s = settings
    self.batch_size = batch_size
    self._seed = int(seed)
    self._pi, self._pc = int(process_index), int(process_count)
    self._enc = _Encoder(tokenizer, settings)
    self._pad = _Padder(settings, tokenizer.pad_id)
    self._packing = bool(settings["packing"])
    if self._packing and kind != "sft":
      raise ValueError("data config packing=True is only for SFT data.")
    if settings["step_separator"] is None:
      settings["step_separator"] = (
        "" if settings["source"] == "synthetic" else "\n"
      )
    self._extras = {
      "has_margin": source_info.has_margin,
      "has_scores": source_info.has_scores,
      "subsets": tuple(source_info.subsets) if kind == "preference" else (),
      "num_ratings": source_info.num_ratings if kind == "preference" else 0,
      "ref": ref,
    }
    self._info = source_info
    n = len(rows)
    if n == 0:
      raise ValueError(f"data source {source_info.name!r} has no rows.")
    self._n = n
    epochs = settings["num_epochs"]
    order = grain.MapDataset.range(n)
    if settings["shuffle"]:
      order = order.shuffle(seed=self._seed)
    self._order = order.repeat(epochs)
    self._total = None if epochs is None else n * epochs
    self._slots = None if epochs is None else -(-self._total // self._pc)
    self._pos = 0
    self._stats = collections.Counter()
    self._filler = None
    self.last_source_indices = None
    self.records = _Records(rows, row_kind) if kind == "prompt" else None

  # -- stream ------------------------------------------------------------------

  def _global(self, slot: int) -> int:
    return slot * self._pc + self._pi

  def _example_at(self, slot: int):
    """The processed example at a host slot, _FILLER past the data's end,
    or a _BadRow."""
    g = self._global(slot)
    if self._total is not None and g >= self._total:
      return _FILLER
    index = int(self._order[g])
    return self._example_of(index)

  def _example_of(self, index: int):
    row = self._rows[index]
    if isinstance(row, _BadRow):
      return row
    row = _adapt(row, self._row_kind, self.kind)
    try:
      return _process(self.kind, self._enc, row, index, self._s)
    except RowError as e:
      return _BadRow(e, row["source"])

  def _filler_example(self) -> dict:
    if self._filler is None:
      for index in range(self._n):
        ex = self._example_of(index)
        if not isinstance(ex, _BadRow):
          self._filler = ex
          break
      else:
        raise DataError(
          "every row is bad; nothing to fill a batch with", kind="bad_value"
        )
    return self._filler

  def _handle_bad(self, bad: _BadRow, counts):
    err = bad.error
    file, _, line = bad.source.rpartition(":")
    if not (file and line.isdigit()):
      file, line = bad.source, None
    if self._s["on_error"] == "raise":
      raise DataError(
        err.message,
        kind=err.kind,
        file=file,
        line=int(line) if line else None,
        field=err.field,
      ) from err
    key = f"skipped_{err.kind}"
    if not self._stats[key] and not counts[key]:
      log.warning(
        "%s: skipping bad rows (on_error='skip'); first %s: %s",
        self._info.name,
        err.kind,
        DataError(
          err.message,
          kind=err.kind,
          file=file,
          line=int(line) if line else None,
          field=err.field,
        ),
      )
    counts[key] += 1

  def _count(self, ex: dict, counts):
    counts["rows"] += 1
    counts["truncated_prompts"] += int(ex["tp"])
    counts["truncated_completions"] += int(ex["tc"])
    counts["truncated_lists"] += int(ex.get("tl", False))

  def __iter__(self):
    return self

  def __next__(self):
    if self._packing:
      return self._next_packed()
    counts = collections.Counter()
    items: list[tuple[dict, bool]] = []
    pos = self._pos
    while len(items) < self.batch_size:
      if self._slots is not None and pos >= self._slots:
        break
      ex = self._example_at(pos)
      pos += 1
      if ex is _FILLER:
        items.append((self._filler_example(), False))
        counts["filler_rows"] += 1
      elif isinstance(ex, _BadRow):
        self._handle_bad(ex, counts)
        if self._total is not None:  # keep the slot: hosts stay in step
          items.append((self._filler_example(), False))
          counts["filler_rows"] += 1
      else:
        items.append((ex, True))
        self._count(ex, counts)
    if not items:
      self._end()
    if len(items) < self.batch_size:
      if self._s["drop_remainder"]:
        self._pos = pos
        self._stats["dropped_remainder_rows"] += sum(r for _, r in items)
        self._end()
      counts["filler_rows"] += self.batch_size - len(items)
      items += [(self._filler_example(), False)] * (
        self.batch_size - len(items)
      )
    batch = _collate(self.kind, items, self._pad, self._s, self._extras)
    self._commit(pos, counts)
    self.last_source_indices = np.asarray(
      [e["index"] if real else -1 for e, real in items], np.int64
    )
    return batch

  def _next_packed(self):
    counts = collections.Counter()
    rows: list[list[dict]] = [[]]
    used = 0
    pos = self._pos
    total = self._pad.total
    while True:
      if self._slots is not None and pos >= self._slots:
        break
      ex = self._example_at(pos)
      if ex is _FILLER:
        pos += 1
        continue
      if isinstance(ex, _BadRow):
        self._handle_bad(ex, counts)
        pos += 1
        continue
      n = len(ex["ids"])
      if used + n > total:
        if len(rows) == self.batch_size:
          break
        rows.append([])
        used = 0
      rows[-1].append(ex)
      used += n
      pos += 1
      self._count(ex, counts)
    if not rows[0]:
      self._end()
    if len(rows) < self.batch_size and self._s["drop_remainder"]:
      self._pos = pos
      self._stats["dropped_remainder_rows"] += sum(len(r) for r in rows)
      self._end()
    counts["filler_rows"] += self.batch_size - len(rows)
    rows += [[] for _ in range(self.batch_size - len(rows))]
    counts["packed_rows"] += sum(bool(r) for r in rows)
    batch = _collate_packed(rows, self._pad, self.batch_size)
    self._commit(pos, counts)
    self.last_source_indices = np.asarray(
      [r[0]["index"] if r else -1 for r in rows], np.int64
    )
    return batch

  def _end(self):
    """Logs the bad-row summary of a finished stream; StopIteration."""
    skipped = {k: v for k, v in self.stats.items() if "skipped_" in k and v}
    if skipped:
      log.warning(
        "%s: stream finished; skipped rows: %s", self._info.name, skipped
      )
    raise StopIteration

  def _commit(self, pos: int, counts):
    self._pos = pos
    self._stats.update(counts)
    self._stats["batches"] += 1

  # -- state -------------------------------------------------------------------

  def _identity(self) -> dict:
    s = self._s
    return {
      "kind": self.kind,
      "num_rows": self._n,
      "seed": self._seed,
      "shuffle": bool(s["shuffle"]),
      "num_epochs": s["num_epochs"],
      "batch_size": self.batch_size,
      "process_index": self._pi,
      "process_count": self._pc,
      "source": self._info.fingerprint,
      "packing": self._packing,
    }

  def get_state(self) -> dict:
    """JSON-serialisable state: the next stream position and counters."""
    return {
      "version": _STATE_VERSION,
      "position": self._pos,
      "stats": dict(self._stats),
      **self._identity(),
    }

  def set_state(self, state: Mapping):
    """Restores :meth:`get_state` output (from this or a fresh process).

    Without packing every host advances in lock step (slot ``k`` of each
    host belongs to the same global chunk), so one host's state restores
    every host: a checkpoint that keeps only process 0's state (orbax JSON
    extras) is enough. The counters are then process 0's. Packed streams
    advance per host and need each host's own state.

    Raises:
      ValueError: the state belongs to a different dataset, seed, batch
        size, shuffling, epoch count or process count, or (packing) to
        another host.
    """
    state = dict(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(
        f"data iterator state version {state.get('version')}"
        f" is not {_STATE_VERSION}."
      )
    mine = self._identity()
    if not self._packing:
      mine.pop("process_index")
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ValueError(
        "data iterator state does not match this iterator "
        f"(saved, current): {diff}."
      )
    self._pos = int(state["position"])
    self._stats = collections.Counter(state.get("stats", {}))

  @property
  def has_margin(self) -> bool:
    """Preference batches carry ``margin`` (every row of the source has
    one)."""
    return bool(self._extras["has_margin"]) and self.kind == "preference"

  @property
  def has_scores(self) -> bool:
    """Preference batches carry ``chosen_score`` / ``rejected_score``."""
    return bool(self._extras["has_scores"]) and self.kind == "preference"

  @property
  def subset_names(self) -> tuple[str, ...]:
    """Names of the ``subset_id`` values of preference batches (sorted;
    empty when some row of the source names no ``subset``)."""
    return tuple(self._extras["subsets"])

  @property
  def num_ratings(self) -> int:
    """K of the ``chosen_ratings`` / ``rejected_ratings`` ``[B, K]`` that
    preference batches carry (0: none; every row of the source must have
    them)."""
    return int(self._extras["num_ratings"])

  @property
  def ratings_source(self) -> str:
    """``file:line`` of the source's first row with ratings ("": none)."""
    return self._info.ratings_source

  @property
  def has_subsets(self) -> bool:
    """Preference batches carry ``subset_id``."""
    return bool(self._extras["subsets"])

  @property
  def stats(self) -> dict:
    out = dict(self._stats)
    for k, v in (self._info.report.get("skipped") or {}).items():
      out[f"build_skipped_{k}"] = v
    for k, v in (self._info.report.get("dropped") or {}).items():
      out[f"build_dropped_{k}"] = v
    out["epoch"] = self._global(self._pos) // self._n
    return out

  @property
  def num_batches(self) -> int | None:
    """Batches per host of a finite stream (without packing); None when
    infinite."""
    if self._slots is None or self._packing:
      return None
    full, rest = divmod(self._slots, self.batch_size)
    return full + (1 if rest and not self._s["drop_remainder"] else 0)


class _Records(Sequence):
  """Host-side prompt records, read lazily from the row source."""

  def __init__(self, rows, row_kind):
    self._rows, self._kind = rows, row_kind

  def __len__(self):
    return len(self._rows)

  def __getitem__(self, i):
    row = self._rows[int(i)]
    if isinstance(row, _BadRow):
      return {"prompt": "", "source": row.source, "error": str(row.error)}
    out = {}
    meta = row.get("metadata")
    if meta:
      out.update(json.loads(meta))
    out.update({"prompt": row["prompt"], "source": row["source"]})
    for k in ("answer", "solution"):
      if row.get(k):
        out[k] = row[k]
    if row.get("prompt_messages"):
      out["prompt_messages"] = json.loads(row["prompt_messages"])
    return out


# -- factories -----------------------------------------------------------------


def _process_layout(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # noqa: PLC0415

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  return int(process_index), int(process_count)


def make_iterator(
  kind: str,
  data_config,
  tokenizer,
  *,
  batch_size: int,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  rows: Sequence[Mapping] | None = None,
) -> DataIterator:
  """A :class:`DataIterator` of ``kind`` batches.

  Args:
    kind: ``sft``, ``preference``, ``unpaired``, ``ranked``, ``step`` or
      ``prompt``.
    data_config: the data block (dict or ConfigDict, keys in the module
      docstring).
    tokenizer: ``tokenizer.load_tokenizer(...)``.
    batch_size: rows per batch on THIS process.
    seed: shuffling seed (the same seed gives the same stream).
    process_index, process_count: host layout (default: JAX's).
    rows: optional in-memory canonical rows (any random-access sequence of
      dicts with the kind's fields) instead of ``data_config.source``.

  A prompt iterator reads prompts of any row kind; an SFT iterator reads
  preference pairs with the chosen response as the completion.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown data kind {kind!r}; valid: {KINDS}.")
  s = _settings(data_config)
  pi, pc = _process_layout(process_index, process_count)
  if rows is not None:
    canon = [
      {
        **{
          "prompt_messages": "",
          "margin": float("nan"),
          "source": f"rows:{i + 1}",
        },
        **r,
      }
      for i, r in enumerate(rows)
    ]
    has_margin = bool(canon) and all(
      math.isfinite(float(r.get("margin", float("nan")))) for r in canon
    )
    has_scores = bool(canon) and all(
      math.isfinite(float(r.get(f, float("nan"))))
      for r in canon
      for f in ("chosen_score", "rejected_score")
    )
    names = [str(r.get("subset", "") or "") for r in canon]
    subsets = tuple(sorted(set(names))) if names and all(names) else ()
    num_ratings, ratings_source = _rows_ratings(canon)
    fp = hashlib.sha256(
      json.dumps(canon, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    info = _Source(
      canon,
      kind,
      "rows",
      {},
      has_margin,
      fp,
      has_scores,
      subsets,
      num_ratings,
      ratings_source,
    )
  else:
    info = load_rows(s, kind)
  ref = None
  if kind == "preference" and s["ref_logps_path"]:
    ref = _load_reference_logps(
      s["ref_logps_path"], _ref_meta(s, tokenizer, info, len(info.rows))
    )
  return DataIterator(
    kind=kind,
    rows=info.rows,
    row_kind=info.kind,
    tokenizer=tokenizer,
    settings=s,
    batch_size=batch_size,
    seed=seed,
    process_index=pi,
    process_count=pc,
    source_info=info,
    ref=ref,
  )


def _rows_ratings(canon: Sequence[Mapping]) -> tuple[int, str]:
  """``(K, first rated row's source)`` of in-memory preference rows: K when
  every row has ``chosen_ratings`` / ``rejected_ratings``, else 0.

  Raises:
    DataError: naming the row and field where a row's K differs from the
      first rated row's, or its two responses have different K.
  """
  k, first, every = 0, "", bool(canon)
  for r in canon:
    c = r.get("chosen_ratings") or ()
    j = r.get("rejected_ratings") or ()
    if not c and not j:
      every = False
      continue
    file, _, line = str(r["source"]).rpartition(":")
    for field, n in (("chosen_ratings", len(c)), ("rejected_ratings", len(j))):
      if not k:
        k, first = n, r["source"]
      if n != k:
        raise DataError(
          f"{n} ratings per response, but the first rated row ({first}) "
          f"has {k}",
          kind="bad_value",
          file=file,
          line=int(line) if line.isdigit() else None,
          field=field,
        )
  return (k if every else 0), first


def _maker(kind: str) -> Callable[..., DataIterator]:
  def make(
    data_config,
    tokenizer,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> DataIterator:
    return make_iterator(
      kind,
      data_config,
      tokenizer,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )

  make.__name__ = f"make_{kind}_iterator"
  make.__qualname__ = make.__name__
  make.__doc__ = (
    f"Iterator of ``{_BATCH_NAMES[kind]}`` (see "
    ":func:`make_iterator`; ``batch_size`` is per process)."
  )
  return make


_BATCH_NAMES = {
  "sft": "SFTBatch",
  "preference": "PreferenceBatch",
  "unpaired": "UnpairedBatch",
  "ranked": "RankedBatch",
  "step": "StepBatch",
  "prompt": "PromptBatch",
}

make_sft_iterator = _maker("sft")
make_preference_iterator = _maker("preference")
make_unpaired_iterator = _maker("unpaired")
make_ranked_iterator = _maker("ranked")
make_step_iterator = _maker("step")
make_prompt_iterator = _maker("prompt")


# -- reference log-probs -------------------------------------------------------


def _ref_meta(s: dict, tokenizer, info: _Source, num_rows: int) -> dict:
  return {
    "source": info.fingerprint,
    "num_rows": num_rows,
    "max_prompt_len": s["max_prompt_len"],
    "max_completion_len": s["max_completion_len"],
    "prompt_truncation": s["prompt_truncation"],
    "vocab_size": int(tokenizer.vocab_size),
    "tokenizer": type(tokenizer).__name__,
    "chat_template": hashlib.sha256(
      str(_Encoder(tokenizer, s).template).encode()
    ).hexdigest()[:16],
  }


def _ref_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.exists():
    return [path]
  parts = sorted(path.parent.glob(f"{path.stem}-*-of-*{path.suffix}"))
  if not parts:
    raise FileNotFoundError(
      f"no reference log-probs at {path} (or "
      f"{path.stem}-<i>-of-<n>{path.suffix})."
    )
  return parts


def _load_reference_logps(path, meta: dict):
  chosen = np.zeros((meta["num_rows"],), np.float32)
  rejected = np.zeros((meta["num_rows"],), np.float32)
  have = np.zeros((meta["num_rows"],), bool)
  for f in _ref_files(pathlib.Path(path)):
    with np.load(f) as z:
      saved = json.loads(str(z["meta"]))
      if saved != meta:
        diff = {
          k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v
        }
        raise ValueError(
          f"reference log-probs {f} were computed for other "
          f"data or tokenisation (saved, current): {diff}."
        )
      idx = z["index"]
      chosen[idx] = z["ref_chosen_logps"]
      rejected[idx] = z["ref_rejected_logps"]
      have[idx] = True
  return chosen, rejected, have


def precompute_reference_logps(
  data_config,
  tokenizer,
  logps_fn: Callable[[batch_lib.PreferenceBatch], tuple[Any, Any]],
  *,
  batch_size: int,
  output_path=None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> pathlib.Path:
  """Runs ``logps_fn`` once over a preference dataset and stores the result.

  The dataset is read in source order (one epoch, this host's slice); each
  batch is the same :class:`PreferenceBatch` the training iterator makes,
  and ``logps_fn(batch) -> (ref_chosen_logps [B], ref_rejected_logps [B])``
  (for example a jitted reference-model forward; no model is imported
  here). The values of real rows are saved, keyed by source row index, to
  an ``.npz`` side file (``-<i>-of-<n>`` per host when several), with a
  fingerprint of the data and tokenisation. A preference iterator whose
  config has ``ref_logps_path`` set to this path then fills
  ``PreferenceBatch.ref_chosen_logps`` / ``ref_rejected_logps`` (and raises
  if a row has none, or if the fingerprint differs).

  Args:
    data_config: the preference data block.
    tokenizer: the training tokenizer.
    logps_fn: batch → two ``[B]`` arrays of summed completion log-probs.
    batch_size: rows per ``logps_fn`` call.
    output_path: where to write; default ``data_config.ref_logps_path``.
    process_index, process_count: host layout (default: JAX's).

  Returns:
    The file written.
  """
  s = _settings(data_config)
  out = output_path or s["ref_logps_path"]
  if not out:
    raise ValueError(
      "precompute_reference_logps: pass output_path or set "
      "data config ref_logps_path."
    )
  out = pathlib.Path(out)
  pi, pc = _process_layout(process_index, process_count)
  cfg = {
    **s,
    "shuffle": False,
    "num_epochs": 1,
    "ref_logps_path": "",
    "drop_remainder": False,
  }
  it = make_iterator(
    "preference",
    cfg,
    tokenizer,
    batch_size=batch_size,
    process_index=pi,
    process_count=pc,
  )
  idx, chosen, rejected = [], [], []
  for batch in it:
    c, r = logps_fn(batch)
    c = np.asarray(c, np.float32).reshape(-1)
    r = np.asarray(r, np.float32).reshape(-1)
    if c.shape != (batch_size,) or r.shape != (batch_size,):
      raise ValueError(
        f"logps_fn must return two [{batch_size}] arrays, got "
        f"{c.shape} and {r.shape}."
      )
    real = it.last_source_indices >= 0
    idx.append(it.last_source_indices[real])
    chosen.append(c[real])
    rejected.append(r[real])
  meta = _ref_meta(s, tokenizer, it._info, it._n)  # noqa: SLF001
  target = (
    out
    if pc == 1
    else out.with_name(f"{out.stem}-{pi:05d}-of-{pc:05d}{out.suffix or '.npz'}")
  )
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=f".{target.name}.", suffix=".npz", dir=target.parent
  )
  os.close(fd)
  try:
    np.savez(
      tmp,
      index=np.concatenate(idx).astype(np.int64),
      ref_chosen_logps=np.concatenate(chosen),
      ref_rejected_logps=np.concatenate(rejected),
      meta=np.asarray(json.dumps(meta, sort_keys=True)),
    )
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  log.info(
    "reference log-probs of %d rows written to %s",
    sum(len(i) for i in idx),
    target,
  )
  return target
