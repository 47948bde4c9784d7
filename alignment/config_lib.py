"""Helpers shared by every ``configs/*.py`` file (their only import).

* :func:`parse_arg` turns the ``:key=value,flag`` suffix of ``--config`` into
  a typed ConfigDict, as big_vision does.
* :data:`DEFAULT_RULES` is the logical-axis → mesh-axis table.
* :func:`model` returns the model block of a config for a named preset.
"""

import ml_collections

DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("members", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("length", None),
  ("layers", None),
)
"""First matching rule wins; mesh axes of size 1 are dropped."""

DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))


def parse_arg(
  arg: str | None, *, lazy: bool = False, **spec
) -> ml_collections.ConfigDict:
  """Parses ``"a=1,b=x,flag"`` into a ConfigDict typed by ``spec``'s defaults.

  Args:
    arg: the string after ``:`` in ``--config=path.py:arg`` (may be None).
    lazy: accept keys not in ``spec`` (typed as strings).
    **spec: the valid keys and their defaults; a default's type converts the
      value (``bool`` accepts a bare ``flag`` and ``true/false/1/0``).

  Returns:
    ConfigDict with every key of ``spec``.

  Raises:
    ValueError: for an unknown key (listing the valid ones) or a bad value.
  """
  result = ml_collections.ConfigDict(dict(spec))
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(
          f"config arg: unknown key {key!r} in {arg!r}; valid "
          f"keys are {sorted(spec)}."
        )
      result[key] = value
      continue
    default = spec[key]
    if isinstance(default, bool):
      if not _:
        result[key] = True
      elif value.lower() in ("1", "true", "yes"):
        result[key] = True
      elif value.lower() in ("0", "false", "no"):
        result[key] = False
      else:
        raise ValueError(f"config arg: {key}={value!r} is not a boolean.")
    elif not _:
      raise ValueError(f"config arg: {key!r} needs a value ({key}=...).")
    elif default is None or isinstance(default, str):
      result[key] = value
    else:
      try:
        result[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
          f"config arg: {key}={value!r} is not a {type(default).__name__}."
        ) from e
  return result


def model(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The ``config.model`` block: a preset name plus field overrides.

  The trainer resolves it with ``alignment.models.get_preset(preset,
  **overrides)``; every field of ``ModelConfig`` may be overridden from the
  command line (``--config.model.overrides.n_layers=4``).
  """
  block = ml_collections.ConfigDict()
  block.preset = preset
  block.dtype = "float32"
  block.param_dtype = "float32"
  block.remat = False
  # "dense", "blockwise" (FlashAttention-style, memory linear in length) or
  # "auto": see ModelConfig.attention_impl.
  block.attention_impl = "auto"
  block.overrides = ml_collections.ConfigDict(overrides)
  block.init_from = ""  # a Hugging Face checkpoint directory, or ""
  return block


def optimizer(
  learning_rate: float, total_steps_ref, **kw
) -> ml_collections.ConfigDict:
  """The ``config.optimizer`` block (optax adamw + warmup-cosine schedule)."""
  block = ml_collections.ConfigDict()
  block.name = "adamw"
  block.learning_rate = learning_rate
  block.schedule = "warmup_cosine"  # or "constant", "warmup_linear"
  block.warmup_steps = total_steps_ref // 10
  block.b1 = 0.9
  block.b2 = 0.999
  block.eps = 1e-8
  block.weight_decay = 0.0
  block.grad_clip_norm = 1.0
  block.mu_dtype = "float32"  # or "bfloat16": Adam's first moment stored bf16
  block.update(kw)
  return block


def mesh_block(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _field_type(annotation) -> type:
  """The scalar type of a hyperparameter's annotation (``object`` if none)."""
  if isinstance(annotation, str):
    return _FIELD_TYPES.get(annotation, object)
  return annotation if annotation in (int, float, bool, str) else object


def required_placeholder(annotation=int) -> ml_collections.FieldReference:
  """The config value of a hyperparameter that has no default: ``None``
  typed by its annotation, so ``--config.<block>.<key>=...`` parses; a
  trainer (and :func:`check_required`) rejects it while it is ``None``."""
  return ml_collections.FieldReference(None, field_type=_field_type(annotation))


def _keyword_defaults(fn) -> dict:
  """Every keyword-only hyperparameter of ``fn`` with its default; those
  without a default get :func:`required_placeholder` (``None``)."""
  import inspect  # noqa: PLC0415

  out = {}
  sig = inspect.signature(inspect.unwrap(fn))
  for name, p in sig.parameters.items():
    if p.kind != p.KEYWORD_ONLY:
      continue
    out[name] = (
      required_placeholder(p.annotation) if p.default is p.empty else p.default
    )
  return out


def required_keys(fn) -> list[str]:
  """Keyword-only hyperparameters of ``fn`` that have no default."""
  import inspect  # noqa: PLC0415

  sig = inspect.signature(inspect.unwrap(fn))
  return [
    n
    for n, p in sig.parameters.items()
    if p.kind == p.KEYWORD_ONLY and p.default is p.empty
  ]


def _block_from_registry(
  registry: dict, kind: str, name: str, overrides
) -> ml_collections.ConfigDict:
  if name not in registry:
    raise ValueError(
      f"unknown {kind} {name!r}; valid choices are {sorted(registry)}."
    )
  defaults = _keyword_defaults(registry[name])
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(
      f"{kind} {name!r} has no hyperparameters {unknown}; "
      f"valid ones are {sorted(defaults)}."
    )
  block = ml_collections.ConfigDict()
  block.name = name
  for key, value in {**defaults, **overrides}.items():
    # ConfigDict cannot hold None with a later-typed override; keep None.
    block[key] = value
  return block


def _registries() -> dict:
  from alignment import advantages, losses  # noqa: PLC0415

  return {"loss": losses.REGISTRY, "advantage": advantages.REGISTRY}


def unset_required(config, prefix: str = "config") -> list[str]:
  """Dotted keys of required hyperparameters (no default in the function)
  still ``None`` in every ``loss`` / ``advantage`` block of ``config``
  (nested stage configs included)."""
  registries = _registries()
  out = []
  for key, value in config.items():
    if not isinstance(value, ml_collections.ConfigDict):
      continue
    path = f"{prefix}.{key}"
    registry = registries.get(key)
    name = value.get("name") if registry is not None else None
    if isinstance(name, str) and name in registry:
      out += [
        f"{path}.{k}"
        for k in required_keys(registry[name])
        if value.get(k) is None
      ]
    else:
      out += unset_required(value, path)
  return out


def check_required(config) -> None:
  """Fails at start if a required hyperparameter was left unset.

  Raises:
    ValueError: naming each key (e.g. ``config.advantage.k`` of
      ``pass_at_k``) and how to set it.
  """
  missing = unset_required(config)
  if missing:
    flags = " ".join(f"--{k}=..." for k in missing)
    raise ValueError(
      f"{missing} have no default and must be set (e.g. {flags})."
    )


def loss(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.loss``: a ``losses.REGISTRY`` name plus every keyword
  hyperparameter of that function with its default (``--config.loss.beta``
  works, a typo fails under ``lock_config``)."""
  from alignment import losses  # noqa: PLC0415 - jax only, no flax

  return _block_from_registry(losses.REGISTRY, "loss", name, overrides)


def advantage(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.advantage``: an ``advantages.REGISTRY`` name + hyperparams."""
  from alignment import advantages  # noqa: PLC0415

  return _block_from_registry(
    advantages.REGISTRY, "advantage estimator", name, overrides
  )


def registry_names(kind: str) -> list[str]:
  """Names a sweep can iterate over: ``preference``, ``reward_model``,
  ``policy``, ``advantage``."""
  from alignment import advantages, losses  # noqa: PLC0415

  table = {
    "preference": losses.PREFERENCE_LOSSES,
    "reward_model": losses.REWARD_MODEL_LOSSES,
    "policy": losses.POLICY_LOSSES,
    "advantage": advantages.REGISTRY,
  }
  return sorted(table[kind])


def data(source: str = "synthetic", **kw) -> ml_collections.ConfigDict:
  """The ``config.data`` block read by ``alignment.data`` iterators."""
  block = ml_collections.ConfigDict()
  block.source = source
  block.path = ""
  block.split = "train"
  block.data_dir = ""
  block.max_prompt_len = 16
  block.max_completion_len = 16
  block.shuffle = True
  block.num_epochs = ml_collections.FieldReference(None, field_type=int)
  block.on_error = "raise"
  block.padding = "max"
  block.field_map = ml_collections.ConfigDict()
  block.num_examples = 2048
  block.task_seed = 0
  block.task = ml_collections.ConfigDict(
    dict(
      n_prompt_letters=5,
      completion_len=8,
      p_in=0.3,
      label_temperature=0.1,
      rule="first_half",
    )
  )
  block.update(kw)
  return block


def base(
  trainer: str,
  *,
  total_steps: int,
  batch_size: int,
  learning_rate: float,
  model_preset: str = "small",
) -> ml_collections.ConfigDict:
  """Fields every trainer config has (steps, batch, model, optimiser, mesh,
  rules, checkpoints, logging)."""
  config = ml_collections.ConfigDict()
  config.trainer = trainer
  config.seed = 0
  config.total_steps = ml_collections.FieldReference(total_steps)
  config.batch_size = batch_size
  config.microbatches = 1
  config.tokenizer = "byte"
  config.model = model(model_preset)
  config.optimizer = optimizer(learning_rate, config.get_ref("total_steps"))
  config.mesh = [list(axis) for axis in DEFAULT_MESH]
  config.logical_axis_rules = [list(rule) for rule in DEFAULT_RULES]
  config.checkpoint = ml_collections.ConfigDict(
    dict(enabled=True, every=200, keep=2, async_save=True)
  )
  config.log_every = 1
  config.progress = True
  config.logps_chunk_size = 2048
  config.export_hf = False
  return config


def runlocal(
  config: ml_collections.ConfigDict, *, steps: int = 2, batch_size: int = 8
) -> ml_collections.ConfigDict:
  """Shrinks a config for a CPU smoke run (tiny model, few steps)."""
  config.total_steps = steps
  config.batch_size = batch_size
  config.model = model("tiny")
  config.checkpoint.every = 0
  if "data" in config:
    config.data.max_prompt_len = 8
    config.data.max_completion_len = 9
    config.data.num_examples = 64
  return config
