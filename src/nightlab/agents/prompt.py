"""The prompt an LLM proposer is shown, built from a ``Context``.

It has a short system part (the role) and a user part in sections: the research program,
where things stand (best val_bpb and the noise level), the history, the notes, the last error,
the current best files, and at the end how to answer (``instructions``: the reply format of
the API agents, or the edit-in-place instructions of the CLI agents).
"""

from __future__ import annotations

from dataclasses import dataclass

from nightlab.night.proposals import Context

SYSTEM = (
    "You are a researcher in nightlab, a lab that pretrains a small language model for a fixed "
    "wall-clock budget and measures validation bits per byte (val_bpb, lower is better) with a "
    "trusted evaluator you cannot change. Each turn you propose one experiment: one focused change "
    "to the files you may edit. The lab trains it, measures it, and keeps it only if it beats the "
    "best by more than the noise. You never run the training yourself."
)


@dataclass(frozen=True)
class Prompt:
    system: str
    user: str

    def text(self) -> str:
        """Both parts as one document (for CLI agents that take a single prompt)."""
        return f"{self.system}\n\n{self.user}"


def build_prompt(context: Context, instructions: str) -> Prompt:
    sections = [
        ("Research program", context.program.strip() or "(no program.md)"),
        ("Where things stand", _standing(context)),
        ("History of experiments", context.history.strip() or "(no experiments yet)"),
    ]
    if context.notes.strip():
        sections.append(("Notes board", context.notes.strip()))
    if context.claim.strip():
        sections.append(("Your agenda item", f"{context.claim.strip()}\n\nWork on this item; no one else is."))
    if context.last_error.strip():
        title = "Your last proposal repeated an experiment" if context.repeats else "The last experiment failed"
        sections.append((title, _fenced(context.last_error.strip(), "text")))
    for name in context.allowed_files:
        source = context.best_source.get(name)
        if source is not None:
            sections.append((f"Current best {name}", _fenced(source, "python" if name.endswith(".py") else "")))
    sections.append(("Your answer", instructions.strip()))
    user = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections) + "\n"
    return Prompt(SYSTEM, user)


def _standing(context: Context) -> str:
    lines = [f"Files you may edit: {', '.join(context.allowed_files)}. Edits to anything else are rejected.",
             "A change that repeats an experiment of the history, measured or in flight, is refused untrained."]
    if context.best_val_bpb is not None:
        lines.append(f"Best val_bpb so far: {context.best_val_bpb:.6f}.")
    if context.noise is not None:
        lines.append(
            f"Run-to-run noise: about ±{context.noise:.6f} val_bpb from the seed alone. A change is kept only "
            "when it beats the best by more than that; at equal val_bpb, simpler code wins."
        )
    return "\n".join(lines)


def _fenced(text: str, language: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"
