"""Simulation: the whole research loop at thousands of experiments a minute on a CPU.

Three stand-ins replace what is slow, and nothing else is faked:

- ``Surface`` and ``SimulatedTrainer``: a trainer with a known response surface. val_bpb is a
  smooth function of train.py's numeric UPPER_CASE constants (a weighted sum of squared
  log-distances from hidden optima), plus seed noise of about 0.001 (the size measured on real
  runs), plus a fixed random effect for any edit that is not a constant. Constants far from their
  optimum crash now and then (out of memory, NaN). The same code and seed always give the same
  value, as deterministic training would. It plugs in at the runner seam (``Lab.trainer``).
- ``MemoryGit``: the functions of ``nightlab.night.git`` that the loop uses, over commits held
  in memory (worktrees stay real folders, so proposers edit files as they would in a lab).
- ``SimulatedResearcher``: a proposer that edits constants as a cautious researcher would: one
  constant at a time (the claimed agenda item's when it names one), a step up or down, learning
  which directions failed. It stands in for an LLM.

The store, policy, scheduler, org (notes board, claims, lead, reviewer) and proposers such as
``search`` are the real ones. ``run`` simulates one org or policy; ``nightlab simulate`` compares
two.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from nightlab.agents import lead as lead_mod
from nightlab.agents import org as org_mod
from nightlab.agents import reviewer as reviewer_mod
from nightlab.agents.search import SearchProposer
from nightlab.config import Config, load
from nightlab.night.notes import Board
from nightlab.night.scheduler import Researcher, Scheduler, Worker
from nightlab.night.state import Lab, start_run
from nightlab.night.store import Store
from nightlab.paths import state_dir
from nightlab.night import git as real_git
from nightlab.night.proposals import Context, Proposal, ProposalError
from nightlab.agents.constants import find_constants, format_value, write_constants
from nightlab.agents.search import dimension_for
from nightlab.trial.runner import TrialResult

TARGET = "train.py"
SEED_NOISE = 0.001  # val_bpb standard deviation from the seed alone, as measured on real runs


# -- the response surface ---------------------------------------------------------------------


@dataclass(frozen=True)
class Surface:
    """A known val_bpb landscape over train.py's constants (lower is better)."""

    optima: dict[str, float]  # constant key -> hidden best value
    weights: dict[str, float]  # constant key -> val_bpb cost per squared unit of log-distance
    floor: float = 0.95  # val_bpb with every constant at its optimum
    noise: float = SEED_NOISE
    crash_distance: float = math.log(4.0)  # beyond this log-distance a trial may crash
    crash_rate: float = 0.5  # how often, beyond it
    edit_effect: float = 0.003  # spread of the fixed effect of an edit that is not a constant
    baseline_text: str = ""  # the baseline source with constant values masked (no effect when equal)

    @classmethod
    def flat(cls, source: str, **kw: Any) -> "Surface":
        """A surface on which no change does anything: every constant and every edit leaves the true
        val_bpb at ``floor``, so whatever a night keeps, it kept by luck (seed noise)."""
        tunable = [c for c in find_constants(source) if dimension_for(c) is not None and c.value > 0]
        return cls({c.key: float(c.value) for c in tunable}, {c.key: 0.0 for c in tunable}, edit_effect=0.0,
                   crash_rate=0.0, baseline_text=_masked(source), **kw)

    @classmethod
    def around(cls, source: str, seed: int = 0, sensitive: int = 8, **kw: Any) -> "Surface":
        """A surface for ``source``: ``sensitive`` constants matter (optima up to ~2x away), the rest barely."""
        rng = random.Random(seed)
        tunable = [c for c in find_constants(source) if dimension_for(c) is not None and c.value > 0]
        if not tunable:
            raise ValueError("the source has no positive numeric UPPER_CASE constant to simulate")
        chosen = {c.key for c in rng.sample(tunable, min(sensitive, len(tunable)))}
        optima, weights = {}, {}
        for c in tunable:
            if c.key in chosen:
                optima[c.key] = c.value * math.exp(rng.gauss(0.0, 0.45))
                weights[c.key] = rng.uniform(0.004, 0.03)
            else:
                optima[c.key] = float(c.value)
                weights[c.key] = 0.0005
        return cls(optima, weights, baseline_text=_masked(source), **kw)

    def expected(self, source: str) -> float:
        """The noiseless val_bpb of ``source`` (what infinitely many seeds would average to)."""
        return self.shape(source)[0]

    def shape(self, source: str) -> tuple[float, float, str]:
        """(expected val_bpb, largest log-distance of a sensitive constant, its key)."""
        values = {c.key: c.value for c in find_constants(source)}
        total, worst, worst_key = self.floor, 0.0, ""
        for key, optimum in self.optima.items():
            value = values.get(key)
            if value is None or value <= 0:
                total += self.weights[key] * 4.0  # removed or nonsensical: as bad as far off
                continue
            distance = math.log(value / optimum)
            total += self.weights[key] * distance**2
            if self.weights[key] > 0.001 and abs(distance) > worst:
                worst, worst_key = abs(distance), key
        masked = _masked(source)
        if masked != self.baseline_text:
            total += self.edit_effect * (_unit(masked, "edit") + 0.3)  # most edits hurt a little
        return total, worst, worst_key

    def measure(self, source: str, seed: int, shape: tuple[float, float, str] | None = None,
                ) -> tuple[str, float | None, str]:
        """One trial: (status, val_bpb, reason), the same for the same source and seed (``shape``:
        ``self.shape(source)`` when already known)."""
        expected, worst, key = shape or self.shape(source)
        rng = random.Random(hashlib.sha256(f"{seed}\0{source}".encode()).digest())
        if worst > self.crash_distance and rng.random() < self.crash_rate:
            if "LR" in key or "MOMENTUM" in key:
                return "crash", None, f"NaN: training diverged ({key} far off)"
            return "crash", None, f"exit code 1: torch.OutOfMemoryError: CUDA out of memory ({key} far off)"
        return "ok", expected + rng.gauss(0.0, self.noise), ""

    def holdout(self, source: str, seed: int) -> float:
        """The holdout score of a trained ``source``: its true value plus noise independent of val's."""
        rng = random.Random(hashlib.sha256(f"holdout\0{seed}\0{source}".encode()).digest())
        return self.expected(source) + rng.gauss(0.0, self.noise)


def _masked(source: str) -> str:
    """``source`` with every numeric constant's value blanked: what is left is the code's shape."""
    constants = find_constants(source)
    raw = source.encode()
    for c in sorted(constants, key=lambda c: c.start, reverse=True):
        raw = raw[: c.start] + b"_" + raw[c.end :]
    return raw.decode()


def _unit(text: str, salt: str) -> float:
    """A fixed standard-normal draw for ``text``."""
    return random.Random(hashlib.sha256(f"{salt}\0{text}".encode()).digest()).gauss(0.0, 1.0)


class SimulatedTrainer:
    """A trainer with ``runner.run_trial``'s signature that measures ``train.py`` on a ``Surface``.

    ``seconds`` of simulated training are slept (0: return at once). Results are cached by source,
    since parsing train.py is the only real work.
    """

    def __init__(self, surface: Surface, seconds: float = 0.0) -> None:
        self.surface, self.seconds = surface, seconds
        self.calls = 0
        self._shapes: dict[str, tuple[float, float, str, int]] = {}  # source -> shape and model size

    def __call__(self, workdir: Path, run_dir: Path, config: Config, seed: int, *, data_dir: Path,
                 on_progress: Callable[[str], None] | None = None, on_stage: Callable[[str, int], None] | None = None,
                 env: dict[str, str] | None = None) -> TrialResult:
        self.calls += 1
        if self.seconds:
            time.sleep(self.seconds)
        try:
            source = (Path(workdir) / TARGET).read_text()
            if source not in self._shapes:
                self._shapes[source] = (*self.surface.shape(source), _params(source))
            *shape, params = self._shapes[source]
            status, val_bpb, reason = self.surface.measure(source, seed, tuple(shape))  # type: ignore[arg-type]
        except (OSError, SyntaxError) as e:
            return TrialResult("crash", reason=f"exit code 1: {type(e).__name__}: {e}", error=str(e))
        summary = {"training_seconds": config.lab.budget_s, "num_params": params, "total_tokens": 0}
        if on_progress:
            on_progress(f"simulated: {status} {val_bpb if val_bpb is not None else ''}")
        return TrialResult(status, val_bpb, reason, summary=summary, train_s=config.lab.budget_s,
                           total_s=config.lab.budget_s, error=reason, device="simulated")


    def holdout(self, workdir: Path, run_dir: Path, config: Config, seed: int) -> float | None:
        """``Lab.holdout``: the surface's holdout score of the train.py in ``workdir``."""
        try:
            return self.surface.holdout((Path(workdir) / TARGET).read_text(), seed)
        except OSError:
            return None


def _params(source: str) -> int:
    """A model size that grows as train.py's DEPTH and width would make it (0 when they are absent)."""
    values = {c.key: c.value for c in find_constants(source)}
    depth, aspect = values.get("DEPTH"), values.get("ASPECT_RATIO")
    if not depth or not aspect:
        return 0
    return int(12 * depth * (depth * aspect) ** 2)


# -- code history in memory -------------------------------------------------------------------


@dataclass
class _Commit:
    files: dict[str, str]
    parent: str | None
    message: str


class MemoryGit:
    """The loop's git functions over in-memory commits; worktrees are real folders.

    Methods take the same arguments as ``nightlab.night.git``'s functions, so ``Lab.git`` can
    be either. Commits hold the lab's tracked text files; ids are hex digests like git's.
    """

    branch_name = staticmethod(real_git.branch_name)
    experiment_ref = staticmethod(real_git.experiment_ref)
    disallowed = staticmethod(real_git.disallowed)
    GitError = real_git.GitError

    def __init__(self, lab_dir: Path, files: Sequence[str] = (TARGET, "program.md")) -> None:
        self.lab_dir = Path(lab_dir)
        initial = {name: (self.lab_dir / name).read_text() for name in files if (self.lab_dir / name).exists()}
        self.commits: dict[str, _Commit] = {}
        self.refs: dict[str, str] = {}
        self.heads: dict[Path, str] = {}  # worktree -> the commit it has checked out
        self.head = self._add(_Commit(initial, None, "initial lab"))

    def _add(self, commit: _Commit) -> str:
        body = f"{commit.parent}\0{len(self.commits)}\0{commit.message}\0" + "\0".join(
            f"{k}\0{v}" for k, v in sorted(commit.files.items()))
        sha = hashlib.sha1(body.encode()).hexdigest()
        self.commits[sha] = commit
        return sha

    def _files(self, commit: str) -> dict[str, str]:
        try:
            return self.commits[commit].files
        except KeyError:
            raise real_git.GitError(f"no commit {commit} in the simulated history") from None

    # refs
    def resolve(self, repo: Path, ref: str) -> str | None:
        if ref == "HEAD":
            return self.head
        if ref in self.commits:
            return ref
        return self.refs.get(ref)

    def current_branch(self, repo: Path) -> str:
        return ""

    def set_ref(self, repo: Path, ref: str, commit: str) -> None:
        self._files(commit)
        self.refs[ref] = commit

    def set_branch(self, repo: Path, branch: str, commit: str) -> None:
        self.set_ref(repo, f"refs/heads/{branch}", commit)

    # worktrees
    def worktree(self, repo: Path, name: str, commit: str) -> Path:
        path = state_dir(repo) / "worktrees" / name
        self.worktree_reset(path, commit)
        return path

    def worktree_reset(self, work: Path, commit: str) -> None:
        files = self._files(commit)
        work.mkdir(parents=True, exist_ok=True)
        for name, text in self._read_tree(work).items():
            if name not in files:
                (work / name).unlink()
        for name, text in files.items():
            path = work / name
            if not path.exists() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        self.heads[Path(work)] = commit

    def changed_files(self, work: Path) -> list[str]:
        base, now_ = self._files(self.heads[Path(work)]), self._read_tree(work)
        return sorted(name for name in set(base) | set(now_) if base.get(name) != now_.get(name))

    def commit_all(self, work: Path, message: str) -> str:
        sha = self._add(_Commit(self._read_tree(work), self.heads[Path(work)], message))
        self.heads[Path(work)] = sha
        return sha

    def move_changes(self, work: Path, onto: str) -> bool:
        base, mine, theirs = self._files(self.heads[Path(work)]), self._read_tree(work), self._files(onto)
        merged = dict(theirs)
        for name in set(base) | set(mine):
            if base.get(name) == mine.get(name):
                continue
            result = merge3(base.get(name, ""), mine.get(name, ""), theirs.get(name, ""))
            if result is None:
                self.worktree_reset(work, onto)
                return False
            merged[name] = result
        self.worktree_reset(work, onto)
        for name, text in merged.items():
            (work / name).write_text(text)
        return True

    def reapply(self, work: Path, parent: str, commit: str, onto: str) -> bool:
        self.worktree_reset(work, commit)
        self.heads[Path(work)] = parent
        return self.move_changes(work, onto)

    # reading commits
    def read_file(self, repo: Path, commit: str, path: str) -> str | None:
        text = self.commits[commit].files.get(path) if commit in self.commits else None
        return text.rstrip("\n") if text is not None else None

    def code_lines(self, repo: Path, commit: str, files: tuple[str, ...]) -> int:
        return sum(sum(1 for line in (self.read_file(repo, commit, f) or "").splitlines() if line.strip())
                   for f in files)

    def diff_stats(self, repo: Path, parent: str, commit: str) -> real_git.DiffStats:
        a, b = self._files(parent), self._files(commit)
        changed, added, removed = [], 0, 0
        for name in sorted(set(a) | set(b)):
            if a.get(name) == b.get(name):
                continue
            changed.append(name)
            matcher = difflib.SequenceMatcher(None, a.get(name, "").splitlines(), b.get(name, "").splitlines(),
                                              autojunk=False)
            for op, i1, i2, j1, j2 in matcher.get_opcodes():
                if op != "equal":
                    removed += i2 - i1
                    added += j2 - j1
        return real_git.DiffStats(tuple(changed), added, removed)

    def diff(self, repo: Path, parent: str, commit: str) -> str:
        a, b = self._files(parent), self._files(commit)
        out: list[str] = []
        for name in sorted(set(a) | set(b)):
            out += difflib.unified_diff(a.get(name, "").splitlines(keepends=True),
                                        b.get(name, "").splitlines(keepends=True), f"a/{name}", f"b/{name}")
        return "".join(out)

    @staticmethod
    def _read_tree(work: Path) -> dict[str, str]:
        if not work.is_dir():
            return {}
        return {str(p.relative_to(work)): p.read_text() for p in work.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}


def merge3(base: str, mine: str, theirs: str) -> str | None:
    """Three-way merge of line edits; None when the two sides change the same or adjacent lines
    differently (where ``git merge`` would stop with a conflict too)."""
    if mine == theirs or theirs == base:
        return mine
    if mine == base:
        return theirs
    b = base.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (base start, base end, replacement lines)
    for side in (mine.splitlines(keepends=True), theirs.splitlines(keepends=True)):
        matcher = difflib.SequenceMatcher(None, b, side, autojunk=False)
        edits += [(i1, i2, side[j1:j2]) for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal"]
    edits.sort(key=lambda e: (e[0], e[1]))
    out: list[str] = []
    at, last = 0, None
    for edit in edits:
        if edit == last:
            continue  # both sides made the same edit
        if last is not None and edit[0] <= last[1]:
            return None
        out += b[at : edit[0]] + edit[2]
        at, last = edit[1], edit
    return "".join(out + b[at:])


# -- a researcher that stands in for an LLM ---------------------------------------------------


@dataclass
class SimulatedResearcher:
    """Nudges one constant per proposal, up or down, and learns which moves failed.

    With a claimed agenda item that names a constant (``MATRIX_LR: try lower``) it works on that
    constant, in the direction the item says when it says one. Otherwise it picks a constant at
    random, avoiding moves that were discarded recently.
    """

    name: str = "simulated"
    seed: int = 0
    step: float = 0.35  # typical log-step of a float constant
    rng: random.Random = field(init=False)
    _parsed: dict[str, list[Any]] = field(default_factory=dict)  # source -> its tunable constants
    failed_moves: dict[tuple[str, int], int] = field(default_factory=dict)
    _moves: dict[str, tuple[str, int]] = field(default_factory=dict)  # description -> (key, direction)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def propose(self, context: Context, worktree: Path) -> Proposal:
        path = Path(worktree) / TARGET
        source = path.read_text()
        if source not in self._parsed:
            self._parsed = {source: [c for c in find_constants(source) if dimension_for(c) is not None]}
        constants = self._parsed[source]
        if not constants:
            raise ProposalError(f"no constant left to tune in {TARGET}")
        key, direction = self._choose([c.key for c in constants], context.claim)
        constant = next(c for c in constants if c.key == key)
        value = self._moved(constant.value, direction)
        if value == constant.value:
            value = self._moved(constant.value, -direction)
            direction = -direction
        path.write_text(write_constants(source, {key: value}))
        description = f"sim: {key} {constant.text}→{format_value(constant, value)}"
        self._moves[description] = (key, direction)
        return Proposal(description, rationale=f"try {key} {'higher' if direction > 0 else 'lower'}")

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        move = self._moves.pop(proposal.description, None)
        if move is None:
            return
        if status == "keep":
            self.failed_moves.pop(move, None)
            self.failed_moves.pop((move[0], -move[1]), None)
        else:
            self.failed_moves[move] = self.failed_moves.get(move, 0) + 1

    def _choose(self, keys: list[str], claim: str) -> tuple[str, int]:
        words = claim.replace(":", " ").replace(",", " ").split()
        named = [k for k in keys if k in words]
        if named:
            key = named[0]
            said = -1 if "lower" in claim else 1 if "higher" in claim else 0
            if said:
                return key, said
        else:
            key = self.rng.choice(keys)
        up, down = self.failed_moves.get((key, 1), 0), self.failed_moves.get((key, -1), 0)
        weights = [1.0 / (1 + up), 1.0 / (1 + down)]
        return key, self.rng.choices([1, -1], weights)[0]

    def _moved(self, value: float, direction: int) -> float:
        if isinstance(value, int):
            if value > 16 and value & (value - 1) == 0:
                return value * 2 if direction > 0 else max(1, value // 2)
            return max(1, value + direction * max(1, round(value * 0.25)))
        factor = math.exp(direction * self.step * self.rng.uniform(0.4, 1.2))
        new = value * factor
        return min(new, 1 - (1 - value) / 2) if value < 1 and new >= 1 else float(f"{new:.3g}")


# -- setting up a simulated lab ---------------------------------------------------------------


def make_lab(path: Path, org: Path | None = None, train_py: str | None = None) -> Path:
    """A simulated lab folder: the template train.py and program.md, the org's role files, notes."""
    template = files("nightlab.template")
    path.mkdir(parents=True, exist_ok=True)
    (path / TARGET).write_text(train_py if train_py is not None else template.joinpath("train.py").read_text())
    (path / "program.md").write_text(template.joinpath("program.md").read_text())
    if org is not None:
        shutil.copytree(org, path / "org", dirs_exist_ok=True)
    (path / "notes").mkdir(exist_ok=True)
    for name, text in (("agenda.md", "# Agenda\n"), ("findings.md", "# Findings\n")):
        if not (path / "notes" / name).exists():
            (path / "notes" / name).write_text(text)
    return path


# -- one simulated night ----------------------------------------------------------------------


@dataclass
class SimResult:
    """One simulated night: its rows, its best-so-far curve and what the scheduler did."""

    label: str
    rows: list[Any]  # store.Experiment, every row of the run
    curve: list[tuple[int, float, float]]  # (experiments finished, best val_bpb as measured, its true value)
    tally: Any  # scheduler.Tally
    baseline_true: float
    optimum: float  # the surface's floor: the best any train.py could reach
    trainer_calls: int

    @property
    def best_true(self) -> float:
        return self.curve[-1][2] if self.curve else self.baseline_true


def run(label: str, lab_dir: Path, *, org_dir: Path | None = None, overrides: Sequence[str] = (),
        experiments: int = 200, workers: int = 1, seed: int = 0, surface_seed: int = 0, sensitive: int = 8,
        seconds: float = 0.0, flat: bool = False, say: Callable[[str], None] = lambda line: None) -> SimResult:
    """Simulate a night of ``experiments`` in a fresh lab at ``lab_dir`` with the org in ``org_dir``
    (None: program.md alone) on ``workers`` simulated GPUs, with the real store, policy, scheduler
    and org. LLM backends are played by ``SimulatedResearcher`` and the rules reviewer/stats lead.
    ``flat``: a surface on which every change is pure noise (``Surface.flat``)."""
    make_lab(lab_dir, org_dir)
    config = load(lab_dir, [*overrides, f"lab.seed={seed}"])
    org = org_mod.load(lab_dir, config)
    source = (lab_dir / TARGET).read_text()
    surface = Surface.flat(source) if flat else Surface.around(source, seed=surface_seed, sensitive=sensitive)
    trainer = SimulatedTrainer(surface, seconds)
    vcs = MemoryGit(lab_dir)
    store = Store.open(lab_dir)
    run_ = start_run(lab_dir, store, config, org.describe(), label, False, vcs=vcs)
    lab = Lab(lab_dir, config, lab_dir, store, run_, say=say, trainer=trainer, git=vcs, holdout=trainer.holdout)
    if org.reviewer is not None:
        lab.reviewer = reviewer_mod.RulesReviewer(org.reviewer.name)
    program = (lab_dir / "program.md").read_text()
    researchers = []
    for role in org.researchers:
        for k, name in enumerate(role.instances()):
            proposer = _proposer(role.backend, name, config, seed * 1000 + k + len(researchers))
            researchers.append(Researcher(name, proposer, org_mod.brief(role, program), role.edits))
    lead = lead_mod.StatsLead(org.lead.name, org.lead.every) if org.lead is not None else None
    pool = [Worker(f"sim{k}", trainer) for k in range(workers)]
    scheduler = Scheduler(lab, researchers, pool, board=Board(lab_dir), lead=lead)
    scheduler.run(max_experiments=experiments)
    rows = store.experiments(run_.tag)
    store.close()
    baseline_true = surface.expected(vcs.read_file(lab_dir, run_.base_commit, TARGET) or "")
    return SimResult(label, rows, _curve(rows, surface, vcs, lab_dir), scheduler.tally, baseline_true,
                     surface.floor, trainer.calls)


def _proposer(backend: str, name: str, config: Config, seed: int) -> Any:
    if backend == "search":
        return SearchProposer(config.search, storage=None, seed=seed)  # in memory: a simulation keeps nothing
    return SimulatedResearcher(name=name, seed=seed)


def _curve(rows: list[Any], surface: Surface, vcs: MemoryGit, lab_dir: Path) -> list[tuple[int, float, float]]:
    """Best so far after each finished experiment, in the order verdicts came."""
    out: list[tuple[int, float, float]] = []
    n, best, true = 0, None, None
    for e in sorted((e for e in rows if e.finished), key=lambda e: (e.finished_at or "", e.id)):
        if e.kind == "baseline" or e.status == "keep":
            best = e.val_bpb
            true = surface.expected(vcs.read_file(lab_dir, e.commit_sha, TARGET) or "")
        if e.kind != "baseline" and best is not None:
            n += 1
            out.append((n, best, true))
    return out
