r"""Golden logits and generations from tiny random Hugging Face models.

Builds one tiny, randomly initialised model per supported architecture with
``transformers`` (no downloads), saves it under ``tests/testdata/hf/<name>/``
(``config.json`` + ``model.safetensors``, float16 weights to keep the files
small) and records reference outputs computed in float32 on fixed inputs:

* ``logits``: ``[2, 10, V]`` on an unpadded batch;
* ``padded_logits``: the same shape on a left-padded batch, with
  ``position_ids = cumsum(attention_mask) - 1`` (what ``generate`` uses);
* ``generated``: 16 greedy tokens from a left-padded prompt batch;
* for sequence classifiers, ``scores`` / ``padded_scores`` (``[2]``).

It also checks the other direction: ``--check_export DIR`` loads the
directories that ``alignment.models.hf.export_hf_checkpoint`` wrote (made by
``--export DIR`` in the JAX venv) with ``transformers`` and records in
``tests/testdata/hf/export_check.json`` whether their outputs match the
goldens.

Three steps, from the repository root::

  HF_HUB_OFFLINE=1 .venv-oracle/bin/python tests/oracles/hf_models.py
  .venv/bin/python tests/oracles/hf_models.py --export scratch/hf_export
  HF_HUB_OFFLINE=1 .venv-oracle/bin/python tests/oracles/hf_models.py \
      --check_export scratch/hf_export

The tests (``tests/models/hf_test.py``) only read the files; CI never runs
this script.
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "testdata" / "hf"

VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
NEW_TOKENS = 16
SEED = 0

# name -> (transformers class, config class, config kwargs)
_COMMON = dict(
  vocab_size=VOCAB,
  pad_token_id=PAD,
  bos_token_id=BOS,
  eos_token_id=EOS,
  initializer_range=0.2,
)
_LLAMA = dict(
  _COMMON,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
)
MODELS = {
  "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_LLAMA)),
  "llama_scaled": (
    "LlamaForCausalLM",
    "LlamaConfig",
    dict(
      _LLAMA,
      rope_theta=500000.0,
      rope_scaling=dict(
        rope_type="llama3",
        factor=4.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
    ),
  ),
  "llama_tied": (
    "LlamaForCausalLM",
    "LlamaConfig",
    dict(_LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
  ),
  "llama_seqcls": (
    "LlamaForSequenceClassification",
    "LlamaConfig",
    dict(_LLAMA, num_labels=1),
  ),
  "mistral": (
    "MistralForCausalLM",
    "MistralConfig",
    dict(_LLAMA, sliding_window=4, head_dim=8),
  ),
  "qwen2": (
    "Qwen2ForCausalLM",
    "Qwen2Config",
    dict(_LLAMA, rope_theta=1000000.0, rms_norm_eps=1e-6),
  ),
  "qwen3": (
    "Qwen3ForCausalLM",
    "Qwen3Config",
    dict(
      _LLAMA,
      head_dim=16,
      rope_theta=1000000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
    ),
  ),
  "gpt2": (
    "GPT2LMHeadModel",
    "GPT2Config",
    dict(
      vocab_size=VOCAB,
      pad_token_id=PAD,
      bos_token_id=BOS,
      eos_token_id=EOS,
      initializer_range=0.2,
      n_embd=32,
      n_layer=2,
      n_head=4,
      n_positions=64,
      n_inner=64,
      activation_function="gelu_new",
    ),
  ),
  "gpt_neox": (
    "GPTNeoXForCausalLM",
    "GPTNeoXConfig",
    dict(
      _COMMON,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=64,
      rotary_pct=0.5,
      rotary_emb_base=10000,
      use_parallel_residual=True,
      hidden_act="gelu",
      layer_norm_eps=1e-5,
      tie_word_embeddings=False,
    ),
  ),
}


def make_inputs():
  """Fixed token batches shared by every model (numpy int32)."""
  rng = np.random.default_rng(1234)
  tokens = rng.integers(3, VOCAB, size=(2, 10)).astype(np.int32)
  padded = rng.integers(3, VOCAB, size=(2, 10)).astype(np.int32)
  padded_mask = np.ones((2, 10), bool)
  padded_mask[0, :4] = False
  padded_mask[1, :1] = False
  padded[~padded_mask] = PAD
  prompt = rng.integers(3, VOCAB, size=(2, 6)).astype(np.int32)
  prompt_mask = np.ones((2, 6), bool)
  prompt_mask[1, :2] = False
  prompt[~prompt_mask] = PAD
  return dict(
    tokens=tokens,
    padded_tokens=padded,
    padded_mask=padded_mask,
    prompt=prompt,
    prompt_mask=prompt_mask,
  )


def _positions(mask):
  return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def _torch_outputs(model, inputs, *, classifier):
  """Runs the reference computations in float32; returns a dict of numpy."""
  import torch

  out = {}
  with torch.no_grad():
    t = torch.as_tensor(inputs["tokens"], dtype=torch.long)
    p = torch.as_tensor(inputs["padded_tokens"], dtype=torch.long)
    m = torch.as_tensor(inputs["padded_mask"], dtype=torch.long)
    pos = torch.as_tensor(_positions(inputs["padded_mask"]), dtype=torch.long)
    key = "scores" if classifier else "logits"
    full = model(input_ids=t).logits
    padded = model(input_ids=p, attention_mask=m, position_ids=pos).logits
    if classifier:
      full, padded = full[:, 0], padded[:, 0]
    out[key] = full.float().numpy()
    out["padded_" + key] = padded.float().numpy()
    if not classifier:
      prompt = torch.as_tensor(inputs["prompt"], dtype=torch.long)
      pmask = torch.as_tensor(inputs["prompt_mask"], dtype=torch.long)
      gen = model.generate(
        input_ids=prompt,
        attention_mask=pmask,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
      )
      out["generated"] = (
        gen.sequences[:, prompt.shape[1] :].numpy().astype(np.int32)
      )
      scores = torch.stack(gen.scores, 1).float()  # [B, NEW, V]
      top2 = torch.topk(scores, 2, dim=-1).values
      out["min_top2_gap"] = float((top2[..., 0] - top2[..., 1]).min())
  return out


def generate():
  """Builds, saves and runs every model; writes goldens under OUT."""
  import torch
  import transformers

  torch.manual_seed(SEED)
  inputs = make_inputs()
  OUT.mkdir(parents=True, exist_ok=True)
  np.savez(OUT / "inputs.npz", **inputs)
  manifest = {
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "models": {},
  }
  for name, (cls_name, cfg_name, kwargs) in MODELS.items():
    config = getattr(transformers, cfg_name)(**kwargs)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # Non-trivial norms/biases so mapping errors show.
      for pname, param in model.named_parameters():
        if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
          param.add_(0.2 * torch.randn_like(param))
    target = OUT / name
    model.half().save_pretrained(target, safe_serialization=True)
    for extra in ("generation_config.json",):
      (target / extra).unlink(missing_ok=True)
    # Reload in float32: weights are exactly the saved float16 values, and
    # buffers (RoPE inverse frequencies) are recomputed in float32.
    model = (
      getattr(transformers, cls_name)
      .from_pretrained(target, dtype=torch.float32)
      .eval()
    )
    classifier = cls_name.endswith("ForSequenceClassification")
    outs = _torch_outputs(model, inputs, classifier=classifier)
    gap = outs.pop("min_top2_gap", None)
    if gap is not None and gap < 1e-3:
      raise RuntimeError(f"{name}: greedy decoding has a near tie ({gap}).")
    np.savez(target / "outputs.npz", **outs)
    manifest["models"][name] = {"class": cls_name, "min_top2_gap": gap}
    print(name, {k: v.shape for k, v in outs.items()}, "gap", gap)
  (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def export(directory):
  """JAX side: import each golden model with our loader and export it."""
  sys.path.insert(0, str(ROOT))
  from alignment.models import hf

  directory = pathlib.Path(directory)
  manifest = json.loads((OUT / "manifest.json").read_text())
  for name, info in manifest["models"].items():
    kind = (
      "reward"
      if info["class"].endswith("ForSequenceClassification")
      else "causal_lm"
    )
    config, model = hf.load_hf_checkpoint(OUT / name, kind=kind)
    hf.export_hf_checkpoint(model, config, directory / name, kind=kind)
    print("exported", name, kind)


def check_export(directory):
  """Torch side: load our exports with transformers, compare to goldens."""
  import torch
  import transformers

  directory = pathlib.Path(directory)
  inputs = dict(np.load(OUT / "inputs.npz"))
  manifest = json.loads((OUT / "manifest.json").read_text())
  report = {"transformers": transformers.__version__, "models": {}}
  for name, info in manifest["models"].items():
    classifier = info["class"].endswith("ForSequenceClassification")
    auto = (
      transformers.AutoModelForSequenceClassification
      if classifier
      else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(directory / name, dtype=torch.float32).eval()
    got = _torch_outputs(model, inputs, classifier=classifier)
    want = dict(np.load(OUT / name / "outputs.npz"))
    diffs = {}
    for key, value in want.items():
      if key == "generated":
        diffs[key] = int(np.sum(got[key] != value))
      else:
        mask = inputs["padded_mask"] if key == "padded_logits" else None
        delta = np.abs(got[key] - value)
        if mask is not None:
          delta = delta[mask]
        diffs[key] = float(delta.max())
    match = all(
      v <= 1e-4 if isinstance(v, float) else v == 0 for v in diffs.values()
    )
    report["models"][name] = {
      "loaded_as": type(model).__name__,
      "diffs": diffs,
      "match": match,
    }
    print(name, type(model).__name__, diffs, "match" if match else "MISMATCH")
  (OUT / "export_check.json").write_text(json.dumps(report, indent=1) + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--export", help="JAX venv: write our exports here")
  parser.add_argument("--check_export", help="torch venv: check exports")
  args = parser.parse_args()
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if args.export:
    export(args.export)
  elif args.check_export:
    check_export(args.check_export)
  else:
    generate()


if __name__ == "__main__":
  main()
