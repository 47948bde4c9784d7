"""Tokenizers behind one small interface.

* :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus four specials; needs no
  files (the tiny preset and the default run use it).
"""

from collections.abc import Sequence
from typing import Protocol


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
