"""Host-side data: tokenizers, dataset builders, grain pipelines, batches.

``make_<kind>_iterator(data_config, tokenizer, *, batch_size, seed, ...)``
gives resumable, per-host sharded iterators of the fixed-shape batches in
:mod:`alignment.data.batches`; :mod:`alignment.data.builders` turns public
datasets (HH-RLHF, UltraFeedback, HelpSteer2, KTO, GSM8K, MATH, PRM800K,
Math-Shepherd) and generic JSONL/Parquet into array_record builds.
"""

from alignment.data.batches import (
  PreferenceBatch,
  PromptBatch,
  RankedBatch,
  SFTBatch,
  StepBatch,
  UnpairedBatch,
)
from alignment.data.builders import BUILDERS, BuiltDataset, build, open_source
from alignment.data.pipeline import (
  DataIterator,
  PackedSFTBatch,
  default_data_dir,
  load_rows,
  make_iterator,
  make_preference_iterator,
  make_prompt_iterator,
  make_ranked_iterator,
  make_sft_iterator,
  make_step_iterator,
  make_unpaired_iterator,
  precompute_reference_logps,
  synthetic_rows,
)
from alignment.data.records import DataError, write_jsonl
from alignment.data.synthetic import LettersTask
from alignment.data.tokenizer import (
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  apply_chat_template,
  load_tokenizer,
  render_plain_chat,
)
