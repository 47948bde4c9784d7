"""Small fixture files in the exact formats of the public datasets.

Each ``write_<dataset>(root)`` writes files laid out as the public release
is (file names, directory structure, field names and types, compression)
and returns the canonical rows the builder must read back, in order.
"""

import gzip
import json
import pathlib
import tempfile

from alignment.data.tokenizer import render_plain_chat


def tempdir(test) -> pathlib.Path:
  """A temporary directory removed when ``test`` finishes."""
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return pathlib.Path(tmp.name)


def _jsonl(path: pathlib.Path, rows, *, gz=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def _parquet(path: pathlib.Path, rows):
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415

  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _msgs(*pairs):
  return [{"role": r, "content": c} for r, c in pairs]


def _mj(msgs):
  return json.dumps(msgs, ensure_ascii=False)


# -- HH-RLHF (Anthropic/hh-rlhf: <subset>/{train,test}.jsonl.gz) ---------------


def write_hh_rlhf(root: pathlib.Path):
  rows = [
    {
      "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five, I think.",
    },
    {
      "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?"
      "\n\nAssistant: Fine, thanks.",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are "
      "you?\n\nAssistant: Go away.",
    },
  ]
  _jsonl(root / "helpful-base" / "train.jsonl.gz", rows, gz=True)
  _jsonl(
    root / "harmless-base" / "train.jsonl.gz",
    [
      {
        "chosen": "\n\nHuman: Café?\n\nAssistant: ünïcode ok",
        "rejected": "\n\nHuman: Café?\n\nAssistant: no",
      }
    ],
    gz=True,
  )
  _jsonl(root / "helpful-base" / "test.jsonl.gz", rows[:1], gz=True)
  # Sorted file order: harmless-base before helpful-base.
  return [
    {
      "prompt": "\n\nHuman: Café?\n\nAssistant: ",
      "prompt_messages": _mj(_msgs(("user", "Café?"))),
      "chosen": "ünïcode ok",
      "rejected": "no",
      "subset": "harmless-base",
    },
    {
      "prompt": "\n\nHuman: What is 2+2?\n\nAssistant: ",
      "prompt_messages": _mj(_msgs(("user", "What is 2+2?"))),
      "chosen": "4.",
      "rejected": "Five, I think.",
      "subset": "helpful-base",
    },
    {
      "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are "
      "you?\n\nAssistant: ",
      "prompt_messages": _mj(
        _msgs(("user", "hi"), ("assistant", "hello"), ("user", "how are you?"))
      ),
      "chosen": "Fine, thanks.",
      "rejected": "Go away.",
      "subset": "helpful-base",
    },
  ]


# -- UltraFeedback binarized (data/train_prefs-00000-of-00001.parquet) ---------


def write_ultrafeedback(root: pathlib.Path):
  def row(i, prompt, good, bad, sc, sr):
    user = [{"content": prompt, "role": "user"}]
    return {
      "prompt": prompt,
      "prompt_id": f"{i:064x}",
      "chosen": user + [{"content": good, "role": "assistant"}],
      "rejected": user + [{"content": bad, "role": "assistant"}],
      "messages": user + [{"content": good, "role": "assistant"}],
      "score_chosen": sc,
      "score_rejected": sr,
    }

  rows = [
    row(1, "Name a colour.", "Blue.", "Seven.", 9.0, 2.5),
    row(2, "Say hi", "Hi!", "No.", 7.0, 6.0),
  ]
  _parquet(root / "data" / "train_prefs-00000-of-00001.parquet", rows)
  _parquet(root / "data" / "test_prefs-00000-of-00001.parquet", rows[1:])
  return [
    {
      "prompt": render_plain_chat(
        _msgs(("user", r["prompt"])), add_generation_prompt=True
      ),
      "prompt_messages": _mj(_msgs(("user", r["prompt"]))),
      "chosen": r["chosen"][-1]["content"],
      "rejected": r["rejected"][-1]["content"],
      "margin": r["score_chosen"] - r["score_rejected"],
    }
    for r in rows
  ]


# -- HelpSteer2 preference (preference/preference.jsonl.gz) --------------------


def write_helpsteer2(root: pathlib.Path):
  def row(split, prompt, r1, r2, strength):
    return {
      "split": split,
      "prompt": prompt,
      "response_1": r1,
      "response_2": r2,
      "preference_strength": strength,
      "preference_statement": "@Response 1 is better.",
      "preference_elaboration": "It answers the question.",
      "three_most_similar_preferences": [
        {
          "statement": "@Response 1 is better.",
          "elaboration": "x",
          "strength": strength,
        }
      ],
      "all_preferences_unprocessed": [
        {
          "statement": "@Response 1 is better.",
          "elaboration": "x",
          "strength": strength,
        }
      ],
    }

  multi = (
    "Write a haiku.\n<extra_id_1>Assistant\nOld pond...\n"
    "<extra_id_1>User\nAnother one"
  )
  rows = [
    row("train", "What is AI?", "A field of CS.", "Food.", -2),
    row("train", "Tie?", "a", "b", 0),
    row("val", "Validation prompt", "x", "y", 1),
    row("train", multi, "Frog jumps", "Silence", 3),
  ]
  _jsonl(root / "preference" / "preference.jsonl.gz", rows, gz=True)
  multi_msgs = _msgs(
    ("user", "Write a haiku."),
    ("assistant", "Old pond..."),
    ("user", "Another one"),
  )
  train = [
    {
      "prompt": render_plain_chat(
        _msgs(("user", "What is AI?")), add_generation_prompt=True
      ),
      "prompt_messages": _mj(_msgs(("user", "What is AI?"))),
      "chosen": "A field of CS.",
      "rejected": "Food.",
      "margin": 2.0,
    },
    {
      "prompt": render_plain_chat(multi_msgs, add_generation_prompt=True),
      "prompt_messages": _mj(multi_msgs),
      "chosen": "Silence",
      "rejected": "Frog jumps",
      "margin": 3.0,
    },
  ]
  validation = [
    {
      "prompt": render_plain_chat(
        _msgs(("user", "Validation prompt")), add_generation_prompt=True
      ),
      "prompt_messages": _mj(_msgs(("user", "Validation prompt"))),
      "chosen": "y",
      "rejected": "x",
      "margin": 1.0,
    }
  ]
  return train, validation


# -- KTO unpaired (trl-lib/kto-mix-14k: data/train-*.parquet) ------------------


def write_kto(root: pathlib.Path):
  rows = [
    {
      "prompt": [{"content": "Is the sky blue?", "role": "user"}],
      "completion": [{"content": "Yes, on clear days.", "role": "assistant"}],
      "label": True,
    },
    {
      "prompt": [{"content": "2+2?", "role": "user"}],
      "completion": [{"content": "22", "role": "assistant"}],
      "label": False,
    },
  ]
  _parquet(root / "data" / "train-00000-of-00001.parquet", rows)
  return [
    {
      "prompt": render_plain_chat(r["prompt"], add_generation_prompt=True),
      "prompt_messages": _mj(_msgs(("user", r["prompt"][0]["content"]))),
      "completion": r["completion"][-1]["content"],
      "label": r["label"],
    }
    for r in rows
  ]


# -- GSM8K (grade_school_math/data/{train,test}.jsonl) -------------------------


def write_gsm8k(root: pathlib.Path):
  rows = [
    {
      "question": "Natalia sold clips to 48 of her friends in April, and "
      "then she sold half as many clips in May. How many clips "
      "did Natalia sell altogether in April and May?",
      "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia "
      "sold 48+24 = <<48+24=72>>72 clips altogether in April and "
      "May.\n#### 72",
    },
    {
      "question": "A shop sells 1,200 apples a day. How many in 3 days?",
      "answer": "1,200 * 3 = <<1200*3=3600>>3600\n#### 3,600",
    },
  ]
  _jsonl(root / "grade_school_math" / "data" / "train.jsonl", rows)
  return [
    {
      "prompt": rows[0]["question"],
      "answer": "72",
      "solution": rows[0]["answer"],
    },
    {
      "prompt": rows[1]["question"],
      "answer": "3600",
      "solution": rows[1]["answer"],
    },
  ]


# -- MATH (MATH/train/<subject>/<id>.json) --------------------------------------


def write_math(root: pathlib.Path):
  problems = {
    ("algebra", "1.json"): {
      "problem": "Solve $2x = 1$.",
      "level": "Level 1",
      "type": "Algebra",
      "solution": "Divide by two: $x = \\boxed{\\frac{1}{2}}$.",
    },
    ("geometry", "7.json"): {
      "problem": "What is the area of a unit square?",
      "level": "Level 2",
      "type": "Geometry",
      "solution": "It is $1 \\cdot 1 = \\boxed{1}$, not \\boxed{2}... "
      "actually the answer is $\\boxed{1}$.",
    },
  }
  for (subject, name), row in problems.items():
    path = root / "MATH" / "train" / subject / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=4))
  (root / "MATH" / "test" / "algebra").mkdir(parents=True, exist_ok=True)
  (root / "MATH" / "test" / "algebra" / "2.json").write_text(
    json.dumps(
      {
        "problem": "p",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "\\boxed{3}",
      }
    )
  )
  out = []
  for (_, _), row in sorted(problems.items()):
    out.append(
      {
        "prompt": row["problem"],
        "solution": row["solution"],
        "metadata": json.dumps({"level": row["level"], "type": row["type"]}),
      }
    )
  out[0]["answer"] = "\\frac{1}{2}"
  out[1]["answer"] = "1"
  return out


# -- UltraFeedback raw (openbmb/UltraFeedback: <source>.jsonl) -----------------


def write_ultrafeedback_scored(root: pathlib.Path):
  def completion(model, response, overall, fine, rating):
    return {
      "model": model,
      "principle": "helpfulness",
      "custom_system_prompt": "Be helpful.",
      "response": response,
      "annotations": {
        a: {"Rating": str(rating), "Rationale": "ok"}
        for a in (
          "helpfulness",
          "honesty",
          "instruction_following",
          "truthfulness",
        )
      },
      "critique": "Fine.",
      "overall_score": overall,
      "fine-grained_score": fine,
    }

  rows = [
    {
      "source": "evol_instruct",
      "instruction": "Explain gravity briefly.",
      "models": ["a", "b", "c"],
      "completions": [
        completion("a", "Mass attracts mass.", 8.0, 4.5, 5),
        completion("b", "Magic.", 2.0, 1.25, 1),
        completion("c", "A force.", 6.5, 3.75, 4),
      ],
      "correct_answers": ["None"],
      "incorrect_answers": ["None"],
    },
    {
      "source": "evol_instruct",
      "instruction": "Say yes.",
      "models": ["a", "b"],
      "completions": [
        completion("a", "Yes.", 9, 5.0, 5),
        completion("b", "No.", 1, 1.0, 2),
      ],
      "correct_answers": ["None"],
      "incorrect_answers": ["None"],
    },
  ]
  _jsonl(root / "evol_instruct.jsonl", rows)
  return [
    {
      "prompt": render_plain_chat(
        _msgs(("user", r["instruction"])), add_generation_prompt=True
      ),
      "prompt_messages": _mj(_msgs(("user", r["instruction"]))),
      "responses": [c["response"] for c in r["completions"]],
      "scores": [float(c["overall_score"]) for c in r["completions"]],
    }
    for r in rows
  ]


# -- PRM800K (prm800k/data/phase{1,2}_{train,test}.jsonl) -----------------------


def write_prm800k(root: pathlib.Path):
  def comp(text, rating):
    return {"text": text, "rating": rating, "flagged": None}

  phase1 = {
    "labeler": "340d89bc",
    "timestamp": "2022-07-17T16:56:51.323252",
    "generation": None,
    "is_quality_control_question": False,
    "is_initial_screening_question": False,
    "question": {
      "problem": "What is 1+1?",
      "ground_truth_answer": "2",
      "ground_truth_solution": "1+1=\\boxed{2}.",
    },
    "label": {
      "steps": [
        {
          "completions": [comp("We add.", 1), comp("We multiply.", -1)],
          "human_completion": None,
          "chosen_completion": 0,
        },
        {
          "completions": [comp("1+1=3.", -1)],
          "human_completion": {
            "text": "1+1=2.",
            "rating": None,
            "source": "human",
            "flagged": False,
            "corrected_rating": None,
          },
          "chosen_completion": None,
        },
        {
          "completions": [comp("# Answer\n\n2", 0)],
          "human_completion": None,
          "chosen_completion": 0,
        },
      ],
      "total_time": 1234,
      "finish_reason": "solution",
    },
  }
  phase2 = {
    "labeler": "e90a38f3",
    "timestamp": "2023-01-22T04:34:27.052924",
    "generation": 9,
    "is_quality_control_question": False,
    "is_initial_screening_question": False,
    "question": {
      "problem": "Compute 3*3.",
      "ground_truth_answer": "9",
      "pre_generated_steps": ["3*3 = 9.", "So 10."],
      "pre_generated_answer": "10",
      "pre_generated_verifier_score": 0.01,
    },
    "label": {
      "steps": [
        {
          "completions": [comp("3*3 = 9.", 1)],
          "human_completion": None,
          "chosen_completion": 0,
        },
        {
          "completions": [comp("So 10.", -1)],
          "human_completion": None,
          "chosen_completion": None,
        },
      ],
      "total_time": 999,
      "finish_reason": "found_error",
    },
  }
  _jsonl(root / "prm800k" / "data" / "phase1_train.jsonl", [phase1])
  _jsonl(root / "prm800k" / "data" / "phase2_train.jsonl", [phase2])
  p1, p2 = "What is 1+1?", "Compute 3*3."
  return [
    {"prompt": p1, "steps": ["We multiply."], "step_labels": [0.0]},
    {"prompt": p1, "steps": ["We add.", "1+1=3."], "step_labels": [1.0, 0.0]},
    {
      "prompt": p1,
      "steps": ["We add.", "1+1=2.", "# Answer\n\n2"],
      "step_labels": [1.0, 1.0, 0.0],
    },
    {"prompt": p2, "steps": ["3*3 = 9.", "So 10."], "step_labels": [1.0, 0.0]},
    {"prompt": p2, "steps": ["3*3 = 9."], "step_labels": [1.0]},
  ]


# -- Math-Shepherd (math-shepherd.jsonl) ----------------------------------------


def write_math_shepherd(root: pathlib.Path):
  q = "Janet has 3 apples and buys 2 more. How many apples does she have? "
  steps = [
    "Step 1: She starts with 3 apples.",
    "Step 2: She buys 2, so 3 + 2 = 5.",
    "Step 3: The answer is: 6",
  ]
  inp = q + "".join(s + " ки\n" for s in steps)
  label = q + "".join(s + f" {m}\n" for s, m in zip(steps, "++-", strict=True))
  rows = [{"input": inp, "label": label, "task": "GSM8K"}]
  _jsonl(root / "math-shepherd.jsonl", rows)
  return [{"prompt": q.strip(), "steps": steps, "step_labels": [1.0, 1.0, 0.0]}]
