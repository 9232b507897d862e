"""Check results and the summary table of the acceptance run."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable

__all__ = ["CheckFailed", "Result", "Report", "STATUSES"]

STATUSES = ("pass", "FAIL", "not run")


class CheckFailed(AssertionError):
    """A check measured something outside its bound (the message says what and by how much)."""


@dataclasses.dataclass
class Result:
    """One row of the summary: check name, status (pass | FAIL | not run), the figure it measured, seconds."""

    name: str
    status: str
    figure: str
    seconds: float


class Report:
    """Runs checks, prints one line per check as it finishes and the summary table at the end.

    A check is a callable returning its figure (a short string); raising marks it FAIL with the error as the
    figure. ``skip`` records a check that was not run and why.
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.results: list[Result] = []
        self.log = log

    def run(self, name: str, check: Callable[[], str]) -> Result:
        self.log(f"=== {name}")
        start = time.perf_counter()
        try:
            figure, status = str(check()), "pass"
        except Exception as err:  # a failed check must not stop the others
            self.log(traceback.format_exc())
            first = (str(err).strip().splitlines() or [""])[0]
            figure, status = f"{type(err).__name__}: {first}"[:300], "FAIL"
        result = Result(name, status, figure, time.perf_counter() - start)
        self.results.append(result)
        self.log(f"--- {name}: {status} ({result.seconds:.1f} s) {figure}")
        return result

    def skip(self, name: str, why: str) -> Result:
        result = Result(name, "not run", why, 0.0)
        self.results.append(result)
        self.log(f"--- {name}: not run: {why}")
        return result

    def passed(self, name: str) -> bool:
        return any(r.name == name and r.status == "pass" for r in self.results)

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if r.status == "FAIL"]

    def table(self) -> str:
        """The summary as a Markdown table (pastes into docs/gpu.md as is)."""
        lines = ["| check | result | figure | time |", "|---|---|---|---|"]
        for r in self.results:
            figure = r.figure.replace("|", "/").replace("\n", " ")
            lines.append(f"| {r.name} | {r.status} | {figure} | {r.seconds:.1f} s |")
        total = sum(r.seconds for r in self.results)
        counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        lines.append(
            f"| total | {counts['pass']} pass, {counts['FAIL']} FAIL, {counts['not run']} not run | | {total:.1f} s |"
        )
        return "\n".join(lines)
