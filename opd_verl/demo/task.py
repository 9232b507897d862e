"""The CPU demo task: multi-digit addition as chat prompts, in veRL's parquet format, with a verifiable reward.

A prompt is the user message `"a+b="`. Two variants:

- `sums` (data source `opd_demo/addition`): the correct response is the decimal sum followed by `<|im_end|>`
  (about 3 tokens; for the OPD/ExOPD/IW recipes).
- `worked` (data source `opd_demo/addition_worked`): the response works the sum digit by digit from the right,
  one line per digit with the carry written out, then the answer line (about 60 tokens, one sentence per line;
  for the release recipes, whose rule needs several sentences). For 347+285::

      7+5+0=12 carry 1
      4+8+1=13 carry 1
      3+2+1=6 carry 0
      answer 632

  The later lines depend on the carries of the earlier ones and the answer line reads the written digits back,
  so a weak student goes wrong late.

`compute_score` is veRL's custom reward function signature (`reward.custom_reward_function.path` = this file,
`name` = `compute_score`). Rows carry `extra_info.problem` / `extra_info.solution` too, so OPSD's privileged-context
teacher can read the reference answer.
"""

from __future__ import annotations

import random

DATA_SOURCE = "opd_demo/addition"
WORKED_DATA_SOURCE = "opd_demo/addition_worked"
VARIANTS = ("sums", "worked")
ANSWER_PREFIX = "answer "


def make_problems(n: int, min_digits: int = 1, max_digits: int = 2, seed: int = 0) -> list[tuple[int, int]]:
    """`n` pairs (a, b) with a digit count drawn uniformly in [min_digits, max_digits] for each operand."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)

    def operand() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    return [(operand(), operand()) for _ in range(n)]


def problem_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_text(a: int, b: int) -> str:
    return str(a + b)


def worked_text(a: int, b: int) -> str:
    """The worked solution of a+b: one line `x+y+c=s carry k` per digit from the right, then `answer a+b`."""
    digits = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for i in range(digits):
        x, y = (a // 10**i) % 10, (b // 10**i) % 10
        total = x + y + carry
        lines.append(f"{x}+{y}+{carry}={total} carry {total // 10}")
        carry = total // 10
    lines.append(f"{ANSWER_PREFIX}{a + b}")
    return "\n".join(lines)


def make_rows(problems: list[tuple[int, int]], split: str, variant: str = "sums") -> list[dict]:
    """veRL RL-dataset rows: `data_source`, `prompt` (chat messages), `ability`, `reward_model`, `extra_info`.

    `reward_model.ground_truth` is the sum in both variants; `extra_info.solution` is the full target response
    (the sum, or the worked solution), which the demo's SFT trains on and OPSD's teacher reads.
    """
    if variant not in VARIANTS:
        raise ValueError(f"task variant must be one of {VARIANTS}, got {variant!r}")
    worked = variant == "worked"
    rows = []
    for i, (a, b) in enumerate(problems):
        problem, answer = problem_text(a, b), answer_text(a, b)
        solution = worked_text(a, b) if worked else answer
        rows.append(
            {
                "data_source": WORKED_DATA_SOURCE if worked else DATA_SOURCE,
                "prompt": [{"role": "user", "content": problem}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": i, "problem": problem, "solution": solution},
            }
        )
    return rows


def write_parquet(path: str, rows: list[dict]) -> str:
    import os

    import pandas as pd

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def extract_answer(solution_str: str, data_source: str = DATA_SOURCE) -> str:
    """The response text up to the first chat-end token, stripped; for the worked variant, its last line's number
    after `answer ` (empty when the last line is not an answer line)."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        solution_str = solution_str.split(stop)[0]
    text = solution_str.strip()
    if data_source == WORKED_DATA_SOURCE:
        last = text.rsplit("\n", 1)[-1].strip()
        return last[len(ANSWER_PREFIX) :].strip() if last.startswith(ANSWER_PREFIX) else ""
    return text


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response's answer is exactly the sum, else 0.0 (see `extract_answer`)."""
    return 1.0 if extract_answer(solution_str, data_source) == str(ground_truth).strip() else 0.0
