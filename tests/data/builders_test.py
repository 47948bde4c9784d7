"""TFDS builders: each public format builds from its fixture and reads back
exactly; bad rows raise naming file, line and field, or are skipped and
counted; builds are cached by input fingerprint."""

import json
import math
import os
import threading

from absl.testing import absltest, parameterized

from alignment.data import builders, records
from tests.data import fixtures

# (builder name, fixture writer, split, path below the fixture root)
CASES = {
  "hh_rlhf": (fixtures.write_hh_rlhf, "train", ""),
  "ultrafeedback": (fixtures.write_ultrafeedback, "train_prefs", ""),
  "kto": (fixtures.write_kto, "train", ""),
  "gsm8k": (fixtures.write_gsm8k, "train", ""),
  "math": (fixtures.write_math, "train", ""),
  "ultrafeedback_scored": (fixtures.write_ultrafeedback_scored, "train", ""),
  "prm800k": (fixtures.write_prm800k, "train", ""),
  "math_shepherd": (fixtures.write_math_shepherd, "train", ""),
}


def _strip(row):
  return {k: v for k, v in row.items() if k != "source"}


def _same(test, got, want):
  """Rows equal, with NaN margins equal to each other."""
  test.assertLen(got, len(want))
  for g, w in zip(got, want, strict=True):
    g = _strip(g)
    for k, v in list(g.items()):
      if k not in w and (
        v in ("", "{}", [])  # [] : no attribute ratings
        or (isinstance(v, float) and math.isnan(v))
      ):
        del g[k]  # defaults of fields the dataset does not have
    for k in ("margin", "scores", "step_labels"):
      if k in w:
        test.assertSequenceAlmostEqual(
          g.pop(k) if isinstance(w[k], list) else [g.pop(k)],
          w[k] if isinstance(w[k], list) else [w[k]],
          places=6,
        )
    test.assertEqual(
      g,
      {
        k: v
        for k, v in w.items()
        if k not in ("margin", "scores", "step_labels")
      },
    )


class PublicFormatsTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(n, n) for n in CASES])
  def test_builds_from_fixture_and_reads_back(self, name):
    writer, split, sub = CASES[name]
    root = fixtures.tempdir(self)
    want = writer(root / "src")
    built = builders.build(
      name, path=root / "src" / sub, split=split, data_dir=root / "tfds"
    )
    rows = builders.open_source(built)
    _same(self, list(rows), want)
    self.assertEqual(built.report["rows_written"], len(want))
    self.assertEqual(built.report["skipped"], {})
    self.assertTrue(os.path.isdir(built.directory))
    # Every row names its source file and line.
    for r in rows:
      file, _, line = r["source"].rpartition(":")
      self.assertTrue(os.path.exists(file), file)
      self.assertGreaterEqual(int(line), 1)
    # The generic tfds decoder reads the same rows.
    import tensorflow_datasets as tfds  # noqa: PLC0415

    slow = tfds.builder_from_directory(built.directory).as_data_source(
      split=split
    )
    for i in range(len(rows)):
      self.assertEqual(slow[i]["prompt"].decode(), rows[i]["prompt"])

  def test_helpsteer2_splits_ties_and_margin(self):
    root = fixtures.tempdir(self)
    train, validation = fixtures.write_helpsteer2(root / "src")
    built = builders.build(
      "helpsteer2", path=root / "src", split="train", data_dir=root / "tfds"
    )
    _same(self, list(builders.open_source(built)), train)
    self.assertEqual(built.report["dropped"], {"ties": 1})
    self.assertEqual(built.report["other_split_rows"], 1)
    self.assertTrue(built.report["has_margin"])
    val = builders.build(
      "helpsteer2",
      path=root / "src",
      split="validation",
      data_dir=root / "tfds",
    )
    _same(self, list(builders.open_source(val)), validation)

  def test_hh_prompt_plus_response_is_the_transcript(self):
    root = fixtures.tempdir(self)
    fixtures.write_hh_rlhf(root / "src")
    built = builders.build(
      "hh_rlhf", path=root / "src", split="test", data_dir=root / "tfds"
    )
    (row,) = builders.open_source(built)
    self.assertEqual(
      row["prompt"] + row["chosen"], "\n\nHuman: What is 2+2?\n\nAssistant: 4."
    )

  def test_answer_extraction(self):
    self.assertEqual(
      builders.boxed_answer(
        r"$\boxed{\frac{a}{b}}$ and "
        r"\fbox{7}"
      ),
      "7",
    )
    self.assertEqual(builders.boxed_answer(r"x = \boxed{ {1,2} }"), " {1,2} ")
    self.assertEqual(builders.boxed_answer(r"\boxed 5$"), "5")
    self.assertIsNone(builders.boxed_answer("no answer"))
    self.assertIsNone(builders.boxed_answer(r"\boxed{unclosed"))
    self.assertEqual(builders.gsm8k_answer("a\n#### 1,234"), "1234")
    self.assertIsNone(builders.gsm8k_answer("no marker"))

  def test_prm800k_options(self):
    root = fixtures.tempdir(self)
    fixtures.write_prm800k(root / "src")
    built = builders.build(
      "prm800k",
      path=root / "src",
      split="train",
      data_dir=root / "tfds",
      options={"neutral_label": 1.0, "expand_alternatives": False},
    )
    rows = [
      (_strip(r)["steps"], r["step_labels"])
      for r in builders.open_source(built)
    ]
    self.assertEqual(
      rows,
      [
        (["We add.", "1+1=2.", "# Answer\n\n2"], [1.0, 1.0, 1.0]),
        (["3*3 = 9.", "So 10."], [1.0, 0.0]),
      ],
    )
    with self.assertRaisesRegex(ValueError, "unknown builder options"):
      builders.build(
        "prm800k",
        path=root / "src",
        data_dir=root / "tfds",
        options={"neutral": 1.0},
      )


class GenericTest(parameterized.TestCase):
  def test_subset_column_and_report(self):
    root = fixtures.tempdir(self)
    rows = [
      {"prompt": "p", "chosen": "a", "rejected": "b", "cat": "chat"},
      {"prompt": "q", "chosen": "c", "rejected": "d", "cat": 3},
      {"prompt": "r", "chosen": "e", "rejected": "f", "cat": "chat"},
    ]
    path = records.write_jsonl(rows, root / "p.jsonl")
    built = builders.build(
      "jsonl",
      path=path,
      data_dir=root / "tfds",
      options={"kind": "preference", "field_map": {"subset": "cat"}},
    )
    got = [r["subset"] for r in builders.open_source(built)]
    self.assertEqual(got, ["chat", "3", "chat"])
    self.assertTrue(built.report["has_subsets"])
    self.assertEqual(built.report["subsets"], {"3": 1, "chat": 2})
    # A row without a subset: the column is not complete.
    path = records.write_jsonl(rows[:2] + [rows[2] | {"cat": None}], path)
    built = builders.build(
      "jsonl",
      path=path,
      data_dir=root / "tfds2",
      options={"kind": "preference", "field_map": {"subset": "cat"}},
    )
    self.assertFalse(built.report["has_subsets"])
    self.assertEqual(built.report["subset_rows"], 2)

  def test_field_map_messages_and_parquet(self):
    root = fixtures.tempdir(self)
    rows = [
      {"q": {"text": "hi"}, "good": "a", "bad": "b", "m": 2},
      {"q": {"text": "yo"}, "good": "c", "bad": "d", "m": 0.5},
    ]
    path = records.write_jsonl(rows, root / "p.jsonl")
    built = builders.build(
      "jsonl",
      path=path,
      data_dir=root / "tfds",
      options={
        "kind": "preference",
        "field_map": {
          "prompt": "q.text",
          "chosen": "good",
          "rejected": "bad",
          "margin": "m",
        },
      },
    )
    got = list(builders.open_source(built))
    self.assertEqual(
      [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in got],
      [("hi", "a", "b", 2.0), ("yo", "c", "d", 0.5)],
    )
    self.assertTrue(built.report["has_margin"])
    # Implicit-prompt conversational rows in a Parquet file.
    conv = [
      {
        "chosen": [
          {"role": "user", "content": "q"},
          {"role": "assistant", "content": "yes"},
        ],
        "rejected": [
          {"role": "user", "content": "q"},
          {"role": "assistant", "content": "no"},
        ],
      }
    ]
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    pq.write_table(pa.Table.from_pylist(conv), root / "c.parquet")
    built = builders.build(
      "parquet",
      path=root / "c.parquet",
      data_dir=root / "tfds",
      options={"kind": "preference"},
    )
    (row,) = builders.open_source(built)
    self.assertEqual(row["prompt"], "\n\nHuman: q\n\nAssistant: ")
    self.assertEqual(
      json.loads(row["prompt_messages"]), [{"role": "user", "content": "q"}]
    )
    self.assertEqual((row["chosen"], row["rejected"]), ("yes", "no"))
    self.assertFalse(built.report["has_margin"])

  def test_every_kind(self):
    root = fixtures.tempdir(self)
    rows = {
      "sft": {"prompt": "p", "completion": "c"},
      "unpaired": {"prompt": "p", "completion": "c", "label": False},
      "ranked": {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0.5]},
      "step": {
        "prompt": "p",
        "steps": ["s1", "s2"],
        "step_labels": [True, 0.25],
      },
      "prompt": {"prompt": "p", "answer": 42, "level": 3},
    }
    for kind, row in rows.items():
      with self.subTest(kind=kind):
        path = records.write_jsonl([row], root / f"{kind}.jsonl")
        built = builders.build(
          "jsonl", path=path, data_dir=root / "tfds", options={"kind": kind}
        )
        self.assertEqual(built.kind, kind)
        (got,) = builders.open_source(built)
        self.assertEqual(got["prompt"], "p")
        if kind == "ranked":
          self.assertEqual(got["scores"], [1.0, 0.5])
        if kind == "step":
          self.assertEqual(got["step_labels"], [1.0, 0.25])
        if kind == "prompt":
          self.assertEqual(got["answer"], "42")
          self.assertEqual(json.loads(got["metadata"]), {"level": 3})


class BadRowsTest(parameterized.TestCase):
  """Each kind of bad row: default raise naming file/line/field; skip
  counts it; the good rows survive."""

  GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}

  @parameterized.named_parameters(
    ("malformed_json", '{"prompt": "p", "chosen": ', "malformed_json", None),
    (
      "missing_field",
      {"prompt": "p", "chosen": "a"},
      "missing_field",
      "rejected",
    ),
    (
      "wrong_type",
      {"prompt": "p", "chosen": 3, "rejected": "b"},
      "wrong_type",
      "chosen",
    ),
    (
      "empty_completion",
      {"prompt": "p", "chosen": "a", "rejected": " "},
      "empty_completion",
      "rejected",
    ),
    (
      "prompt_mismatch",
      {
        "chosen": [
          {"role": "user", "content": "x"},
          {"role": "assistant", "content": "a"},
        ],
        "rejected": [
          {"role": "user", "content": "y"},
          {"role": "assistant", "content": "b"},
        ],
      },
      "prompt_mismatch",
      "rejected",
    ),
    ("not_an_object", [1, 2], "wrong_type", None),
  )
  def test_raise_names_file_line_field_and_skip_counts(self, bad, kind, field):
    root = fixtures.tempdir(self)
    path = root / "bad.jsonl"
    line = bad if isinstance(bad, str) else json.dumps(bad)
    good = json.dumps(self.GOOD)
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # bad row on line 3
    with self.assertRaises(records.DataError) as ctx:
      builders.build(
        "jsonl",
        path=path,
        data_dir=root / "tfds",
        options={"kind": "preference"},
      )
    err = ctx.exception
    self.assertEqual(
      (err.kind, err.file, err.line, err.field), (kind, str(path), 3, field)
    )
    self.assertIn(f"{path}:3:", str(err))
    # Nothing half-built is left behind.
    self.assertEqual(
      [p.name for p in (root / "tfds").iterdir() if p.name != "downloads"], []
    )
    built = builders.build(
      "jsonl",
      path=path,
      data_dir=root / "tfds",
      on_error="skip",
      options={"kind": "preference"},
    )
    self.assertEqual(built.report["skipped"], {kind: 1})
    self.assertEqual(built.report["rows_written"], 2)
    self.assertIn(f"{path}:3:", built.report["first"][kind])
    self.assertEqual(
      [r["source"] for r in builders.open_source(built)],
      [f"{path}:1", f"{path}:4"],
    )

  def test_public_builder_bad_rows(self):
    root = fixtures.tempdir(self)
    cases = [
      (
        "hh_rlhf",
        {
          "chosen": "\n\nHuman: a\n\nAssistant: b",
          "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c",
        },
        "prompt_mismatch",
        "rejected",
      ),
      (
        "hh_rlhf",
        {"chosen": "no turns", "rejected": "no turns"},
        "bad_value",
        "chosen",
      ),
      (
        "gsm8k",
        {"question": "q", "answer": "no marker"},
        "bad_value",
        "answer",
      ),
      (
        "math_shepherd",
        {"input": "Q Step 1: a ки\n", "label": "Q Step 1: a ?\n"},
        "bad_value",
        "label",
      ),
      (
        "prm800k",
        {
          "question": {"problem": "p"},
          "label": {
            "steps": [
              {
                "completions": [{"text": "s", "rating": 5}],
                "chosen_completion": 0,
              }
            ]
          },
        },
        "bad_value",
        "label.steps[0].completions[0].rating",
      ),
      (
        "ultrafeedback_scored",
        {
          "instruction": "i",
          "completions": [{"response": "r", "overall_score": "high"}],
        },
        "wrong_type",
        "completions[0].overall_score",
      ),
    ]
    for i, (name, row, kind, field) in enumerate(cases):
      with self.subTest(name=name, kind=kind):
        path = records.write_jsonl([row], root / f"{i}" / "x.jsonl")
        with self.assertRaises(records.DataError) as ctx:
          builders.build(name, path=path, data_dir=root / "tfds")
        self.assertEqual(
          (ctx.exception.kind, ctx.exception.line, ctx.exception.field),
          (kind, 1, field),
        )


class CacheTest(absltest.TestCase):
  def test_reuse_rebuild_and_concurrent_builds(self):
    root = fixtures.tempdir(self)
    path = records.write_jsonl(
      [{"prompt": "p", "completion": "c"}], root / "d.jsonl"
    )
    kw = dict(path=path, data_dir=root / "tfds", options={"kind": "sft"})
    a = builders.build("jsonl", **kw)
    b = builders.build("jsonl", **kw)
    self.assertEqual(a.directory, b.directory)
    records.write_jsonl([{"prompt": "p", "completion": "c"}] * 2, path)
    c = builders.build("jsonl", **kw)
    self.assertNotEqual(a.directory, c.directory)
    self.assertEqual(c.num_rows, 2)
    # The same bytes elsewhere, written later: the same build.
    moved = root / "elsewhere" / "d.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    os.utime(moved, (1e9, 1e9))
    e = builders.build("jsonl", **{**kw, "path": moved})
    self.assertEqual(e.directory, c.directory)
    # Different options (kind) are different builds.
    d = builders.build(
      "jsonl", path=path, data_dir=root / "tfds", options={"kind": "prompt"}
    )
    self.assertNotEqual(c.directory, d.directory)
    # Concurrent builds of the same data end with one complete build.
    path2 = records.write_jsonl(
      [{"prompt": "q", "completion": "r"}] * 3, root / "e.jsonl"
    )
    results, errors = [], []

    def run():
      try:
        results.append(
          builders.build(
            "jsonl", path=path2, data_dir=root / "tfds", options={"kind": "sft"}
          )
        )
      except Exception as e:  # noqa: BLE001 - reported below
        errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    self.assertEqual(errors, [])
    self.assertLen({r.directory for r in results}, 1)
    self.assertLen(builders.open_source(results[0]), 3)
    self.assertEqual(
      [
        p.name
        for p in (root / "tfds").iterdir()
        if p.name.startswith(".incomplete")
      ],
      [],
    )

  def test_errors(self):
    root = fixtures.tempdir(self)
    with self.assertRaisesRegex(ValueError, "unknown dataset builder"):
      builders.build("nope", path=root, data_dir=root)
    with self.assertRaisesRegex(FileNotFoundError, "no input files"):
      builders.build("gsm8k", path=root, split="train", data_dir=root)
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      builders.build("gsm8k", path=root / "missing", data_dir=root)


if __name__ == "__main__":
  absltest.main()
