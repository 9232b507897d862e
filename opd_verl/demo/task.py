"""The CPU demo task: multi-digit addition as chat prompts, in veRL's parquet format, with a verifiable reward.

A prompt is the user message `"a+b="`; the correct response is the decimal sum followed by `<|im_end|>`.
`compute_score` is veRL's custom reward function signature (`reward.custom_reward_function.path` = this file,
`name` = `compute_score`). Rows carry `extra_info.problem` / `extra_info.solution` too, so OPSD's privileged-context
teacher can read the reference answer.
"""

from __future__ import annotations

import random

DATA_SOURCE = "opd_demo/addition"


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


def make_rows(problems: list[tuple[int, int]], split: str) -> list[dict]:
    """veRL RL-dataset rows: `data_source`, `prompt` (chat messages), `ability`, `reward_model`, `extra_info`."""
    rows = []
    for i, (a, b) in enumerate(problems):
        problem, solution = problem_text(a, b), answer_text(a, b)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": problem}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": solution},
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


def extract_answer(solution_str: str) -> str:
    """The response text up to the first chat-end token, stripped."""
    for stop in ("<|im_end|>", "<|endoftext|>"):
        solution_str = solution_str.split(stop)[0]
    return solution_str.strip()


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response is exactly the sum, else 0.0."""
    return 1.0 if extract_answer(solution_str) == str(ground_truth).strip() else 0.0
