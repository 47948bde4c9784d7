"""Greedy decoding with Tunix's sampler, for ``bench/sampling.py``.

Runs in ``.venv-tunix`` (google-tunix 0.1.7, jax, flax). Serves requests,
one JSON object per line on stdin, one JSON reply per line on stdout:

  request: {"model_dir": ..., "prompts": [[id, ...], ...],
            "new_tokens": T}
  reply:   {"seconds", "cpu_seconds", "first_row", "tokens", "versions"}

The model is Tunix's own ``Llama3`` (``tunix.models.llama3.model``), built
from the Hugging Face checkpoint that ``bench/sampling.py`` exports from our
model (`alignment.models.export_hf_checkpoint`) through Tunix's own loader,
``tunix.models.llama3.params.create_model_from_safe_tensors``: the same
weights as ours and transformers'. Its dimensions come from the checkpoint's
``config.json``.

Generation is ``tunix.generate.sampler.Sampler.__call__`` (prefill, then a
``while_loop`` of decode steps against a KV cache of ``P + T`` slots),
greedy (``temperature=0``, no ``top_p``), with the EOS id set outside the
vocabulary so every row produces exactly ``T`` tokens. Tunix's sampler takes
strings: the tokenizer here is a trivial adapter whose "text" is the ids
written in decimal, so no id is changed and no BOS is prepended. Prompts
are exactly ``P`` tokens long and ``max_prompt_length=P``, so there is no
padding; the adapter's pad id is ``V + 1``, outside the vocabulary, because
Tunix's decode step masks out of attention every position whose token
equals the pad id, generated ones included (with the model's own pad id a
generated pad token would be hidden from later steps, which neither ours
nor transformers do).

Tunix 0.1.7's ``Llama3`` attention calls ``apply_rope`` without the
config's ``rope_theta``, so RoPE always uses that function's default base,
1e6 (checked: changing ``rope_theta`` in the config does not change the
output). The worker reports that base; ``bench/sampling.py`` builds its
models with ``rope_theta=1e6`` so that all sides compute the same function.

Time is wall (and process CPU) time of the whole call, including Tunix's
host-side tokenisation and output slicing, compile excluded (the parent
warms each shape up first).
"""

import inspect
import json
import pathlib
import sys
import time
import warnings


class _IdTokenizer:
  """Tunix tokenizer protocol over decimal ids ("12 7 255")."""

  def __init__(self, pad_id, eos_id):
    self._pad, self._eos = pad_id, eos_id

  def encode(self, text, **kwargs):
    del kwargs
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    del kwargs
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None  # falsy: Tunix prepends nothing

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return self._pad


def _theta_of(hf):
  """The RoPE base of a Hugging Face ``config.json`` dict."""
  return float(
    hf.get("rope_theta")
    or hf.get("rope_parameters", {}).get("rope_theta", 10000.0)
  )


def _load(model_dir):
  from tunix.models.llama3 import model as llama3  # noqa: PLC0415
  from tunix.models.llama3 import params as llama3_params  # noqa: PLC0415

  hf = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
  if hf.get("rope_scaling"):
    raise ValueError(f"rope_scaling {hf['rope_scaling']} is not supported")
  theta = _theta_of(hf)
  if float(theta) != int(theta):
    raise ValueError(f"Tunix's Llama3 takes an integer rope_theta: {theta}")
  cfg = llama3.ModelConfig(
    num_layers=hf["num_hidden_layers"],
    vocab_size=hf["vocab_size"],
    embed_dim=hf["hidden_size"],
    hidden_dim=hf["intermediate_size"],
    num_heads=hf["num_attention_heads"],
    head_dim=hf.get("head_dim")
    or hf["hidden_size"] // hf["num_attention_heads"],
    num_kv_heads=hf["num_key_value_heads"],
    rope_theta=int(theta),
    norm_eps=hf["rms_norm_eps"],
    weight_tying=bool(hf.get("tie_word_embeddings", False)),
  )
  model = llama3_params.create_model_from_safe_tensors(str(model_dir), cfg)
  base = inspect.signature(llama3.apply_rope).parameters["rope_theta"].default
  hf["tunix_rope_base"] = base
  return model, cfg, hf


def main():
  warnings.filterwarnings("ignore")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from tunix.generate import sampler as sampler_lib  # noqa: PLC0415

  versions = dict(jax=jax.__version__)
  try:
    from importlib.metadata import version  # noqa: PLC0415

    versions["tunix"] = version("google-tunix")
  except Exception:  # noqa: BLE001
    versions["tunix"] = "?"
  models, samplers = {}, {}
  for line in sys.stdin:
    req = json.loads(line)
    try:
      if req["model_dir"] not in models:
        models[req["model_dir"]] = _load(req["model_dir"])
      model, cfg, hf = models[req["model_dir"]]
      prompts = np.asarray(req["prompts"], np.int64)
      b, p = prompts.shape
      new = req["new_tokens"]
      key = (req["model_dir"], b, p, new)
      if key not in samplers:
        samplers[key] = sampler_lib.Sampler(
          transformer=model,
          # Pad and EOS ids outside the vocabulary (see the module doc).
          tokenizer=_IdTokenizer(cfg.vocab_size + 1, cfg.vocab_size),
          cache_config=sampler_lib.CacheConfig(
            cache_size=p + new,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
          ),
        )
      sampler = samplers[key]
      texts = [" ".join(map(str, row)) for row in prompts.tolist()]
      start, cpu = time.perf_counter(), time.process_time()
      out = sampler(
        texts,
        max_generation_steps=new,
        max_prompt_length=p,
        echo=False,
        temperature=0.0,
        eos_tokens=[cfg.vocab_size],  # outside the vocabulary: never hit
      )
      seconds = time.perf_counter() - start
      cpu = time.process_time() - cpu
      lengths = sorted({len(t) for t in out.tokens})
      if lengths != [new]:
        raise RuntimeError(f"Tunix returned completion lengths {lengths}")
      reply = dict(
        seconds=seconds,
        cpu_seconds=cpu,
        first_row=[int(t) for t in out.tokens[0]],
        versions=versions,
        rope_theta=dict(checkpoint=_theta_of(hf), tunix=hf["tunix_rope_base"]),
      )
    except Exception as e:  # noqa: BLE001
      reply = dict(error=f"{type(e).__name__}: {e}")
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  main()
