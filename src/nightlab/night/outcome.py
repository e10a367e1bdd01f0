"""What a night ended with: the baseline, the best, and the gain in val_bpb and in noise widths."""

from __future__ import annotations

from dataclasses import dataclass

from nightlab.night.store import FINISHED, Experiment, Store, last_judged


@dataclass(frozen=True)
class Outcome:
    experiments: int  # finished experiments after the baseline
    keeps: int  # of them kept
    disturbed: int  # trials set aside as disturbed and re-run
    budget: str  # "300s" or "2000000 tokens"
    baseline: Experiment | None
    best: Experiment | None  # the last keep (the baseline when nothing was kept)
    noise: float | None  # the noise width of the last verdict

    @property
    def gain(self) -> float | None:
        """How much lower the best's val_bpb is than the baseline's (positive: better)."""
        if self.baseline is None or self.best is None or self.baseline.val_bpb is None or self.best.val_bpb is None:
            return None
        return self.baseline.val_bpb - self.best.val_bpb

    @property
    def gain_sigmas(self) -> float | None:
        """The gain in noise widths (the policy's run-to-run standard deviation)."""
        return self.gain / self.noise if self.gain is not None and self.noise else None

    def text(self) -> str:
        """One paragraph for the end of a run: what was kept, and how much better the best is."""
        if self.baseline is None or self.baseline.val_bpb is None:
            return "no baseline was measured"
        kept = f"{self.keeps} of {self.experiments} experiment(s) kept"
        disturbed = f", {self.disturbed} disturbed trial(s) re-run" if self.disturbed else ""
        budget = f", budget {self.budget}" if self.budget else ""
        if self.best is None or self.best.id == self.baseline.id or self.gain is None:
            return f"{kept}{budget}{disturbed}: the best is still the baseline (val_bpb {self.baseline.val_bpb:.6f})"
        sigmas = f" = {self.gain_sigmas:.1f} noise widths (noise {self.noise:.6f})" if self.gain_sigmas else ""
        return (f"{kept}{budget}{disturbed}. Best #{self.best.id} ({self.best.description}): val_bpb "
                f"{self.best.val_bpb:.6f}, {self.gain:.6f} better than the baseline's "
                f"{self.baseline.val_bpb:.6f}{sigmas}")


def outcome(store: Store, run_tag: str) -> Outcome:
    """The outcome of run ``run_tag`` as the store holds it now."""
    rows = store.experiments(run_tag)
    finished = [e for e in rows if e.status in FINISHED]
    baseline = next((e for e in rows if e.kind == "baseline" and e.status == "keep"), None)
    experiments = [e for e in finished if e.kind != "baseline"]
    keeps = [e for e in experiments if e.status == "keep"]
    noise = next((e.noise for e in sorted(finished, key=lambda e: e.finished_at or "", reverse=True)
                  if e.noise is not None), None)
    return Outcome(experiments=len(experiments), keeps=len(keeps), disturbed=sum(e.disturbed for e in rows),
                   budget=next((e.budget for e in reversed(rows) if e.budget), ""), baseline=baseline,
                   best=last_judged(keeps) if keeps else baseline, noise=noise)
