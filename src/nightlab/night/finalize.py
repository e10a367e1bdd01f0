"""``nightlab finalize``: which of the night's keeps still carry the best, measured by leaving each out.

A night stacks k keeps, each judged against the best of its moment. Some stop mattering once later
keeps are in (two changes that fix the same thing), and some were lucky. Leave-one-out ablation
measures the best with each keep reverted alone (``git`` applies the inverse of that keep's diff on
the best), with the configured seeds (``lab.seed`` and the ``run.confirm_runs`` after it), on val and
on the sealed holdout. A keep's contribution is what reverting it costs, in noise widths; a keep
whose reversal costs less than one noise width on val no longer contributes. With ``prune``, branch
``nightlab/<tag>-final`` holds the base commit with only the contributing keeps re-applied in
order, and is measured again.

Every trial goes through ``nightlab.night.checks``: recorded as it starts and as it ends, so a
``kill -9`` then the same command loses nothing and runs no finished trial twice; a trial that
failed (crash, timeout, invalid) is run once more, and again by the next ``nightlab finalize``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nightlab.night import checks, policy
from nightlab.night.state import Lab
from nightlab.night.store import Experiment, last_judged

ABLATION, PRUNED = "ablation", "pruned"
REVERT_WORKTREE = "finalize"
BEST = 0  # keep_id of the best measured as it is


class FinalizeError(RuntimeError):
    """Nothing to finalize: the message is one line that says why and what to do."""


@dataclass(frozen=True)
class Contribution:
    """What reverting one keep from the best costs (positive: the keep helps), in bpb and noise widths."""

    keep: Experiment
    val: float | None  # mean val_bpb without the keep minus the best's; None: not measured (see ``note``)
    holdout: float | None
    noise: float
    note: str = ""  # why it was not measured (its revert conflicts with later keeps), or ""

    @property
    def val_widths(self) -> float | None:
        return None if self.val is None else self.val / self.noise

    @property
    def holdout_widths(self) -> float | None:
        return None if self.holdout is None else self.holdout / self.noise

    @property
    def contributes(self) -> bool:
        """Reverting it costs at least one noise width on val (a keep that cannot be reverted alone stays)."""
        return self.val is None or self.val >= self.noise


@dataclass(frozen=True)
class Finale:
    best: Experiment
    contributions: list[Contribution]
    noise: float
    seeds: list[int]
    pruned_branch: str = ""
    pruned_commit: str = ""
    pruned_val: float | None = None
    pruned_holdout: float | None = None
    best_val: float | None = None
    best_holdout: float | None = None


def chain(lab: Lab) -> list[Experiment]:
    """The run's keeps after the baseline, in the order they became the best."""
    return [e for e in lab.store.select(lab.run.tag, statuses=("keep",)) if e.kind != "baseline" and e.commit_sha]


def seeds(lab: Lab) -> list[int]:
    return [lab.config.lab.seed + k for k in range(1 + lab.config.run.confirm_runs)]


def finalize(lab: Lab, *, prune: bool = False) -> Finale:
    """Ablate each keep of the run from its best (and with ``prune`` write and measure the pruned chain)."""
    keeps = chain(lab)
    if not keeps:
        raise FinalizeError(f"run {lab.run.tag} has no keeps to finalize (only its baseline); "
                            "run more experiments first")
    best, noise, used = last_judged(keeps), lab.noise(), seeds(lab)
    total = (len(keeps) + 1 + prune) * len(used)  # the best, without each keep, the pruned chain
    step = [0]

    def label(what: str) -> str:
        step[0] += 1
        return f"finalize [{step[0]}/{total}] {what}"

    best_vals = _measure(lab, best, BEST, best.commit_sha or "", used, label, f"#{best.id} the best")
    contributions = []
    for keep in keeps:
        commit = _without(lab, best, keep)
        if commit is None:
            step[0] += len(used)
            contributions.append(Contribution(keep, None, None, noise,
                                              note=f"its change does not revert alone on the best #{best.id}"))
            lab.say(f"finalize: #{keep.id} cannot be reverted alone from #{best.id}: kept as it is")
            continue
        values = _measure(lab, best, keep.id, commit, used, label, f"#{best.id} without #{keep.id}")
        contributions.append(Contribution(keep, _diff(values[0], best_vals[0]), _diff(values[1], best_vals[1]), noise))
    finale = Finale(best, contributions, noise, used, best_val=_mean(best_vals[0]), best_holdout=_mean(best_vals[1]))
    if prune:
        finale = _prune(lab, finale, label)
    return finale


def _measure(lab: Lab, best: Experiment, keep_id: int, commit: str, used: list[int], label, what: str
             ) -> tuple[list[float], list[float]]:
    """val_bpb and holdout scores of ``commit`` over the seeds (the failed trials left out)."""
    vals, held = [], []
    for seed in used:
        check = checks.run(lab, ABLATION, best.id, keep_id, commit, seed, label=label(what), retry_failed=True)
        if check.status != "ok":  # once more: a failed trial leaves this keep's contribution unknown
            check = checks.run(lab, ABLATION, best.id, keep_id, commit, seed, label=f"{what}, again",
                               retry_failed=True)
        if check.val_bpb is not None:
            vals.append(check.val_bpb)
        if check.holdout_bpb is not None:
            held.append(check.holdout_bpb)
    return vals, held


def _without(lab: Lab, best: Experiment, keep: Experiment) -> str | None:
    """The best with ``keep``'s change reverted, committed (found again after a kill); None when the
    reversal does not apply on the best."""
    recorded = lab.store.checks(lab.run.tag, ABLATION, best.id, keep_id=keep.id)
    if recorded:
        return recorded[0].commit_sha
    assert keep.commit_sha and keep.parent_commit and best.commit_sha
    if keep.id == best.id and keep.parent_commit:
        return keep.parent_commit
    work = lab.git.worktree(lab.dir, REVERT_WORKTREE, best.commit_sha)
    if not lab.git.reapply(work, keep.commit_sha, keep.parent_commit, best.commit_sha):
        return None
    commit = lab.git.commit_all(work, f"finalize: #{best.id} without #{keep.id} ({keep.description})\n\n"
                                      f"nightlab-run: {lab.run.tag}\n")
    lab.git.set_ref(lab.dir, f"refs/nightlab/final/{lab.run.tag}/without-{keep.id}", commit)
    return commit


def _prune(lab: Lab, finale: Finale, label) -> Finale:
    """Branch ``nightlab/<tag>-final``: the base commit with the contributing keeps re-applied in order,
    measured again (the best itself when every keep contributes)."""
    branch = lab.git.branch_name(f"{lab.run.tag}-final")
    keep_ids = [c.keep.id for c in finale.contributions if c.contributes]
    if len(keep_ids) == len(finale.contributions):
        commit = finale.best.commit_sha or ""
        lab.say(f"finalize: every keep contributes; {branch} is the best #{finale.best.id}")
    else:
        done = lab.store.checks(lab.run.tag, PRUNED, finale.best.id)
        commit = done[0].commit_sha if done else _replay(lab, [c.keep for c in finale.contributions if c.contributes])
    lab.git.set_branch(lab.dir, branch, commit)
    if commit == finale.best.commit_sha:
        vals, held = [finale.best_val] if finale.best_val is not None else [], (
            [finale.best_holdout] if finale.best_holdout is not None else [])
    else:
        vals, held = [], []
        for seed in finale.seeds:
            check = checks.run(lab, PRUNED, finale.best.id, BEST, commit, seed, label=label(f"{branch}"),
                               retry_failed=True)
            vals += [check.val_bpb] if check.val_bpb is not None else []
            held += [check.holdout_bpb] if check.holdout_bpb is not None else []
    return Finale(**{**finale.__dict__, "pruned_branch": branch, "pruned_commit": commit,
                     "pruned_val": _mean(vals), "pruned_holdout": _mean(held)})


def _replay(lab: Lab, keeps: list[Experiment]) -> str:
    """The base commit with each of ``keeps``' changes applied in order, one commit each."""
    commit = lab.run.base_commit
    work = lab.git.worktree(lab.dir, REVERT_WORKTREE, commit)
    for keep in keeps:
        assert keep.commit_sha and keep.parent_commit
        if not lab.git.reapply(work, keep.parent_commit, keep.commit_sha, commit):
            lab.say(f"finalize: #{keep.id} does not apply without the keeps left out; left out too")
            continue
        commit = lab.git.commit_all(work, f"{keep.description}\n\nre-applied from #{keep.id} by nightlab finalize\n\n"
                                          f"nightlab-run: {lab.run.tag}\n")
    return commit


def _mean(values: list[float]) -> float | None:
    return policy.mean(values) if values else None


def _diff(without: list[float], best: list[float]) -> float | None:
    return _mean(without) - _mean(best) if without and best else None  # type: ignore[operator]


def render(finale: Finale) -> str:
    """The table ``nightlab finalize`` prints."""
    def widths(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.1f}"

    lines = [f"best #{finale.best.id}: val_bpb {_fmt(finale.best_val)}, holdout {_fmt(finale.best_holdout)} over "
             f"seeds {', '.join(map(str, finale.seeds))}; noise width {finale.noise:.6f}",
             "keep   reverting it costs (noise widths)   verdict        description",
             "         val    holdout"]
    for c in finale.contributions:
        verdict = "contributes" if c.contributes else "no longer contributes"
        lines.append(f"#{c.keep.id:<5} {widths(c.val_widths):>6} {widths(c.holdout_widths):>8}   {verdict:<22} "
                     f"{' '.join(c.keep.description.split())[:60]}" + (f" ({c.note})" if c.note else ""))
    if finale.pruned_branch:
        lines.append(f"{finale.pruned_branch} at {finale.pruned_commit[:10]}: val_bpb {_fmt(finale.pruned_val)}, "
                     f"holdout {_fmt(finale.pruned_holdout)}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"
