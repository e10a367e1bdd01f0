"""The ``search`` proposer: a search over the numeric UPPER_CASE constants of train.py. No LLM.

``search.mode = "local"`` (the default) moves one constant of the best at a time
(``nightlab.agents.local``). ``"global"`` is Optuna over all of them at once, described here.

The global search space is derived once, from the constants' values when the study starts, and stored
with the study (so a resumed run keeps the same space even after the best has moved):

- floats > 0: log-uniform in [v/4, 4v]; a value below 1 stays below 1 (momenta, shares), the
  upper bound being at most 1 - (1-v)/4; negative floats: uniform in [4v, v/4]; zero: not tuned
  (a log scale has no anchor there, and a zero is usually a switch);
- ints <= 16 (depths, small counts): every integer in [max(1, v//2), 2v];
- powers of two above 16 (and anything written ``2**k``): the exponent, in [k-2, k+2];
- other ints above 16: log-scale integers in [v/4, 4v]; ints <= 0 are not tuned.

The first trial is the baseline's values (enqueued), so the sampler knows where it started.
A trial whose edit would leave train.py equal to the current best is told the best's val_bpb
without running it. Outcomes that are not a number (crash, timeout, invalid, NaN) are told as
``FAIL_VALUE``, far worse than any real val_bpb, so the sampler learns to avoid that region.
The study lives in SQLite (``LAB/.nightlab/optuna.db``), so ``nightlab run --resume`` continues it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nightlab.config import SEARCH_MODES, ConfigError, SearchAgentConfig
from nightlab.night.proposals import Context, Proposal, ProposalError
from nightlab.agents.constants import Constant, find_constants, format_value, write_constants
from nightlab.agents.local import LocalSearch

TARGET = "train.py"
FAIL_VALUE = 100.0  # told for failed trials; val_bpb is around 1
SAMPLERS = ("tpe", "cmaes")
LOCAL_STATE = "search-local.json"  # the local search's statistics, beside the Optuna study
_MAX_SKIPS = 50  # trials told without running (equal to the best) before giving up


@dataclass(frozen=True)
class Dimension:
    """How one constant is searched. ``kind``: float | int | pow2 (sampled as the exponent)."""

    key: str
    kind: str
    low: float
    high: float
    log: bool
    baseline: float  # the value in the sampler's own units (the exponent for pow2)

    def distribution(self) -> Any:
        from optuna.distributions import FloatDistribution, IntDistribution  # deferred: optuna is heavy

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log)
        return IntDistribution(int(self.low), int(self.high), log=self.log)

    def value(self, sampled: float) -> int | float:
        """The constant's value for a sampled point (floats rounded to 3 significant digits)."""
        if self.kind == "float" and sampled == self.baseline:
            return self.baseline  # written exactly as it was, so the baseline is no edit
        if self.kind == "pow2":
            return 2 ** int(sampled)
        if self.kind == "int":
            return int(sampled)
        return float(f"{sampled:.3g}")


def dimension_for(constant: Constant) -> Dimension | None:
    """The search range of one constant, from its current value; None when it is not tuned."""
    v = constant.value
    if isinstance(v, float):
        if v > 0:
            high = 4 * v if v >= 1 else min(4 * v, 1 - (1 - v) / 4)
            return Dimension(constant.key, "float", v / 4, high, True, v)
        if v < 0:
            return Dimension(constant.key, "float", 4 * v, v / 4, False, v)
        return None
    if v <= 0:
        return None
    if v > 16 and (v & (v - 1) == 0 or constant.is_pow2_form):
        k = v.bit_length() - 1
        return Dimension(constant.key, "pow2", max(0, k - 2), k + 2, False, k)
    if v <= 16:
        return Dimension(constant.key, "int", max(1, v // 2), 2 * v, False, v)
    return Dimension(constant.key, "int", max(1, v // 4), 4 * v, True, v)


def search_space(source: str, only: tuple[str, ...] = ()) -> list[Dimension]:
    """The dimensions for ``source``'s constants, restricted to ``only`` when given."""
    constants = find_constants(source)
    if only:
        known = {c.key for c in constants}
        unknown = [k for k in only if k not in known]
        if unknown:
            raise ConfigError(
                f"search.constants names {', '.join(unknown)}, not a numeric constant of {TARGET}; "
                f"its constants: {', '.join(sorted(known))}"
            )
        constants = [c for c in constants if c.key in only]
    dims = [d for d in map(dimension_for, constants) if d is not None]
    if not dims:
        raise ConfigError(f"{TARGET} has no numeric UPPER_CASE constant to search ({', '.join(only) or 'all'})")
    return dims


def describe(constants: list[Constant], new: dict[str, int | float]) -> str:
    """``search: DEPTH 8→10, MATRIX_LR 0.04→0.03`` (the changed constants, as they are written)."""
    changes = [
        f"{c.key} {c.text}→{format_value(c, new[c.key])}" for c in constants if c.key in new and c.value != new[c.key]
    ]
    return "search: " + (", ".join(changes) if changes else "baseline values")


class SearchProposer:
    """Proposes new values for train.py's constants: local moves from the best, or an Optuna sampler (ask/tell)."""

    name = "search"

    def __init__(self, config: SearchAgentConfig, storage: Path | None = None, seed: int = 0) -> None:
        if config.sampler not in SAMPLERS:
            raise ConfigError(f"search.sampler = {config.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if config.mode not in SEARCH_MODES:
            raise ConfigError(f"search.mode = {config.mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        self.config = config
        self.storage = storage
        self.seed = seed
        self._study: Any = None
        self._space: list[Dimension] = []
        self._pending: list[tuple[int, Proposal]] = []
        self._unmeasured_best: list[int] = []  # trials that drew the best before it had a val_bpb
        self._lock = threading.Lock()  # the loop may prepare a proposal while it reports another
        self.local: LocalSearch | None = None
        if config.mode == "local":
            state = storage.with_name(LOCAL_STATE) if storage is not None else None
            self.local = LocalSearch(config.constants, state, seed)

    def propose(self, context: Context, worktree: Path) -> Proposal:
        path = Path(worktree) / TARGET
        try:
            source = path.read_text()
        except FileNotFoundError:
            raise ProposalError(f"the search agent tunes {TARGET}, which is missing from {worktree}") from None
        with self._lock:
            if self.local is not None:
                search_space(source, self.config.constants)  # a bad search.constants is named, as in global mode
                edited, proposal = self.local.propose(source, context.best_val_bpb)
                path.write_text(edited)
                return proposal
            self._open(source)
            constants = find_constants(source)
            dims = [d for d in self._space if d.key in {c.key for c in constants}]
            if not dims:
                raise ProposalError(f"none of the searched constants is left in {TARGET}")
            best = context.best_source.get(TARGET)
            measured = context.best_val_bpb is not None and math.isfinite(context.best_val_bpb)
            if measured:
                while self._unmeasured_best:  # asked before the baseline had a value: it is the best's
                    self._study.tell(self._unmeasured_best.pop(), context.best_val_bpb, skip_if_finished=True)
            for _ in range(_MAX_SKIPS):
                trial = self._study.ask({d.key: d.distribution() for d in dims})
                values = {d.key: d.value(trial.params[d.key]) for d in dims}
                edited = write_constants(source, values)
                same = best is not None and edited.rstrip("\n") == best.rstrip("\n")  # git show drops the last newline
                if same and measured:
                    self._study.tell(trial, context.best_val_bpb)  # already measured: that is the best
                    continue
                if same:  # the best itself, not measured yet (the baseline is training): told later
                    self._unmeasured_best.append(trial.number)
                    continue
                trial.set_user_attr("values", values)
                path.write_text(edited)
                proposal = Proposal(
                    description=describe(constants, values),
                    rationale=f"{self.config.sampler} trial {trial.number} of the study over {len(dims)} constants",
                    params={k: float(v) for k, v in values.items()},
                )
                self._pending.append((trial.number, proposal))
                return proposal
        raise ProposalError(
            f"the sampler kept proposing the current best {_MAX_SKIPS} times; the space may be exhausted"
        )

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        from optuna.trial import TrialState  # deferred: optuna is heavy

        with self._lock:
            if self.local is not None:
                self.local.observe(proposal.params, status, val_bpb)
                return
            if self._study is None:
                return
            number = self._take_pending(proposal)
            if number is None:
                return  # not a trial of this study (e.g. a confirmation rerun already told)
            ok = val_bpb is not None and math.isfinite(val_bpb)
            value = float(val_bpb) if ok else FAIL_VALUE  # type: ignore[arg-type]
            self._study.tell(number, value, state=TrialState.COMPLETE, skip_if_finished=True)

    def best(self) -> tuple[dict[str, Any], float] | None:
        """The best trial so far: its constant values and val_bpb (None before any result)."""
        with self._lock:
            if self._study is None:
                return None
            done = [t for t in self._study.trials if t.value is not None and t.value < FAIL_VALUE]
            if not done:
                return None
            trial = min(done, key=lambda t: t.value)
            values = trial.user_attrs.get("values") or {
                d.key: d.value(trial.params[d.key]) for d in self._space if d.key in trial.params
            }
            return values, trial.value

    def _take_pending(self, proposal: Proposal) -> int | None:
        for i, (number, pending) in enumerate(self._pending):
            if pending.description == proposal.description and pending.params == proposal.params:
                del self._pending[i]
                return number
        from optuna.trial import TrialState  # deferred: optuna is heavy

        # After a restart: a trial asked by an earlier process and never told.
        for trial in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if {k: float(v) for k, v in trial.user_attrs.get("values", {}).items()} == proposal.params:
                return trial.number
        return None

    def _open(self, source: str) -> None:
        """Load or create the study; its space is fixed when it is created."""
        if self._study is not None:
            return
        import optuna  # deferred: heavy (0.3 s), and local mode never needs it

        # Optuna logs every finished trial at INFO; the loop's own log says what matters.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = search_space(source, self.config.constants)
        keys = json.dumps([self.config.sampler, sorted(d.key for d in space)])
        name = "search-" + hashlib.sha256(keys.encode()).hexdigest()[:12]  # one study per sampler and constants
        storage = None
        if self.storage is not None:
            self.storage.parent.mkdir(parents=True, exist_ok=True)
            storage = f"sqlite:///{self.storage}"
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
        stored = study.user_attrs.get("space")
        if stored is None:
            study.set_user_attr("space", [asdict(d) for d in space])
            study.enqueue_trial({d.key: d.baseline for d in space})
        else:
            space = [Dimension(**d) for d in stored]
        study.sampler = self._sampler(offset=len(study.trials))
        self._study, self._space = study, space

    def _sampler(self, offset: int) -> Any:
        import optuna  # deferred: optuna is heavy

        seed = self.seed + offset  # a resumed study draws fresh random numbers, not the same ones
        if self.config.sampler == "cmaes":
            # CMA-ES starts at the centre of the space, which the ranges above put at the baseline.
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
