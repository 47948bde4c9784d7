"""The embedded default task: deterministic generated data with a gold reward.

"Letters" task. A prompt is ``n_prompt_letters`` distinct lowercase letters
followed by ``">"`` (``"qwert>"``). A completion is a string of lowercase
letters. The gold reward of a completion is the fraction of its first
``completion_len`` characters that belong to the prompt's *preferred set*,
so it lies in ``[0, 1]`` and is cheap to compute exactly:

  r*(x, y) = (1 / K) * Σ_{i < K} [y_i ∈ S(x)],   K = completion_len

with ``rule="first_half"`` (default): S = a–m for every prompt, a reward a
2-layer model learns within the default run's step budget; with
``rule="prompt_half"``: S(x) is the half of the alphabet (a–m or n–z) that
contains the prompt's first letter; with ``rule="in_prompt"``: S(x) is the
set of the prompt's own letters. The last two make the reward depend on the
prompt; a model that cannot condition on it scores exactly chance on their
preference pairs, so they need larger models or longer runs (measured: the
tiny preset stays at chance after 400 reward-model steps).

Supervised data ("demonstrations") draws each completion letter from S(x)
with probability ``p_in`` and uniformly from the alphabet otherwise, so a
policy fine-tuned on it starts at a gold reward of about
``p_in + (1 - p_in) |S| / 26`` and has clear room to improve. Preference
pairs are labelled by the gold reward with Bradley–Terry noise:
``P(y1 ≻ y2) = σ((r*(y1) - r*(y2)) / temperature)``.

Attribute ratings (multi-objective reward models). With ``attributes`` set,
every preference row also carries ``chosen_ratings`` / ``rejected_ratings``:
one rating per named attribute of each response (the HelpSteer-style
per-response ratings that SteerLM / DPA / ArmoRM regress on), each the
attribute's exact value plus Gaussian noise of std ``rating_noise`` (a
rater's noise; the gold reward itself stays noise-free). The attributes
(:data:`ATTRIBUTES`), all in ``[0, 1]`` on the first ``K`` characters:

* ``gold``: the gold reward r*(x, y) (the "helpfulness" that labels pairs);
* ``in_prompt``: the fraction of letters that occur in the prompt (a
  prompt-dependent "correctness"; chance for a model that ignores it);
* ``distinct``: distinct letters / K (a "complexity" / diversity);
* ``vowels``: the fraction of vowels (a surface "style" attribute);
* ``length``: ``min(len(y), K) / K`` (a "verbosity"; 1 for every
  demonstration, informative on sampled completions).

Everything is a pure function of the seed (NumPy ``Generator``).
"""

import dataclasses
import string

import numpy as np

ALPHABET = string.ascii_lowercase
PROMPT_END = ">"
RULES = ("first_half", "prompt_half", "in_prompt")
# Gold-reward gap from which a pair is "easy" (LettersTask.difficulty).
EASY_GAP = 0.25
#: Rateable attributes of a response (module docstring).
ATTRIBUTES = ("gold", "in_prompt", "distinct", "vowels", "length")
_VOWELS = frozenset("aeiou")


@dataclasses.dataclass(frozen=True)
class LettersTask:
  """Generator and gold reward of the default task (see module docstring)."""

  n_prompt_letters: int = 5
  completion_len: int = 8
  p_in: float = 0.3
  label_temperature: float = 0.1
  rule: str = "first_half"
  # Attribute ratings of preference rows (module docstring); () for none.
  attributes: tuple[str, ...] = ()
  rating_noise: float = 0.05

  def __post_init__(self):
    attrs = tuple(self.attributes or ())
    object.__setattr__(self, "attributes", attrs)
    bad = [a for a in attrs if a not in ATTRIBUTES]
    if bad or len(set(attrs)) != len(attrs):
      raise ValueError(
        f"LettersTask.attributes must be distinct names from "
        f"{ATTRIBUTES}, got {list(attrs)}."
      )
    if not self.rating_noise >= 0:
      raise ValueError(
        f"LettersTask.rating_noise must be >= 0, got {self.rating_noise}."
      )
    if self.rule not in RULES:
      raise ValueError(
        f"LettersTask.rule must be one of {RULES}, got {self.rule!r}."
      )
    if not 1 <= self.n_prompt_letters <= 26:
      raise ValueError(
        "LettersTask.n_prompt_letters must be in [1, 26], got "
        f"{self.n_prompt_letters}."
      )
    if self.completion_len < 1:
      raise ValueError(
        f"LettersTask.completion_len must be >= 1, got {self.completion_len}."
      )
    if not 0.0 <= self.p_in <= 1.0:
      raise ValueError(f"LettersTask.p_in must be in [0, 1], got {self.p_in}.")
    if self.label_temperature <= 0:
      raise ValueError(
        "LettersTask.label_temperature must be > 0, got "
        f"{self.label_temperature}."
      )

  # -- generation -------------------------------------------------------------

  def prompts(self, n: int, seed: int) -> list[str]:
    """``n`` prompts, deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0])
    out = []
    for _ in range(n):
      letters = rng.choice(26, size=self.n_prompt_letters, replace=False)
      out.append("".join(ALPHABET[i] for i in letters) + PROMPT_END)
    return out

  def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
    """One supervised completion for ``prompt`` (noisy, see module doc)."""
    letters = self.preferred_letters(prompt)
    chars = []
    for _ in range(self.completion_len):
      if rng.random() < self.p_in:
        chars.append(letters[rng.integers(len(letters))])
      else:
        chars.append(ALPHABET[rng.integers(26)])
    return "".join(chars)

  def sft_examples(self, n: int, seed: int) -> list[dict]:
    """``[{"prompt", "completion"}]`` demonstrations."""
    rng = np.random.default_rng([seed, 1])
    return [
      {"prompt": p, "completion": self.demonstration(p, rng)}
      for p in self.prompts(n, seed)
    ]

  def label_pairs(
    self, prompts, completions_a, completions_b, seed: int
  ) -> list[dict]:
    """Labels pairs with Bradley–Terry noise on the gold reward.

    Returns rows ``{"prompt", "chosen", "rejected", "gold_chosen",
    "gold_rejected", "subset"}`` (``subset``: :meth:`difficulty` of the
    gold gap) and, with ``attributes``, ``chosen_ratings`` /
    ``rejected_ratings`` (:meth:`ratings`); the chosen side is drawn with
    probability ``σ((r*(a) - r*(b)) / label_temperature)``.
    """
    rng = np.random.default_rng([seed, 2])
    ga = self.gold_rewards(prompts, completions_a)
    gb = self.gold_rewards(prompts, completions_b)
    # σ(x) as (1 + tanh(x / 2)) / 2: no overflow for large |x|.
    p_a = 0.5 * (1.0 + np.tanh(0.5 * (ga - gb) / self.label_temperature))
    take_a = rng.random(len(prompts)) < p_a
    rows = []
    for i, prompt in enumerate(prompts):
      a, b = completions_a[i], completions_b[i]
      chosen, rejected = (a, b) if take_a[i] else (b, a)
      g_c, g_r = (ga[i], gb[i]) if take_a[i] else (gb[i], ga[i])
      rows.append(
        {
          "prompt": prompt,
          "chosen": chosen,
          "rejected": rejected,
          "gold_chosen": float(g_c),
          "gold_rejected": float(g_r),
          "subset": self.difficulty(g_c - g_r),
        }
      )
    if self.attributes:
      # Its own stream: the pairs and labels are those of a task without
      # ratings.
      noise = np.random.default_rng([seed, 6])
      for row in rows:
        for side in ("chosen", "rejected"):
          row[f"{side}_ratings"] = [
            float(x) for x in self.ratings(row["prompt"], row[side], noise)
          ]
    return rows

  def attribute_values(self, prompt: str, completion: str) -> np.ndarray:
    """Exact values of ``attributes`` (module docstring), float64 ``[K]``."""
    n = self.completion_len
    head = completion[:n]
    prompt_set = set(self.prompt_letters(prompt))
    value = {
      "gold": lambda: self.gold_reward(prompt, completion),
      "in_prompt": lambda: sum(c in prompt_set for c in head) / n,
      "distinct": lambda: len(set(head)) / n,
      "vowels": lambda: sum(c in _VOWELS for c in head) / n,
      "length": lambda: len(head) / n,
    }
    return np.asarray([value[a]() for a in self.attributes], np.float64)

  def ratings(
    self, prompt: str, completion: str, rng: np.random.Generator
  ) -> np.ndarray:
    """:meth:`attribute_values` plus N(0, ``rating_noise``²) rater noise."""
    exact = self.attribute_values(prompt, completion)
    if self.rating_noise == 0:
      return exact
    return exact + self.rating_noise * rng.standard_normal(exact.shape)

  def preference_pairs(self, n: int, seed: int) -> list[dict]:
    """Pairs of two demonstrations per prompt, labelled by :meth:`label_pairs`.

    (The default pipeline labels pairs sampled from the SFT policy instead;
    this offline version needs no model.)
    """
    rng = np.random.default_rng([seed, 3])
    prompts = self.prompts(n, seed)
    a = [self.demonstration(p, rng) for p in prompts]
    b = [self.demonstration(p, rng) for p in prompts]
    return self.label_pairs(prompts, a, b, seed)

  def difficulty(self, gap: float) -> str:
    """A pair's subset by its gold-reward gap: ``"easy"`` when ``|gap| >=
    EASY_GAP`` (2 of the default 8 letters), else ``"hard"`` (including
    ties, which only the label noise orders)."""
    return "easy" if abs(gap) >= EASY_GAP - 1e-9 else "hard"

  # -- reward -----------------------------------------------------------------

  def prompt_letters(self, prompt: str) -> str:
    body = prompt[: -len(PROMPT_END)] if prompt.endswith(PROMPT_END) else prompt
    return body

  def preferred_letters(self, prompt: str) -> str:
    """S(x): the letters the gold reward counts (module docstring)."""
    body = self.prompt_letters(prompt)
    if self.rule == "in_prompt":
      return body
    if self.rule == "first_half":
      return ALPHABET[:13]
    first = body[:1]
    return ALPHABET[:13] if first and first <= "m" else ALPHABET[13:]

  def gold_reward(self, prompt: str, completion: str) -> float:
    """r*(x, y) in [0, 1] (module docstring)."""
    letters = set(self.preferred_letters(prompt))
    head = completion[: self.completion_len]
    return sum(c in letters for c in head) / self.completion_len

  def gold_rewards(self, prompts, completions) -> np.ndarray:
    """Vectorised :meth:`gold_reward`, float64 ``[B]``."""
    if len(prompts) != len(completions):
      raise ValueError(
        f"gold_rewards: {len(prompts)} prompts but "
        f"{len(completions)} completions."
      )
    return np.asarray(
      [
        self.gold_reward(p, c)
        for p, c in zip(prompts, completions, strict=True)
      ],
      np.float64,
    )

  def expected_demonstration_reward(self) -> float:
    """Gold reward of the demonstration distribution, in closed form."""
    size = self.n_prompt_letters if self.rule == "in_prompt" else 13
    return self.p_in + (1 - self.p_in) * size / 26
