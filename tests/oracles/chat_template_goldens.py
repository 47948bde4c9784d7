r"""Golden chat-template renderings from Hugging Face ``transformers``.

Renders a few Jinja chat templates (ChatML, a Llama-2-style template that
checks role alternation with ``raise_exception`` and uses ``bos_token`` /
``eos_token``, and one using ``{% generation %}``, ``tojson``, ``namespace``
and ``{% break %}``) on fixed conversations with
``PreTrainedTokenizerFast.apply_chat_template(tokenize=False)``, and
records the outputs (or the error) in
``tests/testdata/data/chat_template_goldens.json``. The tokenizer is a tiny
word-level one built in memory: no downloads.

Run from the repository root (CI never runs it)::

  HF_HUB_OFFLINE=1 .venv-oracle/bin/python tests/oracles/chat_template_goldens.py

``tests/data/tokenizer_test.py`` compares ``alignment.data.tokenizer``'s
rendering with the stored outputs.
"""

import json
import pathlib

import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

OUT = (
  pathlib.Path(__file__).resolve().parents[1]
  / "testdata"
  / "data"
  / "chat_template_goldens.json"
)

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
  "+ '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_STYLE = """{% if messages[0]['role'] == 'system' %}
  {% set system = messages[0]['content'] %}
  {% set rest = messages[1:] %}
{% else %}
  {% set system = none %}
  {% set rest = messages %}
{% endif %}
{% for message in rest %}
  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{ raise_exception('Roles must alternate user/assistant/...') }}
  {% endif %}
  {% if message['role'] == 'user' %}
    {% if loop.first and system is not none %}
{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'].strip() + ' [/INST]' }}
    {% else %}
{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}
    {% endif %}
  {% else %}
{{ ' ' + message['content'].strip() + ' ' + eos_token }}
  {% endif %}
{% endfor %}"""

FANCY = """{% set ns = namespace(n_user=0) %}
{% for message in messages %}
{% if message['role'] == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif %}
{% if message['role'] == 'stop' %}{% break %}{% endif %}
<{{ message['role'] }} n={{ ns.n_user }}>{{ message['content'] | tojson }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = {
  "single": [{"role": "user", "content": "What is 2+2?"}],
  "multi": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi  there "},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": 'Café — ünïcode "quoted"'},
  ],
  "bad_order": [
    {"role": "user", "content": "a"},
    {"role": "user", "content": "b"},
  ],
  "with_stop": [
    {"role": "user", "content": "x"},
    {"role": "stop", "content": "ignored"},
    {"role": "user", "content": "never"},
  ],
}

TEMPLATES = {"chatml": CHATML, "llama2_style": LLAMA2_STYLE, "fancy": FANCY}


def main():
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
  tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tk,
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    unk_token="<unk>",
  )
  cases = []
  for tname, template in TEMPLATES.items():
    for cname, messages in CONVERSATIONS.items():
      for gen in (False, True):
        case = {
          "template": tname,
          "conversation": cname,
          "add_generation_prompt": gen,
        }
        try:
          case["text"] = tok.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=gen,
          )
        except Exception as e:  # noqa: BLE001 - the golden records it
          case["error"] = type(e).__name__
          case["message"] = str(e)
        cases.append(case)
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(
    json.dumps(
      {
        "transformers": transformers.__version__,
        "special_tokens": {
          "bos_token": "<s>",
          "eos_token": "</s>",
          "pad_token": "<pad>",
          "unk_token": "<unk>",
        },
        "templates": TEMPLATES,
        "conversations": CONVERSATIONS,
        "cases": cases,
      },
      indent=1,
      ensure_ascii=False,
    )
    + "\n"
  )
  print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
  main()
