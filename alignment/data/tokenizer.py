"""Tokenizers behind one small interface, and chat templating.

* :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus four specials; needs no
  files (the tiny preset and the default run use it).
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` (the Rust
  ``tokenizers`` library) with the special tokens and chat template of the
  checkpoint's ``tokenizer_config.json`` / ``chat_template.jinja``.
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` file.
* :func:`load_tokenizer`: ``"byte"``, a checkpoint directory, a
  ``tokenizer.json`` or a ``.model`` file.

``encode`` never adds special tokens: the data pipelines add BOS (when the
tokenizer has ``bos_id``) and EOS themselves, so every tokenizer behaves the
same way.

Chat templates. :func:`apply_chat_template` renders a list of
``{"role", "content"}`` messages with the tokenizer's Jinja template exactly
as Hugging Face ``transformers`` does (sandboxed ``jinja2`` environment with
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a no-op
``{% generation %}`` block, ``raise_exception``, ``strftime_now``, a
``tojson`` filter with ``ensure_ascii=False``, and the special tokens
``bos_token``/``eos_token``/``pad_token``/``unk_token`` as variables). A
tokenizer without a template uses the documented plain format
:data:`PLAIN_CHAT_FORMAT` instead, which is Anthropic HH-RLHF's own::

  "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}...\\n\\nAssistant: "

(``system`` turns render as ``"\\n\\nSystem: {content}"``; the generation
prompt is ``"\\n\\nAssistant: "`` with a trailing space).
"""

import dataclasses
import datetime
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = [
  "PLAIN_CHAT_FORMAT",
  "ByteTokenizer",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "apply_chat_template",
  "load_tokenizer",
  "render_plain_chat",
]


class Tokenizer(Protocol):
  """What the data pipelines and the sampler need from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 byte tokenizer: ids 0..255 are bytes; 256 pad, 257 bos, 258 eos,
  259 unk (never produced by ``encode``). ``vocab_size`` is 260."""

  vocab_size = 260
  pad_id = 256
  bos_id = 257
  eos_id = 258
  unk_id = 259
  chat_template = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if 0 <= i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")

  def apply_chat_template(
    self, messages, *, add_generation_prompt=False, **kwargs
  ) -> str:
    """The plain format (the byte tokenizer has no template)."""
    return apply_chat_template(
      self, messages, add_generation_prompt=add_generation_prompt, **kwargs
    )


# -- chat templates -----------------------------------------------------------

#: Role names and separators of the plain fallback format (HH-RLHF's).
PLAIN_CHAT_FORMAT = {
  "roles": {"system": "System", "user": "Human", "assistant": "Assistant"},
  "turn_prefix": "\n\n",
  "name_separator": ": ",
  "generation_prompt": "\n\nAssistant: ",
}


def _check_messages(messages) -> list[dict]:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise TypeError(
      "chat messages must be a list of {'role', 'content'} "
      f"dicts, got {type(messages).__name__}."
    )
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise TypeError(
        f"chat message {i} must be a dict with 'role' and 'content', got {m!r}."
      )
    out.append(dict(m))
  return out


def render_plain_chat(messages, *, add_generation_prompt: bool = False) -> str:
  """Renders messages in :data:`PLAIN_CHAT_FORMAT` (no template needed).

  Args:
    messages: ``[{"role": "system"|"user"|"assistant", "content": str}]``.
    add_generation_prompt: append ``"\\n\\nAssistant: "`` so a completion
      can follow.

  Returns:
    The rendered text, e.g. ``"\\n\\nHuman: hi\\n\\nAssistant: "``.

  Raises:
    ValueError: a role other than system/user/assistant.
  """
  fmt = PLAIN_CHAT_FORMAT
  parts = []
  for m in _check_messages(messages):
    role = m["role"]
    if role not in fmt["roles"]:
      raise ValueError(
        f"plain chat format: unknown role {role!r}; valid: "
        f"{sorted(fmt['roles'])}."
      )
    parts.append(
      fmt["turn_prefix"]
      + fmt["roles"][role]
      + fmt["name_separator"]
      + str(m["content"])
    )
  if add_generation_prompt:
    parts.append(fmt["generation_prompt"])
  return "".join(parts)


_JINJA_ENVS: dict[str, Any] = {}


def _compile_template(template: str):
  """Compiles a chat template the way ``transformers`` does (cached)."""
  if template in _JINJA_ENVS:
    return _JINJA_ENVS[template]
  try:
    import jinja2  # noqa: PLC0415
    from jinja2 import ext, nodes  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "this tokenizer ships a Jinja chat template; rendering it needs the "
      "'jinja2' package (pip install jinja2), or set the data config's "
      "chat_template='none' to use the plain format."
    ) from e

  class _Generation(ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (HF
    uses the block to mark assistant tokens; we do not need the marks)."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.Scope(body, lineno=lineno)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(
    x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
  ):
    return json.dumps(
      x,
      ensure_ascii=ensure_ascii,
      indent=indent,
      separators=separators,
      sort_keys=sort_keys,
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=[_Generation, ext.loopcontrols],
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  compiled = env.from_string(template)
  _JINJA_ENVS[template] = compiled
  return compiled


def apply_chat_template(
  tokenizer,
  messages,
  *,
  add_generation_prompt: bool = False,
  chat_template: str | None = None,
  **kwargs,
) -> str:
  """Renders chat ``messages`` to text with the tokenizer's template.

  Args:
    tokenizer: any tokenizer; its ``chat_template`` attribute (a Jinja
      string or None) and special-token strings are used.
    messages: ``[{"role", "content"}, ...]``.
    add_generation_prompt: end with the assistant turn's opening so a
      completion can follow.
    chat_template: overrides the tokenizer's template (a Jinja string).
    **kwargs: extra template variables (``tools``, ``documents``, ...).

  Returns:
    The rendered text. Without any template: :func:`render_plain_chat`.

  Raises:
    jinja2.TemplateError: the template called ``raise_exception`` (for
      example on alternating-role violations).
  """
  messages = _check_messages(messages)
  template = chat_template or getattr(tokenizer, "chat_template", None)
  if not template:
    return render_plain_chat(
      messages, add_generation_prompt=add_generation_prompt
    )
  variables = dict(getattr(tokenizer, "special_tokens", {}) or {})
  variables.setdefault("tools", None)
  variables.setdefault("documents", None)
  variables.update(kwargs)
  return _compile_template(template).render(
    messages=messages, add_generation_prompt=add_generation_prompt, **variables
  )


# -- Hugging Face tokenizer.json ---------------------------------------------


def _token_content(value) -> str | None:
  """``tokenizer_config.json`` stores tokens as strings or AddedToken dicts."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    return value.get("content")
  return str(value)


def _read_json(path: pathlib.Path) -> dict:
  if not path.exists():
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_chat_template(directory: pathlib.Path, config: Mapping) -> str | None:
  """``chat_template.jinja`` (transformers >= 4.43 layout) or the config's
  ``chat_template`` (a string, or a list of ``{"name", "template"}``)."""
  jinja_file = directory / "chat_template.jinja"
  if jinja_file.exists():
    return jinja_file.read_text(encoding="utf-8")
  json_file = directory / "chat_template.json"
  template = (
    _read_json(json_file).get("chat_template")
    if json_file.exists()
    else config.get("chat_template")
  )
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template or None


@dataclasses.dataclass
class _Specials:
  bos: str | None
  eos: str | None
  pad: str | None
  unk: str | None


def _specials_of(directory: pathlib.Path | None, config: Mapping) -> _Specials:
  smap = _read_json(directory / "special_tokens_map.json") if directory else {}

  def pick(name):
    return _token_content(config.get(name, smap.get(name)))

  return _Specials(
    pick("bos_token"), pick("eos_token"), pick("pad_token"), pick("unk_token")
  )


class HFTokenizer:
  """A Hugging Face fast tokenizer (``tokenizer.json``) without transformers.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    config: the checkpoint's ``tokenizer_config.json`` contents (special
      tokens, ``add_bos_token``, ``chat_template``).
    chat_template: the Jinja template (overrides ``config``).
    eos_token: override the EOS token (for example the end-of-turn token of
      a chat model when the config names another).

  ``bos_id`` is set only when the checkpoint prepends BOS: the config's
  ``add_bos_token`` when present, otherwise whether the tokenizer's own
  post-processor adds it. ``pad_id`` falls back to EOS when the checkpoint
  has no pad token (the pipelines mask padding, so its value is inert).
  """

  def __init__(
    self,
    tokenizer,
    config: Mapping | None = None,
    *,
    chat_template: str | None = None,
    eos_token: str | None = None,
    directory=None,
  ):
    config = dict(config or {})
    self._tok = tokenizer
    d = pathlib.Path(directory) if directory is not None else None
    specials = _specials_of(d, config)
    if eos_token is not None:
      specials.eos = eos_token
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._id_of(specials.eos, "eos_token")
    if self.eos_id is None:
      raise ValueError(
        "HFTokenizer: the tokenizer has no eos_token; pass "
        "eos_token=... (the pipelines append EOS to every "
        "completion)."
      )
    bos_id = self._id_of(specials.bos, "bos_token")
    if "add_bos_token" in config:
      adds_bos = bool(config["add_bos_token"])
    else:
      with_specials = tokenizer.encode("a", add_special_tokens=True).ids
      adds_bos = (
        bool(with_specials)
        and bos_id is not None
        and with_specials[0] == bos_id
      )
    self.bos_id = bos_id if adds_bos else None
    pad_id = self._id_of(specials.pad, "pad_token")
    self.pad_id = pad_id if pad_id is not None else self.eos_id
    self.unk_id = self._id_of(specials.unk, "unk_token")
    self.chat_template = chat_template or (
      _read_chat_template(d, config)
      if d is not None
      else config.get("chat_template")
    )
    self.special_tokens = {
      "bos_token": specials.bos or "",
      "eos_token": specials.eos or "",
      "pad_token": specials.pad or "",
      "unk_token": specials.unk or "",
    }

  def _id_of(self, token: str | None, name: str) -> int | None:
    if token is None:
      return None
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(
        f"HFTokenizer: {name} {token!r} is not in the vocabulary."
      )
    return int(i)

  @classmethod
  def from_dir(cls, path, **kwargs) -> "HFTokenizer":
    """Loads ``<path>/tokenizer.json`` and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer as RustTokenizer  # noqa: PLC0415

    d = pathlib.Path(path)
    if d.is_file():
      d = d.parent
    tok_file = d / "tokenizer.json"
    if not tok_file.exists():
      raise FileNotFoundError(f"no tokenizer.json in {d}")
    config = _read_json(d / "tokenizer_config.json")
    return cls(
      RustTokenizer.from_file(str(tok_file)), config, directory=d, **kwargs
    )

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts in parallel (Rust threads)."""
    return [
      e.ids
      for e in self._tok.encode_batch(list(texts), add_special_tokens=False)
    ]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to the first EOS, dropping special tokens."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._tok.decode(ids, skip_special_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def apply_chat_template(
    self, messages, *, add_generation_prompt=False, **kwargs
  ) -> str:
    return apply_chat_template(
      self, messages, add_generation_prompt=add_generation_prompt, **kwargs
    )


class SentencePieceTokenizer:
  """A SentencePiece model (``.model`` file).

  ``bos_id``/``eos_id``/``pad_id`` come from the model (a negative id means
  absent: no BOS; ``pad_id`` then falls back to EOS). A chat template can be
  passed (checkpoints such as Gemma ship one in ``tokenizer_config.json``,
  which :func:`load_tokenizer` reads).
  """

  def __init__(
    self,
    model_file,
    *,
    chat_template: str | None = None,
    add_bos: bool = True,
    special_tokens: Mapping | None = None,
  ):
    import sentencepiece as spm  # noqa: PLC0415

    self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    self.vocab_size = int(self._sp.get_piece_size())
    eos = self._sp.eos_id()
    if eos < 0:
      raise ValueError(
        f"SentencePieceTokenizer: {model_file} has no EOS "
        "piece (train it with eos_id >= 0)."
      )
    self.eos_id = int(eos)
    bos = self._sp.bos_id()
    self.bos_id = int(bos) if bos >= 0 and add_bos else None
    pad = self._sp.pad_id()
    self.pad_id = int(pad) if pad >= 0 else self.eos_id
    unk = self._sp.unk_id()
    self.unk_id = int(unk) if unk >= 0 else None
    self.chat_template = chat_template

    def piece(i):
      return self._sp.id_to_piece(i) if i is not None and i >= 0 else ""

    self.special_tokens = {
      "bos_token": piece(bos),
      "eos_token": piece(eos),
      "pad_token": piece(pad),
      "unk_token": piece(unk),
    }
    self.special_tokens.update(dict(special_tokens or {}))

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to the first EOS."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._sp.decode(ids)

  def apply_chat_template(
    self, messages, *, add_generation_prompt=False, **kwargs
  ) -> str:
    return apply_chat_template(
      self, messages, add_generation_prompt=add_generation_prompt, **kwargs
    )


def load_tokenizer(path_or_name: str | os.PathLike = "byte"):
  """The tokenizer named by a config's ``tokenizer`` field.

  Args:
    path_or_name: ``"byte"`` (:class:`ByteTokenizer`); a directory holding
      ``tokenizer.json`` (:class:`HFTokenizer`) or ``tokenizer.model``
      (:class:`SentencePieceTokenizer`, with ``tokenizer_config.json``'s
      chat template and BOS setting when present); or a path to either file.

  Raises:
    FileNotFoundError: nothing loadable at the path.
  """
  if str(path_or_name) in ("byte", ""):
    return ByteTokenizer()
  p = pathlib.Path(path_or_name)
  if p.is_file() and p.suffix == ".model":
    return SentencePieceTokenizer(p)
  if p.is_file() and p.name.endswith(".json"):
    return HFTokenizer.from_dir(p.parent)
  if p.is_dir():
    if (p / "tokenizer.json").exists():
      return HFTokenizer.from_dir(p)
    if (p / "tokenizer.model").exists():
      config = _read_json(p / "tokenizer_config.json")
      specials = _specials_of(p, config)
      names = {
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "unk_token": specials.unk,
      }
      return SentencePieceTokenizer(
        p / "tokenizer.model",
        chat_template=_read_chat_template(p, config),
        add_bos=bool(config.get("add_bos_token", True)),
        special_tokens={k: v for k, v in names.items() if v},
      )
  raise FileNotFoundError(
    f"load_tokenizer: {path_or_name!r} is not 'byte', a directory with "
    "tokenizer.json or tokenizer.model, or such a file."
  )
