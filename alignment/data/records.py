"""Canonical rows, file readers and the bad-row policy shared by builders.

Every dataset is converted to rows of one of six *kinds*; the pipelines
turn each kind into its batch type (``batches.py``):

========== ================================================= ===============
kind       fields (besides ``prompt``, ``prompt_messages``,  batch
           ``source``)
========== ================================================= ===============
sft        ``completion``                                     SFTBatch
preference ``chosen``, ``rejected``, ``margin``,               PreferenceBatch
           ``chosen_score``, ``rejected_score`` (NaN: none),
           ``subset`` (a category name; "": none),
           ``chosen_ratings``, ``rejected_ratings`` (K
           attribute ratings each, NaN: unrated; []: none)
unpaired   ``completion``, ``label`` (bool)                   UnpairedBatch
ranked     ``responses`` [K], ``scores`` [K]                  RankedBatch
step       ``steps`` [S], ``step_labels`` [S] in [0, 1]       StepBatch
prompt     ``answer``, ``solution``, ``metadata`` (JSON)      PromptBatch
========== ================================================= ===============

``prompt`` is the text a model sees when no chat template is used (for
conversational datasets: the plain rendering, see
``tokenizer.render_plain_chat``); ``prompt_messages`` is the same prompt as
a JSON list of ``{"role", "content"}`` messages ("" when the dataset is not
conversational), used when a chat template is applied. ``source`` is
``"<file>:<line>"``, so a later error can name where the row came from.

Bad rows. A reader or converter raises :class:`RowError` with a *kind*
(:data:`ERROR_KINDS`); :class:`ErrorPolicy` either re-raises it as a
:class:`DataError` naming file, line and field (``on_error="raise"``, the
default) or counts it per kind (``on_error="skip"``). Nothing is dropped or
truncated without being counted.
"""

import collections
import gzip
import json
import logging
import math
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
  "ERROR_KINDS",
  "KIND_FIELDS",
  "DataError",
  "ErrorPolicy",
  "RowError",
  "check_type",
  "get_field",
  "iter_file_rows",
  "write_jsonl",
]

log = logging.getLogger("alignment.data")

#: Kinds of bad rows, as counted in build reports and iterator stats.
ERROR_KINDS = (
  "malformed_json",
  "missing_field",
  "wrong_type",
  "empty_completion",
  "prompt_too_long",
  "prompt_mismatch",
  "bad_value",
)

#: Canonical fields of each row kind (see the module docstring).
KIND_FIELDS = {
  "sft": ("prompt", "prompt_messages", "completion", "source"),
  "preference": (
    "prompt",
    "prompt_messages",
    "chosen",
    "rejected",
    "margin",
    "source",
    "chosen_score",
    "rejected_score",
    "subset",
    "chosen_ratings",
    "rejected_ratings",
  ),
  "unpaired": ("prompt", "prompt_messages", "completion", "label", "source"),
  "ranked": ("prompt", "prompt_messages", "responses", "scores", "source"),
  "step": ("prompt", "prompt_messages", "steps", "step_labels", "source"),
  "prompt": (
    "prompt",
    "prompt_messages",
    "answer",
    "solution",
    "metadata",
    "source",
  ),
}


class DataError(ValueError):
  """A bad input row, naming its file, line and field."""

  def __init__(
    self,
    message: str,
    *,
    kind: str,
    file: str | None = None,
    line: int | None = None,
    field: str | None = None,
  ):
    where = f"{file}:{line}: " if file is not None else ""
    what = f"field {field!r}: " if field else ""
    super().__init__(f"{where}{what}{message} [{kind}]")
    self.kind, self.file, self.line, self.field = kind, file, line, field


class RowError(Exception):
  """Raised by readers/converters for one bad row (see ErrorPolicy)."""

  def __init__(self, kind: str, field: str | None, message: str):
    if kind not in ERROR_KINDS:
      raise ValueError(f"unknown bad-row kind {kind!r}; valid: {ERROR_KINDS}")
    super().__init__(message)
    self.kind, self.field, self.message = kind, field, message


class ErrorPolicy:
  """Raise on the first bad row, or skip and count bad rows per kind.

  Args:
    on_error: ``"raise"`` (default) or ``"skip"``.
    what: a label for log lines (dataset name).
  """

  def __init__(self, on_error: str = "raise", what: str = "data"):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    self.on_error = on_error
    self.what = what
    self.skipped: collections.Counter = collections.Counter()
    self.examples: dict[str, str] = {}

  def handle(self, err: RowError, file: str | None, line: int | None):
    """Raises a DataError, or records the skip."""
    exc = DataError(
      err.message, kind=err.kind, file=file, line=line, field=err.field
    )
    if self.on_error == "raise":
      raise exc from err
    self.skipped[err.kind] += 1
    self.examples.setdefault(err.kind, str(exc))

  def report(self) -> dict:
    """``{"skipped": {kind: n}, "first": {kind: message}}``."""
    return {"skipped": dict(self.skipped), "first": dict(self.examples)}

  def log_summary(self):
    if self.skipped:
      log.warning(
        "%s: skipped %d bad rows: %s (first of each: %s)",
        self.what,
        sum(self.skipped.values()),
        dict(self.skipped),
        self.examples,
      )


# -- field access ------------------------------------------------------------

_TYPE_NAMES = {
  str: "string",
  list: "list",
  dict: "object",
  bool: "bool",
  int: "integer",
  float: "number",
}


def _type_name(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def check_type(value, types, field: str) -> Any:
  """``value`` if it has one of ``types``, else RowError ``wrong_type``.

  ``bool`` is never accepted where a number is expected, and ints are
  accepted where floats are.
  """
  types = types if isinstance(types, tuple) else (types,)
  ok = isinstance(value, types)
  if isinstance(value, bool) and bool not in types:
    ok = False
  if (
    not ok
    and float in types
    and isinstance(value, int)
    and not isinstance(value, bool)
  ):
    ok = True
  if not ok:
    raise RowError(
      "wrong_type",
      field,
      f"expected {_type_name(types)}, "
      f"got {type(value).__name__} {_short(value)}",
    )
  return value


def get_field(
  row: Mapping, path: str, types=None, *, optional=False, default=None
) -> Any:
  """``row[path]`` with dotted paths (``"question.problem"``) and a type
  check (:func:`check_type`); raises RowError ``missing_field`` /
  ``wrong_type``. With ``optional``, a missing or null field gives
  ``default``.
  """
  value: Any = row
  for part in path.split("."):
    if not isinstance(value, Mapping) or part not in value:
      if optional:
        return default
      raise RowError("missing_field", path, "missing")
    value = value[part]
  if value is None and optional:
    return default
  if types is not None:
    check_type(value, types, path)
  return value


def _short(value, n: int = 60) -> str:
  s = repr(value)
  return s if len(s) <= n else s[:n] + "..."


def finite_float(value, field: str) -> float:
  """A finite float or RowError ``bad_value``."""
  f = float(value)
  if not math.isfinite(f):
    raise RowError("bad_value", field, f"not finite: {value!r}")
  return f


# -- files -------------------------------------------------------------------


def _open_text(path: pathlib.Path):
  if path.suffix == ".gz":
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def iter_file_rows(path, policy: ErrorPolicy) -> Iterator[tuple[str, int, Any]]:
  """Yields ``(file, line, row)`` from a JSONL(.gz), JSON or Parquet file.

  JSONL lines are numbered from 1 (blank lines are not rows and are
  passed over); a Parquet "line" is the 1-based row number; a ``.json``
  file holds one object (line 1) or a list of objects (line = position).
  A line that is not valid JSON is a ``malformed_json`` bad row.
  """
  path = pathlib.Path(path)
  name = str(path)
  suffixes = "".join(path.suffixes[-2:])
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq  # noqa: PLC0415

    line = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
      for row in batch.to_pylist():
        line += 1
        yield name, line, row
    return
  if path.suffix == ".json" or suffixes == ".json.gz":
    with _open_text(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        policy.handle(
          RowError("malformed_json", None, f"invalid JSON: {e}"), name, e.lineno
        )
        return
    rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows, 1):
      yield name, i, row
    return
  with _open_text(path) as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        policy.handle(
          RowError(
            "malformed_json",
            None,
            f"invalid JSON ({e.msg} at column {e.colno})",
          ),
          name,
          line,
        )
        continue
      yield name, line, row


def write_jsonl(rows: Iterable[Mapping], path) -> pathlib.Path:
  """Writes rows as JSONL atomically (temp file in the same directory, then
  rename), so a reader never sees a partial file.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
    prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
  )
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def messages_json(messages: Sequence[Mapping] | None) -> str:
  """Canonical JSON of a message list ("" for None/empty)."""
  if not messages:
    return ""
  return json.dumps(
    [{"role": m["role"], "content": m["content"]} for m in messages],
    ensure_ascii=False,
  )
