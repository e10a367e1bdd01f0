"""The reviewer gate: a winning diff is read before it becomes the new best, and may be vetoed.

A reviewer is called by ``experiment.conclude`` (``Lab.reviewer``) with the winner and the best
it beat; a veto turns the keep into a discard whose reason says why, and the review is kept in
the experiment's ``review`` column. Backends:

- ``rules`` (no LLM): vetoes an edit that touches how the metric is computed (the validation
  split, the evaluator, its output), a much bigger model for a small gain, and many added lines
  for a small gain;
- ``api``: the rules first, then an LLM reads the diff with the role's instructions and answers
  ``APPROVE: why`` or ``VETO: why``. A failed call or an unreadable answer approves (the
  measurement stands) and says so, so a flaky API never stalls the night.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nightlab.night.state import Lab, Review
from nightlab.agents.prompt import Prompt
from nightlab.night.store import Experiment

METRIC_PATTERNS = (  # added lines matching these touch the judge, not the model
    r"val\.(tokens|docs)\.npy", r"\beval\.json\b", r"nightlab\.lab\.evaluate", r"\bval_bpb\b\s*=",
    r"NIGHTLAB_(DATA|OUT)\b", r"summary\.json",
)
BIGGER_MODEL = 1.5  # num_params this many times the best's ...
BIGGER_MODEL_GAIN = 0.005  # ... for a gain below this (val_bpb) is vetoed
COMPLEX_LINES = 30  # more added lines than this ...
COMPLEX_GAIN = 0.002  # ... for a gain below this is vetoed

SYSTEM = (
    "You review experiments in nightlab, a lab that trains a small language model for a fixed time "
    "and measures val_bpb (lower is better) with a trusted evaluator. A change below beat the best "
    "beyond the noise. Before it becomes the new best, read its diff and veto it if it has a bug that "
    "makes the number wrong, games the metric instead of improving the model, or adds complexity "
    "out of proportion to its gain. Otherwise approve it."
)
ANSWER = "Answer with one line: `APPROVE: <why>` or `VETO: <why>`."


@dataclass
class RulesReviewer:
    """Checks a winning diff against fixed rules (module constants above)."""

    name: str = "rules"

    def __call__(self, lab: Lab, exp: Experiment, best: Experiment) -> Review:
        diff = lab.git.diff(lab.dir, best.commit_sha or lab.run.base_commit, exp.commit_sha or "")
        return self.check(diff, exp, best) or Review(True, "no rule broken", self.name)

    def check(self, diff: str, exp: Experiment, best: Experiment) -> Review | None:
        added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
        for pattern in METRIC_PATTERNS:
            hit = next((line.strip() for line in added if re.search(pattern, line)), None)
            if hit is not None:
                return Review(False, f"touches the measurement, not the model: {hit[:120]!r}", self.name)
        gain = (best.val_bpb or 0.0) - (exp.val_bpb or 0.0)
        if exp.num_params and best.num_params and exp.num_params > BIGGER_MODEL * best.num_params \
                and gain < BIGGER_MODEL_GAIN:
            return Review(False, f"a {exp.num_params / best.num_params:.1f}x bigger model ({best.num_params:,} -> "
                                 f"{exp.num_params:,} parameters) for a gain of only {gain:.4f}", self.name)
        if len(added) > COMPLEX_LINES and gain < COMPLEX_GAIN:
            return Review(False, f"{len(added)} added lines for a gain of only {gain:.4f}: needless complexity",
                          self.name)
        return None


@dataclass
class ApiReviewer:
    """The rules, then an LLM's judgement of the diff."""

    client: Any  # agents.api.ApiProposer: its ``complete(prompt)``
    instructions: str = ""
    name: str = "reviewer"

    def __call__(self, lab: Lab, exp: Experiment, best: Experiment) -> Review:
        diff = lab.git.diff(lab.dir, best.commit_sha or lab.run.base_commit, exp.commit_sha or "")
        ruled = RulesReviewer(self.name).check(diff, exp, best)
        if ruled is not None:
            return ruled
        user = (f"{self.instructions.strip()}\n\n" if self.instructions.strip() else "") + (
            f"## The change\n\n{exp.description}\n\n{exp.rationale}\n\n"
            f"## Measured\n\nval_bpb {exp.val_bpb} vs best {best.val_bpb}; parameters {exp.num_params} vs "
            f"{best.num_params}; {exp.lines_added} lines added, {exp.lines_removed} removed.\n\n"
            f"## Diff\n\n```diff\n{diff[:20000]}\n```\n\n{ANSWER}\n")
        try:
            reply = self.client.complete(Prompt(SYSTEM, user)).text
        except Exception as e:  # noqa: BLE001 -- a failed review must not stop the night
            return Review(True, f"review failed ({type(e).__name__}); kept on the measurement", self.name)
        return parse_answer(reply, self.name)


def parse_answer(reply: str, name: str) -> Review:
    """``APPROVE: why`` / ``VETO: why`` from the first line that says either; unreadable approves."""
    for line in reply.splitlines():
        match = re.match(r"^[\s*`#>-]*(APPROVE|VETO)\b[*`\s]*:?\s*(.*)$", line, re.IGNORECASE)
        if match:
            return Review(match.group(1).upper() == "APPROVE", match.group(2).strip(" *`") or "(no reason)", name)
    return Review(True, f"unreadable review kept on the measurement: {reply.strip()[:120]!r}", name)
