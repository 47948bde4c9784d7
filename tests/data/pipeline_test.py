"""Grain pipelines: layout, truncation, padding, packing, shuffling, host
sharding, resumable state, chat templates and reference log-probs."""

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from absl.testing import absltest, parameterized

from alignment.data import batches as batch_lib
from alignment.data import builders as builders_lib
from alignment.data import pipeline, records
from alignment.data.tokenizer import ByteTokenizer, HFTokenizer
from tests.data import fixtures
from tests.data.tokenizer_test import make_hf_dir

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOK = ByteTokenizer()
PAD, BOS, EOS = TOK.pad_id, TOK.bos_id, TOK.eos_id


def _b(text):
  return list(text.encode())


def _cfg(root, **kw):
  base = dict(
    source="jsonl",
    data_dir=str(root / "tfds"),
    max_prompt_len=8,
    max_completion_len=6,
    shuffle=False,
  )
  base.update(kw)
  return base


def _pairs(n):
  return [
    {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}
    for i in range(n)
  ]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(batch, field="chosen_tokens", mask_field="example_mask"):
  """Decoded prompt+completion text of each real row."""
  tokens = getattr(batch, field)
  mask = getattr(batch, mask_field)
  return [
    TOK.decode([t for t in row if t < 256])
    for row, m in zip(tokens, mask, strict=True)
    if m
  ]


class LayoutTest(parameterized.TestCase):
  def test_preference_rows_are_right_padded_with_bos_and_eos(self):
    root = fixtures.tempdir(self)
    path = records.write_jsonl(
      [{"prompt": "ab", "chosen": "xyz", "rejected": "q"}], root / "p.jsonl"
    )
    it = pipeline.make_preference_iterator(
      _cfg(root, path=str(path)),
      TOK,
      batch_size=1,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    self.assertIsInstance(b, batch_lib.PreferenceBatch)
    want = [BOS, *_b("ab"), *_b("xyz"), EOS] + [PAD] * 7
    np.testing.assert_array_equal(b.chosen_tokens[0], want)
    self.assertEqual(b.chosen_tokens.shape, (1, 14))  # 8 + 6
    self.assertEqual(b.chosen_tokens.dtype, np.int32)
    np.testing.assert_array_equal(b.chosen_attention_mask[0], [1] * 7 + [0] * 7)
    np.testing.assert_array_equal(
      b.chosen_completion_mask[0], [0] * 3 + [1] * 4 + [0] * 7
    )
    np.testing.assert_array_equal(
      b.rejected_tokens[0, :5], [BOS, *_b("ab"), *_b("q"), EOS]
    )
    np.testing.assert_array_equal(
      b.rejected_completion_mask[0, :6], [0, 0, 0, 1, 1, 0]
    )
    self.assertTrue(b.example_mask[0])
    self.assertIsNone(b.margin)
    self.assertIsNone(b.ref_chosen_logps)

  def test_truncation_policies_and_counts(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": "abcdefghij", "completion": "0123456789"},
      {"prompt": "ok", "completion": "fine"},
    ]
    path = str(records.write_jsonl(rows, root / "s.jsonl"))
    with self.assertRaises(records.DataError) as ctx:
      next(
        pipeline.make_sft_iterator(
          _cfg(root, path=path),
          TOK,
          batch_size=2,
          process_index=0,
          process_count=1,
        )
      )
    e = ctx.exception
    self.assertEqual(
      (e.kind, e.file, e.line, e.field), ("prompt_too_long", path, 1, "prompt")
    )
    self.assertIn(f"{path}:1: field 'prompt'", str(e))
    # keep_end: BOS + the last 7 prompt bytes; completion cut on the right
    # (EOS lost).
    it = pipeline.make_sft_iterator(
      _cfg(root, path=path, prompt_truncation="keep_end"),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    np.testing.assert_array_equal(
      b.tokens[0], [BOS, *_b("defghij"), *_b("012345")]
    )
    np.testing.assert_array_equal(b.completion_mask[0], [0] * 8 + [1] * 6)
    self.assertEqual(it.stats["truncated_prompts"], 1)
    self.assertEqual(it.stats["truncated_completions"], 1)
    self.assertEqual(it.stats["rows"], 2)
    b = next(
      pipeline.make_sft_iterator(
        _cfg(root, path=path, prompt_truncation="keep_start"),
        TOK,
        batch_size=2,
        process_index=0,
        process_count=1,
      )
    )
    np.testing.assert_array_equal(b.tokens[0, :8], [BOS, *_b("abcdefg")])

  def test_skip_counts_and_keeps_finite_streams_in_step(self):
    root = fixtures.tempdir(self)
    rows = [{"prompt": "x" * 20, "completion": "c"}] + [
      {"prompt": f"p{i}", "completion": "c"} for i in range(3)
    ]
    path = str(records.write_jsonl(rows, root / "s.jsonl"))
    it = pipeline.make_sft_iterator(
      _cfg(root, path=path, on_error="skip", num_epochs=1),
      TOK,
      batch_size=4,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    np.testing.assert_array_equal(b.example_mask, [False, True, True, True])
    self.assertEqual(it.stats["skipped_prompt_too_long"], 1)
    with self.assertRaises(StopIteration):
      next(it)
    # An infinite stream passes over the bad row instead.
    it = pipeline.make_sft_iterator(
      _cfg(root, path=path, on_error="skip"),
      TOK,
      batch_size=4,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    self.assertTrue(b.example_mask.all())
    self.assertEqual(_ids(b, "tokens")[:3], ["p0c", "p1c", "p2c"])

  def test_bucket_padding(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": "a", "completion": "b"},
      {"prompt": "a" * 7, "completion": "b" * 5},
    ]
    path = str(records.write_jsonl(rows, root / "s.jsonl"))
    cfg = _cfg(
      root,
      path=path,
      padding="bucket",
      max_prompt_len=16,
      max_completion_len=16,
    )
    it = pipeline.make_sft_iterator(
      cfg, TOK, batch_size=1, process_index=0, process_count=1
    )
    self.assertEqual(next(it).tokens.shape, (1, 8))  # 4 tokens -> bucket 8
    self.assertEqual(next(it).tokens.shape, (1, 16))  # 14 tokens -> 16
    it = pipeline.make_sft_iterator(
      dict(cfg, bucket_lengths=[5, 20]),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    self.assertEqual(next(it).tokens.shape, (2, 20))
    it = pipeline.make_prompt_iterator(
      cfg, TOK, batch_size=1, process_index=0, process_count=1
    )
    self.assertEqual(next(it).prompt_tokens.shape, (1, 8))

  def test_packing_with_segment_ids(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": f"{i}", "completion": "ab" * (i % 3 + 1)} for i in range(9)
    ]
    path = str(records.write_jsonl(rows, root / "s.jsonl"))
    it = pipeline.make_sft_iterator(
      _cfg(
        root,
        path=path,
        packing=True,
        num_epochs=1,
        max_prompt_len=4,
        max_completion_len=8,
      ),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    seen = []
    for b in it:
      self.assertIsInstance(b, pipeline.PackedSFTBatch)
      self.assertEqual(b.tokens.shape, (2, 12))
      for r in range(2):
        if not b.example_mask[r]:
          self.assertEqual(b.segment_ids[r].max(), 0)
          continue
        for s in range(1, b.segment_ids[r].max() + 1):
          seg = b.segment_ids[r] == s
          toks = b.tokens[r][seg]
          self.assertEqual(toks[0], BOS)
          self.assertEqual(toks[-1], EOS)
          comp = b.completion_mask[r][seg]
          self.assertEqual(
            TOK.decode(toks[comp][:-1]), rows[len(seen)]["completion"]
          )
          seen.append(TOK.decode(toks[1:]))
        # Padding has segment 0 and no attention.
        np.testing.assert_array_equal(b.attention_mask[r], b.segment_ids[r] > 0)
    self.assertEqual(seen, [r["prompt"] + r["completion"] for r in rows])
    self.assertEqual(it.stats["rows"], 9)


class StreamTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.root = fixtures.tempdir(self)
    self.path = str(records.write_jsonl(_pairs(10), self.root / "p.jsonl"))

  def _it(self, bs, pi=0, pc=1, seed=0, **kw):
    cfg = _cfg(self.root, path=self.path, shuffle=True)
    cfg.update(kw)
    return pipeline.make_preference_iterator(
      cfg, TOK, batch_size=bs, seed=seed, process_index=pi, process_count=pc
    )

  def test_seeded_shuffle_reshuffles_each_epoch_and_covers_it(self):
    a = [r for b in _take(self._it(5), 4) for r in _ids(b)]
    b = [r for bt in _take(self._it(5), 4) for r in _ids(bt)]
    self.assertEqual(a, b)
    c = [r for bt in _take(self._it(5, seed=1), 4) for r in _ids(bt)]
    self.assertNotEqual(a, c)
    want = sorted(f"p{i}c{i}" for i in range(10))
    self.assertEqual(sorted(a[:10]), want)
    self.assertEqual(sorted(a[10:]), want)
    self.assertNotEqual(a[:10], a[10:])
    self.assertNotEqual(a[:10], want)

  def test_hosts_see_disjoint_shards_that_cover_the_epoch(self):
    single = [_ids(b) for b in _take(self._it(4), 5)]
    hosts = [[_ids(b) for b in _take(self._it(2, pi, 2), 5)] for pi in range(2)]
    for step in range(5):
      h0, h1 = hosts[0][step], hosts[1][step]
      self.assertEqual(set(h0) & set(h1), set())
      self.assertEqual(sorted(h0 + h1), sorted(single[step]))
    # Finite stream, 10 rows over 3 hosts: 4 slots each, fillers masked.
    seen, counts = [], []
    for pi in range(3):
      it = self._it(3, pi, 3, num_epochs=1)
      bs = list(it)
      counts.append(len(bs))
      for b in bs:
        seen += _ids(b)
        self.assertEqual(b.chosen_tokens.shape, (3, 14))
    self.assertEqual(counts, [2, 2, 2])
    self.assertEqual(sorted(seen), sorted(f"p{i}c{i}" for i in range(10)))
    self.assertEqual(self._it(3, 0, 3, num_epochs=1).num_batches, 2)

  def test_final_partial_batch_fill_or_drop(self):
    it = self._it(4, num_epochs=1)
    bs = list(it)
    self.assertLen(bs, 3)
    np.testing.assert_array_equal(
      bs[-1].example_mask, [True, True, False, False]
    )
    # Filler rows are valid copies (finite, attended).
    self.assertTrue(bs[-1].chosen_attention_mask[2:].any(axis=1).all())
    self.assertEqual(it.stats["filler_rows"], 2)
    it = self._it(4, num_epochs=1, drop_remainder=True)
    self.assertLen(list(it), 2)
    self.assertEqual(it.stats["dropped_remainder_rows"], 2)
    self.assertEqual(it.num_batches, 2)

  def test_state_is_json_and_restores_in_a_fresh_process(self):
    it = self._it(3)
    _take(it, 4)  # mid second epoch
    state = json.loads(json.dumps(it.get_state()))
    want = _take(it, 3)
    script = (
      "import json, sys, numpy as np\n"
      "from alignment.data import pipeline\n"
      "from alignment.data.tokenizer import ByteTokenizer\n"
      "cfg, state, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]),"
      " sys.argv[3]\n"
      "it = pipeline.make_preference_iterator(cfg, ByteTokenizer(), "
      "batch_size=3, seed=0, process_index=0, process_count=1)\n"
      "it.set_state(state)\n"
      "bs = [next(it) for _ in range(3)]\n"
      "np.savez(out, **{f'{i}_{k}': v for i, b in enumerate(bs) "
      "for k, v in b._asdict().items() if v is not None})\n"
      "print(json.dumps(it.stats))\n"
    )
    cfg = _cfg(self.root, path=self.path, shuffle=True)
    out = str(self.root / "out.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
      [sys.executable, "-c", script, json.dumps(cfg), json.dumps(state), out],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    got = np.load(out)
    for i, b in enumerate(want):
      for k, v in b._asdict().items():
        if v is not None:
          np.testing.assert_array_equal(got[f"{i}_{k}"], v)
    self.assertEqual(
      json.loads(proc.stdout.strip().splitlines()[-1])["rows"], it.stats["rows"]
    )

  def test_state_restores_on_a_copied_run_directory(self):
    # A run directory (data file + its builds) copied elsewhere, with new
    # mtimes: the copy's iterator takes the original's state and goes on
    # with the same batches; changed data is still refused.
    it = self._it(3)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    want = _take(it, 2)
    copy = self.root / "copy"
    shutil.copytree(self.root, copy, ignore=shutil.ignore_patterns("copy"))
    later = time.time() + 100
    for f in copy.rglob("*"):
      os.utime(f, (later, later))
    cfg = _cfg(copy, path=str(copy / "p.jsonl"), shuffle=True)
    moved = pipeline.make_preference_iterator(
      cfg, TOK, batch_size=3, seed=0, process_index=0, process_count=1
    )
    moved.set_state(state)
    for w, g in zip(want, _take(moved, 2), strict=True):
      np.testing.assert_array_equal(w.chosen_tokens, g.chosen_tokens)
    records.write_jsonl(_pairs(11), copy / "p.jsonl")
    changed = pipeline.make_preference_iterator(
      cfg, TOK, batch_size=3, seed=0, process_index=0, process_count=1
    )
    with self.assertRaisesRegex(ValueError, "source"):
      changed.set_state(state)

  def test_set_state_rejects_other_layouts(self):
    state = self._it(3).get_state()
    with self.assertRaisesRegex(ValueError, "batch_size"):
      self._it(4).set_state(state)
    with self.assertRaisesRegex(ValueError, "process_count"):
      self._it(3, 0, 2).set_state(state)
    # Lock-step hosts: process 0's state restores host 1 exactly.
    h0, h1 = self._it(2, 0, 2), self._it(2, 1, 2)
    _take(h0, 3)
    want = _take(h1, 5)[3:]
    h1 = self._it(2, 1, 2)
    h1.set_state(h0.get_state())
    for w, g in zip(want, _take(h1, 2), strict=True):
      np.testing.assert_array_equal(w.chosen_tokens, g.chosen_tokens)
    with self.assertRaisesRegex(ValueError, "seed"):
      self._it(3, seed=5).set_state(state)
    with self.assertRaisesRegex(ValueError, "version"):
      self._it(3).set_state({**state, "version": 99})

  def test_config_validation(self):
    with self.assertRaisesRegex(ValueError, "unknown data config keys"):
      self._it(2, max_prompt_length=3)
    with self.assertRaisesRegex(ValueError, "on_error"):
      self._it(2, on_error="ignore")
    with self.assertRaisesRegex(ValueError, "num_epochs"):
      self._it(2, num_epochs=0)
    with self.assertRaisesRegex(ValueError, "process_index"):
      self._it(2, 2, 2)
    with self.assertRaisesRegex(ValueError, "unknown data source"):
      self._it(2, source="nope")


class KindsTest(parameterized.TestCase):
  def test_unpaired_kl_rows_are_mismatched_pairs(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0}
      for i in range(3)
    ]
    path = str(records.write_jsonl(rows, root / "u.jsonl"))
    b = next(
      pipeline.make_unpaired_iterator(
        _cfg(root, path=path),
        TOK,
        batch_size=3,
        process_index=0,
        process_count=1,
      )
    )
    self.assertIsInstance(b, batch_lib.UnpairedBatch)
    np.testing.assert_array_equal(b.labels, [True, False, True])
    self.assertEqual(_ids(b, "tokens"), ["p0c0", "p1c1", "p2c2"])
    self.assertEqual(_ids(b, "kl_tokens"), ["p0c1", "p1c2", "p2c0"])
    np.testing.assert_array_equal(
      b.kl_completion_mask[0, :6], [0, 0, 0, 1, 1, 1]
    )
    self.assertEqual(b.kl_tokens.shape, b.tokens.shape)

  def test_ranked_lists(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": "p", "responses": ["a", "bb", "c"], "scores": [1, 3, 2]},
      {"prompt": "q", "responses": ["x"], "scores": [0.5]},
    ]
    path = str(records.write_jsonl(rows, root / "r.jsonl"))
    it = pipeline.make_ranked_iterator(
      _cfg(root, path=path, max_responses=2),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    self.assertEqual(b.tokens.shape, (2, 2, 14))
    np.testing.assert_array_equal(b.list_mask, [[1, 1], [1, 0]])
    np.testing.assert_allclose(b.scores, [[1, 3], [0.5, 0]])
    np.testing.assert_array_equal(
      b.tokens[0, 1, :5], [BOS, *_b("p"), *_b("bb"), EOS]
    )
    self.assertEqual(it.stats["truncated_lists"], 1)

  def test_step_positions_end_each_step(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": "Q", "steps": ["ab", "c", "dd"], "step_labels": [1, 0, 1]}
    ]
    path = str(records.write_jsonl(rows, root / "s.jsonl"))
    it = pipeline.make_step_iterator(
      _cfg(root, path=path, max_steps=4, max_completion_len=7),
      TOK,
      batch_size=1,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    # [bos Q a b \n c \n] then "dd\n" does not fit the 7-token budget.
    np.testing.assert_array_equal(b.tokens[0, :7], [BOS, *_b("Qab\nc\n")])
    np.testing.assert_array_equal(b.step_positions[0], [4, 6, 0, 0])
    np.testing.assert_array_equal(b.step_labels[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(b.step_mask[0], [1, 1, 0, 0])
    self.assertEqual(it.stats["truncated_completions"], 1)
    self.assertTrue(all(b.tokens[0, p] == ord("\n") for p in (4, 6)))

  def test_prompt_batches_and_records_from_gsm8k(self):
    root = fixtures.tempdir(self)
    want = fixtures.write_gsm8k(root / "src")
    it = pipeline.make_prompt_iterator(
      dict(
        source="gsm8k",
        path=str(root / "src"),
        shuffle=False,
        data_dir=str(root / "tfds"),
        max_prompt_len=200,
        max_completion_len=8,
      ),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    self.assertIsInstance(b, batch_lib.PromptBatch)
    self.assertEqual(b.prompt_tokens.shape, (2, 200))
    for row in range(2):
      rec = it.records[int(b.prompt_index[row])]
      self.assertEqual(rec["answer"], want[row]["answer"])
      self.assertEqual(rec["prompt"], want[row]["prompt"])
      n = len(_b(rec["prompt"])) + 1
      self.assertFalse(b.prompt_mask[row, :-n].any())  # left padded
      np.testing.assert_array_equal(
        b.prompt_tokens[row, -n:], [BOS, *_b(rec["prompt"])]
      )

  def test_public_sources_through_the_pipeline(self):
    root = fixtures.tempdir(self)
    train, _ = fixtures.write_helpsteer2(root / "hs")
    it = pipeline.make_preference_iterator(
      dict(
        source="helpsteer2",
        path=str(root / "hs"),
        shuffle=False,
        data_dir=str(root / "tfds"),
        max_prompt_len=96,
        max_completion_len=24,
      ),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    b = next(it)
    np.testing.assert_allclose(b.margin, [r["margin"] for r in train])
    self.assertEqual(it.stats["build_dropped_ties"], 1)
    # SFT on the chosen responses of HH-RLHF.
    fixtures.write_hh_rlhf(root / "hh")
    it = pipeline.make_sft_iterator(
      dict(
        source="hh_rlhf",
        path=str(root / "hh"),
        shuffle=False,
        data_dir=str(root / "tfds"),
        max_prompt_len=96,
        max_completion_len=24,
      ),
      TOK,
      batch_size=1,
      process_index=0,
      process_count=1,
    )
    self.assertEqual(
      _ids(next(it), "tokens"), ["\n\nHuman: Café?\n\nAssistant: ünïcode ok"]
    )

  def test_synthetic_goes_through_jsonl_and_the_builder(self):
    root = fixtures.tempdir(self)
    cfg = dict(
      source="synthetic",
      data_dir=str(root),
      max_prompt_len=8,
      max_completion_len=9,
      num_examples=16,
      task_seed=3,
    )
    it = pipeline.make_preference_iterator(
      cfg, TOK, batch_size=4, process_index=0, process_count=1
    )
    b = next(it)
    self.assertTrue(b.example_mask.all())
    (jsonl,) = list((root / "synthetic").rglob("preference.jsonl"))
    self.assertLen(jsonl.read_text().splitlines(), 16)
    self.assertTrue(list((root / "generic").iterdir()))
    for kind in pipeline.KINDS:
      it = pipeline.make_iterator(
        kind, cfg, TOK, batch_size=2, process_index=0, process_count=1
      )
      self.assertTrue(next(it).example_mask.all())

  def test_in_memory_rows(self):
    rows = [{"prompt": "p", "completion": f"c{i}"} for i in range(3)]
    it = pipeline.make_iterator(
      "sft",
      dict(max_prompt_len=4, max_completion_len=4, shuffle=False),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
      rows=rows,
    )
    self.assertEqual(
      [_ids(b, "tokens") for b in _take(it, 2)],
      [["pc0", "pc1"], ["pc2", "pc0"]],
    )
    rows[1]["completion"] = ""
    it = pipeline.make_iterator(
      "sft",
      dict(max_prompt_len=4, max_completion_len=4, shuffle=False),
      TOK,
      batch_size=3,
      process_index=0,
      process_count=1,
      rows=rows,
    )
    with self.assertRaises(records.DataError) as ctx:
      next(it)
    self.assertEqual(
      (ctx.exception.file, ctx.exception.line, ctx.exception.kind),
      ("rows", 2, "empty_completion"),
    )

  def test_foreign_tfds_dataset_with_field_map(self):
    import tensorflow_datasets as tfds  # noqa: PLC0415

    root = fixtures.tempdir(self)

    class OtherPrefs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
      VERSION = tfds.core.Version("1.0.0")
      name = "other_prefs"
      # tfds' default lookup needs importlib_resources for classes in a
      # package; any path works for a builder without checksums.
      code_path = tfds.core.utils.classproperty(
        classmethod(lambda cls: builders_lib._Builder.code_path)
      )  # noqa: SLF001

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          disable_shuffling=True,
          features=tfds.features.FeaturesDict(
            {k: tfds.features.Text() for k in ("q", "good", "bad")}
          ),
        )

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for i in range(3):
          yield (
            i,
            {"q": f"q{i}", "good": f"g{i}", "bad": "" if i == 1 else f"b{i}"},
          )

    OtherPrefs(
      data_dir=str(root), file_format="array_record"
    ).download_and_prepare()
    cfg = dict(
      source="tfds:other_prefs",
      data_dir=str(root),
      shuffle=False,
      max_prompt_len=8,
      max_completion_len=8,
      field_map={"prompt": "q", "chosen": "good", "rejected": "bad"},
    )
    it = pipeline.make_preference_iterator(
      cfg, TOK, batch_size=3, process_index=0, process_count=1
    )
    with self.assertRaises(records.DataError) as ctx:
      next(it)
    self.assertEqual(
      (ctx.exception.kind, ctx.exception.file, ctx.exception.field),
      ("empty_completion", "tfds:other_prefs[1]", "bad"),
    )
    it = pipeline.make_preference_iterator(
      dict(cfg, on_error="skip"),
      TOK,
      batch_size=2,
      process_index=0,
      process_count=1,
    )
    self.assertEqual(_ids(next(it)), ["q0g0", "q2g2"])


class ChatTemplateTest(absltest.TestCase):
  def test_hf_tokenizer_template_renders_prompts(self):
    root = fixtures.tempdir(self)
    tok = HFTokenizer.from_dir(make_hf_dir(root / "tok"))
    path = str(
      records.write_jsonl(
        [
          {
            "prompt": [{"role": "user", "content": "the dog"}],
            "chosen": "a fox",
            "rejected": "lazy",
          }
        ],
        root / "p.jsonl",
      )
    )
    cfg = _cfg(root, path=path, max_prompt_len=32, max_completion_len=16)
    b = next(
      pipeline.make_preference_iterator(
        cfg, tok, batch_size=1, process_index=0, process_count=1
      )
    )
    rendered = "<|im_start|>user\nthe dog<|im_end|>\n<|im_start|>assistant\n"
    want = [tok.bos_id] + tok.encode(rendered)
    n = len(want)
    np.testing.assert_array_equal(b.chosen_tokens[0, :n], want)
    comp = tok.encode("a fox") + [tok.eos_id]
    np.testing.assert_array_equal(b.chosen_tokens[0, n : n + len(comp)], comp)
    self.assertEqual(int(b.chosen_completion_mask[0].sum()), len(comp))
    # chat_template="none": the plain prompt text.
    b = next(
      pipeline.make_preference_iterator(
        dict(cfg, chat_template="none"),
        tok,
        batch_size=1,
        process_index=0,
        process_count=1,
      )
    )
    plain = [tok.bos_id] + tok.encode("\n\nHuman: the dog\n\nAssistant: ")
    np.testing.assert_array_equal(b.chosen_tokens[0, : len(plain)], plain)


class ReferenceLogpsTest(absltest.TestCase):
  def test_precompute_then_emit(self):
    root = fixtures.tempdir(self)
    path = str(records.write_jsonl(_pairs(7), root / "p.jsonl"))
    out = root / "ref.npz"
    cfg = _cfg(root, path=path, shuffle=True, ref_logps_path=str(out))
    calls = collections.Counter()

    def logps_fn(batch):
      calls["n"] += 1
      # Any deterministic function of the rows: the sum of the tokens.
      return (
        batch.chosen_tokens.sum(1) * 1.0,
        -batch.rejected_tokens.sum(1) * 1.0,
      )

    written = pipeline.precompute_reference_logps(
      cfg, TOK, logps_fn, batch_size=3, process_index=0, process_count=1
    )
    self.assertEqual(written, out)
    self.assertEqual(calls["n"], 3)
    it = pipeline.make_preference_iterator(
      cfg, TOK, batch_size=4, seed=2, process_index=0, process_count=1
    )
    for b in _take(it, 3):
      np.testing.assert_allclose(b.ref_chosen_logps, b.chosen_tokens.sum(1))
      np.testing.assert_allclose(
        b.ref_rejected_logps, -b.rejected_tokens.sum(1)
      )
    # Two hosts write parts; the loader merges them.
    out2 = root / "ref2.npz"
    for pi in range(2):
      pipeline.precompute_reference_logps(
        cfg,
        TOK,
        logps_fn,
        batch_size=2,
        output_path=out2,
        process_index=pi,
        process_count=2,
      )
    self.assertLen(list(root.glob("ref2-*-of-00002.npz")), 2)
    b = next(
      pipeline.make_preference_iterator(
        dict(cfg, ref_logps_path=str(out2)),
        TOK,
        batch_size=7,
        process_index=0,
        process_count=1,
      )
    )
    np.testing.assert_allclose(b.ref_chosen_logps, b.chosen_tokens.sum(1))
    # Other tokenisation settings are refused.
    with self.assertRaisesRegex(ValueError, "max_completion_len"):
      pipeline.make_preference_iterator(
        dict(cfg, max_completion_len=7),
        TOK,
        batch_size=2,
        process_index=0,
        process_count=1,
      )


if __name__ == "__main__":
  absltest.main()
