"""Tokenizers (byte, tokenizer.json, SentencePiece) and chat templating."""

import io
import json
import pathlib

from absl.testing import absltest, parameterized

from alignment.data import tokenizer as tok_lib
from tests.data import fixtures

GOLDENS = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "data"
  / "chat_template_goldens.json"
)

CORPUS = [
  "the quick brown fox jumps over the lazy dog",
  "a preference pair has a chosen and a rejected completion",
  "reward models score completions; policies generate them",
  "Café ünïcode text, numbers 12345 and punctuation!?",
] * 8

CHATML = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
  "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
  "{% endif %}"
)


def make_hf_dir(
  directory: pathlib.Path,
  *,
  with_template=True,
  add_bos_token=None,
  template_file=False,
) -> pathlib.Path:
  """A real tokenizer.json (byte-level BPE trained here) + config."""
  from tokenizers import (  # noqa: PLC0415
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )

  tk = Tokenizer(models.BPE(unk_token=None))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  tk.train_from_iterator(
    CORPUS,
    trainers.BpeTrainer(
      vocab_size=400,
      special_tokens=specials,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  tk.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
  )
  directory.mkdir(parents=True, exist_ok=True)
  tk.save(str(directory / "tokenizer.json"))
  config = {
    "bos_token": "<s>",
    "eos_token": {"content": "<|im_end|>"},
    "pad_token": "<pad>",
  }
  if add_bos_token is not None:
    config["add_bos_token"] = add_bos_token
  if with_template and not template_file:
    config["chat_template"] = CHATML
  if with_template and template_file:
    (directory / "chat_template.jinja").write_text(CHATML)
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


def make_sp_model(directory: pathlib.Path) -> pathlib.Path:
  """A SentencePiece model trained here on the tiny corpus."""
  import sentencepiece as spm  # noqa: PLC0415

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS),
    model_writer=model,
    vocab_size=60,
    model_type="unigram",
    character_coverage=1.0,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    minloglevel=2,
  )
  path = directory / "tokenizer.model"
  path.write_bytes(model.getvalue())
  return path


class ByteTokenizerTest(absltest.TestCase):
  def test_ids_and_roundtrip(self):
    t = tok_lib.ByteTokenizer()
    self.assertEqual(
      (t.vocab_size, t.pad_id, t.bos_id, t.eos_id, t.unk_id),
      (260, 256, 257, 258, 259),
    )
    ids = t.encode("héllo")
    self.assertEqual(ids, list("héllo".encode()))
    self.assertEqual(t.decode(ids + [t.eos_id, 104]), "héllo")
    self.assertEqual(t.decode([t.bos_id] + ids + [t.pad_id]), "héllo")

  def test_plain_chat_format_is_hh_rlhf(self):
    t = tok_lib.ByteTokenizer()
    msgs = [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "bye"},
    ]
    self.assertEqual(
      t.apply_chat_template(msgs, add_generation_prompt=True),
      "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ",
    )
    self.assertEqual(
      tok_lib.render_plain_chat([{"role": "system", "content": "s"}]),
      "\n\nSystem: s",
    )
    with self.assertRaisesRegex(ValueError, "unknown role 'tool'"):
      tok_lib.render_plain_chat([{"role": "tool", "content": "x"}])
    with self.assertRaisesRegex(TypeError, "list of"):
      tok_lib.render_plain_chat("hi")


class HFTokenizerTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = fixtures.tempdir(self)

  def test_from_dir_reads_specials_and_template(self):
    t = tok_lib.HFTokenizer.from_dir(make_hf_dir(self.dir / "a"))
    raw = t._tok  # noqa: SLF001
    self.assertEqual(t.bos_id, raw.token_to_id("<s>"))  # post-processor
    self.assertEqual(t.eos_id, raw.token_to_id("<|im_end|>"))
    self.assertEqual(t.pad_id, raw.token_to_id("<pad>"))
    self.assertEqual(t.vocab_size, raw.get_vocab_size(with_added_tokens=True))
    self.assertEqual(t.chat_template, CHATML)
    text = "the lazy fox, Café!"
    ids = t.encode(text)
    self.assertNotIn(t.bos_id, ids)  # encode never adds specials
    self.assertEqual(t.decode(ids), text)
    self.assertEqual(t.decode(ids + [t.eos_id] + ids), text)
    self.assertEqual(t.encode_batch([text, "dog"]), [ids, t.encode("dog")])
    # Special tokens inside rendered text map to their ids.
    rendered = t.apply_chat_template(
      [{"role": "user", "content": "dog"}], add_generation_prompt=True
    )
    ids = t.encode(rendered)
    self.assertEqual(ids[0], raw.token_to_id("<|im_start|>"))
    self.assertIn(t.eos_id, ids)

  def test_bos_follows_config_and_template_file(self):
    t = tok_lib.HFTokenizer.from_dir(
      make_hf_dir(self.dir / "b", add_bos_token=False, template_file=True)
    )
    self.assertIsNone(t.bos_id)
    self.assertEqual(t.chat_template, CHATML)
    t = tok_lib.load_tokenizer(
      str(make_hf_dir(self.dir / "c", with_template=False))
    )
    self.assertIsInstance(t, tok_lib.HFTokenizer)
    self.assertIsNone(t.chat_template)
    self.assertEqual(
      t.apply_chat_template([{"role": "user", "content": "a"}]), "\n\nHuman: a"
    )

  def test_missing_eos_is_an_error(self):
    d = make_hf_dir(self.dir / "d")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with self.assertRaisesRegex(ValueError, "no eos_token"):
      tok_lib.HFTokenizer.from_dir(d)
    t = tok_lib.HFTokenizer.from_dir(d, eos_token="</s>")
    self.assertEqual(t.eos_id, t.token_to_id("</s>"))
    self.assertEqual(t.pad_id, t.eos_id)  # no pad token: falls back to EOS

  def test_load_tokenizer_errors(self):
    self.assertIsInstance(tok_lib.load_tokenizer("byte"), tok_lib.ByteTokenizer)
    with self.assertRaises(FileNotFoundError):
      tok_lib.load_tokenizer(str(self.dir / "nothing"))


class SentencePieceTokenizerTest(absltest.TestCase):
  def test_trained_model_roundtrip_and_specials(self):
    d = fixtures.tempdir(self)
    path = make_sp_model(d)
    t = tok_lib.SentencePieceTokenizer(path)
    self.assertEqual((t.pad_id, t.unk_id, t.bos_id, t.eos_id), (0, 1, 2, 3))
    self.assertEqual(t.vocab_size, 60)
    text = "the quick brown fox"
    ids = t.encode(text)
    self.assertNotIn(t.bos_id, ids)
    self.assertEqual(t.decode(ids), text)
    self.assertEqual(t.decode(ids + [t.eos_id] + ids), text)
    # A checkpoint directory with tokenizer.model + tokenizer_config.json.
    (d / "tokenizer_config.json").write_text(
      json.dumps({"chat_template": CHATML, "add_bos_token": False})
    )
    t2 = tok_lib.load_tokenizer(str(d))
    self.assertIsInstance(t2, tok_lib.SentencePieceTokenizer)
    self.assertIsNone(t2.bos_id)
    self.assertEqual(
      t2.apply_chat_template([{"role": "user", "content": "x"}]),
      "<|im_start|>user\nx<|im_end|>\n",
    )
    self.assertIsInstance(
      tok_lib.load_tokenizer(str(path)), tok_lib.SentencePieceTokenizer
    )


class ChatTemplateGoldenTest(parameterized.TestCase):
  """Renderings equal transformers' apply_chat_template (stored goldens from
  tests/oracles/chat_template_goldens.py)."""

  def test_matches_transformers(self):
    import jinja2  # noqa: PLC0415

    golden = json.loads(GOLDENS.read_text())

    class Tok:
      chat_template = None
      special_tokens = golden["special_tokens"]

    self.assertLen(golden["cases"], 24)
    for case in golden["cases"]:
      msgs = golden["conversations"][case["conversation"]]
      kw = dict(
        add_generation_prompt=case["add_generation_prompt"],
        chat_template=golden["templates"][case["template"]],
      )
      with self.subTest(
        **{
          k: case[k]
          for k in ("template", "conversation", "add_generation_prompt")
        }
      ):
        if "error" in case:
          with self.assertRaises(jinja2.TemplateError) as ctx:
            tok_lib.apply_chat_template(Tok(), msgs, **kw)
          self.assertEqual(str(ctx.exception), case["message"])
        else:
          self.assertEqual(
            tok_lib.apply_chat_template(Tok(), msgs, **kw), case["text"]
          )

  def test_template_is_sandboxed(self):
    import jinja2  # noqa: PLC0415

    class Tok:
      chat_template = "{{ messages.__class__.__mro__ }}"
      special_tokens = {}

    with self.assertRaises(jinja2.exceptions.SecurityError):
      tok_lib.apply_chat_template(Tok(), [{"role": "user", "content": "x"}])


if __name__ == "__main__":
  absltest.main()
