"""Several workers and several researchers at once: one experiment per worker, proposals queued ahead.

One orchestrator thread owns the store, git, the notes board, the lead and the reviewer; worker
threads only run trials (``Worker.trainer``: the runner in a subprocess, a Ray task, or the
simulator) and proposal threads only let a researcher edit its own worktree. Everything they
finish comes back as an event, and the orchestrator records it. The one exception: a worker writes
its trial's stage and process group itself, the moment the process starts, so that a kill of the
loop can never leave a running trial that --resume does not know how to stop.

- Each worker trains in its own worktree ``train-<worker>``; each researcher edits in its own
  ``propose-<researcher>``. A researcher proposes one thing at a time; it is told the outcome of
  its experiments (``observe``) between proposals, never during one.
- Proposals are asked for ahead of need: admitted experiments wait in a queue so that a worker
  that finishes finds the next one ready (``lookahead``, default one per worker). A confirmation
  trial of a running experiment goes first.
- Two workers may improve on the same parent; the first to finish becomes the best, and the
  other's change is re-applied on top of it and measured again (``experiment.reapply``), or goes
  back to its author as a conflict.
- A researcher claims an agenda item before it proposes and releases it with its verdict; the
  lead rewrites the agenda every ``lead.every`` experiments; new bests are added to the findings.
- ``stop``: no new proposal or trial starts; running trials finish and are recorded; experiments
  left unfinished are resumed by the next run (``experiment.recover``).
- ``hours``: after the deadline no new proposal is asked and no queued experiment starts (it is
  resumed by the next run); experiments under way, the baseline included, get their remaining trials.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol
from pathlib import Path

from nightlab.lab.session import resolve_device
from nightlab.night import checks, holdout
from nightlab.night.notes import Board
from nightlab.night.proposals import Proposal, ProposalError, Proposer, admit, agent_failed, context, observe
from nightlab.night.recovery import recover
from nightlab.night.state import Lab, Trainer
from nightlab.night.store import Check, Experiment, Store, now
from nightlab.night.trials import (
    BaselineError, Trial, baseline_row, baseline_trials, finish_baseline, next_trial, record_trial, start_trial,
)
from nightlab.night.verdict import conclude, rebase
from nightlab.paths import state_dir
from nightlab.trial import sandbox, standby
from nightlab.trial.processes import stop_group
from nightlab.trial.runner import TrialResult, runs_processes

POLL_S = 0.2
MAX_BACKOFF_S = 60.0  # waiting after consecutive agent failures grows to this


@dataclass
class Researcher:
    name: str
    proposer: Proposer
    brief: str | None = None  # None: program.md
    edits: tuple[str, ...] = ()  # files it may change; empty: lab.allowed_files
    busy: bool = False
    outcomes: list[tuple[Proposal, Experiment]] = field(default_factory=list)  # to observe before proposing
    inbox: queue.Queue | None = None  # proposals to make, served by this researcher's own thread
    failures: int = 0  # agent failures in a row
    rest_until: float = 0.0  # time.monotonic() before which it is not asked again (after failures)


@dataclass(frozen=True)
class Worker:
    """A place where trials run: ``trainer`` has ``runner.run_trial``'s signature."""

    name: str
    trainer: Trainer
    device: str = ""  # cuda | cpu for a worker on this machine; "" elsewhere (Ray, simulation)
    standby: standby.Standby | None = None  # starts the trial this worker is expected to take next


class Lead(Protocol):
    """Every ``every`` experiments, reads the results and rewrites the agenda; returns one line to tell."""

    every: int

    def __call__(self, lab: Lab, board: Board) -> str: ...


@dataclass(frozen=True)
class Proposed:
    """A researcher's proposal thread is done: ``outcome`` is its Proposal, or the exception it raised."""

    researcher: Researcher
    parent: str
    work: Path
    claim: str
    outcome: Proposal | BaseException


@dataclass(frozen=True)
class Trained:
    """A worker's trial is done: ``future`` holds its ``TrialResult`` (or the executor's exception)."""

    worker: Worker
    exp_id: int
    trial: Trial
    future: Future


@dataclass(frozen=True)
class Promoted:
    """A worker trained a new best at ``run.promote_budget_s`` (``checks.begin_promotion``)."""

    worker: Worker
    started: checks.Started
    future: Future


Event = Proposed | Trained | Promoted


@dataclass
class Tally:
    """What a scheduler run did: for the log, the benchmark, and the check that nothing is lost."""

    proposals: int = 0  # proposals the researchers returned (or failed)
    rows: int = 0  # experiment rows those became
    trials: int = 0  # trials run
    reapplied: int = 0  # stale wins measured again on the new best
    conflicts: int = 0  # stale wins that no longer applied
    wall_s: float = 0.0
    orchestrator_s: float = 0.0  # time the orchestrator thread was busy (not waiting for events)


class Scheduler:
    def __init__(self, lab: Lab, researchers: list[Researcher], workers: list[Worker], *,
                 board: Board | None = None, lead: Lead | None = None,
                 lookahead: int | None = None) -> None:
        if not researchers or not workers:
            raise ValueError("a scheduler needs at least one researcher and one worker")
        self.lab, self.researchers, self.workers = lab, researchers, [self._with_standby(lab, w) for w in workers]
        for worker in self.workers:
            if worker.standby is not None:
                worker.standby.upcoming = functools.partial(self._expected, worker)
        self.board = board if board is not None else Board(lab.dir)
        self.lead = lead
        self.lookahead = len(workers) if lookahead is None else lookahead
        self.tally = Tally()
        self.events: queue.Queue = queue.Queue()
        self.ready: deque[tuple[int, Trial]] = deque()
        self.idle = list(self.workers)
        self.asked = 0  # proposals in flight
        self.authors: dict[int, tuple[Researcher, Proposal]] = {}
        self.since_lead = 0
        self.done: list[Experiment] = []
        self._next_researcher = 0
        self.guards: dict[tuple[int, int], sandbox.Guard] = {}  # (experiment, seed) -> what its trial must leave
        self.in_flight: dict[str, tuple[int, Trial]] = {}  # worker -> the trial it runs
        self.baseline_id: int | None = None  # the baseline, while its seeds are being measured
        self.waiting: list[int] = []  # measured experiments waiting for the baseline's verdict
        self.begun: set[int] = set()  # experiments with a trial started in this run
        self.deadline = float("inf")  # no new experiment starts after it (``run(hours=...)``)
        self.stop = threading.Event()  # set: no new experiment starts (``run(stop=...)``)
        self.promoting: deque[int] = deque()  # new bests to train at run.promote_budget_s (checks.promotions)
        self.over_budget = False  # the agents' cost reached run.max_cost_usd

    # -- the loop ------------------------------------------------------------------------------

    def run(self, max_experiments: int = 0, hours: float = 0.0,
            stop: threading.Event | None = None) -> list[Experiment]:
        """Experiments until ``max_experiments`` (counted over the run), ``hours`` or ``stop``."""
        lab, stop = self.lab, stop or threading.Event()
        self.stop = stop
        started = time.monotonic()
        self.deadline = started + hours * 3600 if hours > 0 else float("inf")
        recovered = recover(lab)
        self._after("scoring the holdout of keeps a stopped night left unscored", lambda: holdout.catch_up(lab))
        self.promoting.extend(e.id for e in checks.promotions(lab))
        # The baseline's seeds are queued first, one per free worker; experiments start beside them
        # and wait for the baseline's verdict before their own (``_continue``).
        baseline = baseline_row(lab)
        if not baseline.finished:
            self.baseline_id = baseline.id
            self.ready.extend((baseline.id, trial) for trial in baseline_trials(lab, baseline))
            if not self.ready:  # every seed was measured before a kill: judge it now
                self._baseline_measured()
        for exp in recovered:
            lab.say(f"#{exp.id}: resuming ({exp.description})")
            self.board.hold(exp.claim, exp.agent)
            if self.baseline_id is not None and lab.store.measurements(exp.id):
                self.waiting.append(exp.id)  # measured, judged once the baseline is
                continue
            self._continue(lab.store.get(exp.id), first=self.baseline_id is not None)
        counted = sum(lab.store.status_counts(lab.run.tag, kind="experiment").values())

        def more() -> bool:
            limit = max_experiments and counted + self.asked >= max_experiments
            return not (stop.is_set() or limit or time.monotonic() >= self.deadline or self._spent())

        waited = 0.0
        pool = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="nightlab-worker")
        self.pool = pool
        try:
            while True:
                if not stop.is_set():
                    while len(self.workers) > 1 and self.idle and self.promoting:  # beside the night
                        self._promote(self.idle.pop(0), self.promoting.popleft())
                # after a stop only experiments under way get their remaining trials (_may_start)
                while self.idle and (item := self._next_for(self.idle[0])) is not None:
                    worker = self.idle.pop(0)
                    exp_id, trial = item
                    try:
                        self._start(worker, exp_id, trial)
                    except Exception as e:  # noqa: BLE001 -- the trial could not start: it crashed
                        self._failed(Trained(worker, exp_id, trial, Future()), e)
                while more() and len(self.ready) + self.asked < len(self.idle) + self.lookahead:
                    researcher = self._free_researcher()
                    if researcher is None:
                        break
                    before = self.tally.rows
                    self._ask(researcher)
                    counted += self.tally.rows - before  # a proposal that could not be asked for is a row
                running = len(self.workers) - len(self.idle)
                startable = any(self._may_start(item) for item in self.ready)
                if not running and not self.asked and not startable and not more():
                    if self.ready:
                        lab.say(f"time is up: {len(self.ready)} queued experiment(s) left for the next run")
                    break
                if not running and stop.is_set() and not startable:
                    break  # proposals still out are dropped; queued experiments not begun wait for --resume
                t = time.monotonic()
                try:
                    event = self.events.get(timeout=POLL_S)
                except queue.Empty:
                    waited += time.monotonic() - t
                    continue
                waited += time.monotonic() - t
                before = self.tally.rows
                try:
                    self._handle(event)
                except BaselineError:
                    raise
                except Exception as e:  # noqa: BLE001 -- e.g. a full disk or a git failure in one experiment
                    self._failed(event, e)
                counted += self.tally.rows - before
        except BaseException:  # a second Ctrl-C (or no baseline): stop the trials now; --resume runs them again
            self._stop_running()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            for worker in self.workers:
                if worker.standby is not None:
                    worker.standby.close()
            for researcher in self.researchers:  # a proposal still out is dropped: its agent stops too
                close_agent(researcher.proposer)
        pool.shutdown(wait=True)
        while self.promoting and not stop.is_set():  # one worker: the new bests at scale once the night is done
            self._after("training a best at scale", lambda: self._promote_here(self.promoting.popleft()))
        self.tally.wall_s = time.monotonic() - started
        self.tally.orchestrator_s = self.tally.wall_s - waited
        for researcher in self.researchers:
            self._tell(researcher)
        return self.done

    # -- standbys ------------------------------------------------------------------------------

    @staticmethod
    def _with_standby(lab: Lab, worker: Worker) -> Worker:
        """``worker`` with a standby where ``lab.standby`` allows one on its device."""
        if worker.standby is not None or not worker.device:
            return worker
        if not runs_processes(worker.trainer) or not standby.enabled(lab.config, worker.device):
            return worker
        held = standby.Standby(state_dir(lab.dir) / "standby" / worker.name)
        return dataclasses.replace(worker, trainer=functools.partial(worker.trainer, standby=held), standby=held)

    def _expected(self, worker: Worker) -> standby.Expected | None:
        """The queued trial ``worker`` will probably take next: the first no other standby holds.
        Called from the worker's thread: it reads the queue, never changes it."""
        held = {w.standby.key for w in self.workers if w is not worker and w.standby is not None}
        for exp_id, trial in list(self.ready):
            if (exp_id, trial.seed) not in held and self._may_start((exp_id, trial)):
                names = self.lab.config.lab.allowed_files
                files = {n: data for n in names if (data := self.lab.git.read_bytes(self.lab.dir, trial.commit, n)) is not None}
                return standby.Expected(files, trial.seed, key=(exp_id, trial.seed))
        return None

    def _may_start(self, item: tuple[int, Trial]) -> bool:
        """Past the deadline or after a stop no new experiment starts; one under way gets its remaining trials."""
        under_way = item[0] in self.begun or item[0] == self.baseline_id
        return under_way or (time.monotonic() < self.deadline and not self.stop.is_set())

    def _next_for(self, worker: Worker) -> tuple[int, Trial] | None:
        """The queued trial for ``worker`` (taken off the queue): the one its standby holds, if
        queued; else the first that may start; None if none may."""
        allowed = [item for item in self.ready if self._may_start(item)]
        if not allowed:
            return None
        key = worker.standby.key if worker.standby is not None else ()
        item = next((item for item in allowed if key and (item[0], item[1].seed) == key), allowed[0])
        self.ready.remove(item)
        return item

    def _stop_running(self) -> None:
        """Stop the process groups of this run's trials that are still training or evaluating."""
        for exp in self.lab.store.select(self.lab.run.tag, statuses=("running",)):
            if exp.pgid:
                stop_group(exp.pgid)

    def _failed(self, event: Event, error: Exception) -> None:
        """Record an unexpected error of one event: its experiment crashes (unless its verdict was
        already recorded: that stands), its worker is free again."""
        reason = f"nightlab error: {type(error).__name__}: {error}"
        self.lab.say(f"{'proposal' if isinstance(event, Proposed) else 'trial'} failed: {reason}")
        if isinstance(event, Promoted) and event.worker not in self.idle:
            self.idle.append(event.worker)
        if isinstance(event, Trained):
            worker, exp_id = event.worker, event.exp_id
            self.guards.pop((exp_id, event.trial.seed), None)
            self.in_flight.pop(worker.name, None)
            if worker not in self.idle:
                self.idle.append(worker)
            if exp_id == self.baseline_id:
                raise BaselineError(f"the baseline could not be measured: {reason}")
            if self.lab.store.get(exp_id).finished:  # e.g. copying a keep to best/ failed after its verdict
                return
            exp = self.lab.store.update(exp_id, status="crash", stage="done", pgid=None, reason=reason,
                                        finished_at=now())
            self.done.append(exp)
            if self.lab.on_finished:
                self.lab.on_finished(exp)

    def _handle(self, event: Event) -> None:
        if isinstance(event, Proposed):
            self._proposed(event)
        elif isinstance(event, Promoted):
            self._promoted(event)
        else:
            self._trained(event)

    # -- new bests at a larger budget (run.promote_budget_s) -------------------------------------

    def _promote(self, worker: Worker, best_id: int) -> None:
        """Train the best ``best_id`` at the larger budget on ``worker``, beside the night's trials."""
        lab = self.lab
        started = checks.begin_promotion(lab, lab.store.get(best_id), worktree=f"scale-{worker.name}")
        if isinstance(started, Check):  # measured before a kill
            self.idle.append(worker)
            checks.judge_scale(lab)
            return
        future = self.pool.submit(
            worker.trainer, started.work, started.folder, started.config, started.check.seed, data_dir=lab.data_dir,
            on_stage=lambda stage, pgid: self._record_check_stage(started.check.id, pgid))
        future.add_done_callback(lambda f: self.events.put(Promoted(worker, started, f)))

    def _promoted(self, event: Promoted) -> None:
        self.idle.append(event.worker)
        try:
            result = event.future.result()
        except Exception as e:  # noqa: BLE001 -- an executor failure is this trial's crash
            result = TrialResult("crash", reason=f"worker {event.worker.name} failed: {type(e).__name__}: {e}")
        checks.end(self.lab, event.started, result)
        checks.judge_scale(self.lab)

    def _promote_here(self, best_id: int) -> None:
        best = self.lab.store.get(best_id)
        checks.run(self.lab, checks.SCALE, best.id, 0, best.commit_sha or "", self.lab.config.lab.seed,
                   budget_s=self.lab.config.run.promote_budget_s, label=f"#{best.id} at scale")
        checks.judge_scale(self.lab)

    def _record_check_stage(self, check_id: int, pgid: int) -> None:
        """On the worker's thread: a check's process group, recorded at once (as ``_record_stage``)."""
        with Store(self.lab.store.path) as store:
            store.update_check(check_id, pgid=pgid)

    def _record_stage(self, exp_id: int, stage: str, pgid: int) -> None:
        """On the worker's thread, as a trial's process starts: its process group goes into the store
        at once, not through the event queue, so a loop killed right after still leaves --resume the
        group to stop (an orphan would hold the GPU and write into the run folder)."""
        with Store(self.lab.store.path) as store:  # this thread's own connection (twice a trial)
            store.update(exp_id, stage=stage, pgid=pgid)

    # -- proposals -----------------------------------------------------------------------------

    def _free_researcher(self) -> Researcher | None:
        for i in range(len(self.researchers)):
            r = self.researchers[(self._next_researcher + i) % len(self.researchers)]
            if not r.busy and r.rest_until <= time.monotonic():
                self._next_researcher = (self._next_researcher + i + 1) % len(self.researchers)
                return r
        return None

    def _ask(self, researcher: Researcher) -> None:
        lab = self.lab
        self._tell(researcher)
        claim = self.board.claim(researcher.name)
        parent = lab.best_commit()
        try:
            work = lab.git.worktree(lab.dir, f"propose-{researcher.name}", parent)
            ctx = context(lab, program=researcher.brief, agent=researcher.name, claim=claim)
        except Exception as e:  # noqa: BLE001 -- e.g. git refuses the checkout: this proposal fails, not the night
            self.tally.proposals += 1
            self._invalid(researcher, parent, f"nightlab error: could not prepare a proposal: {type(e).__name__}: {e}",
                          None, claim)
            return
        if researcher.edits:
            ctx = dataclasses.replace(ctx, allowed_files=researcher.edits)
        researcher.busy = True
        self.asked += 1

        def propose() -> None:
            try:
                outcome: Proposal | BaseException = researcher.proposer.propose(ctx, work)
            except Exception as e:  # noqa: BLE001 -- an agent failure of any kind is recorded, never fatal
                outcome = e
            self.events.put(Proposed(researcher, parent, work, claim, outcome))

        if researcher.inbox is None:  # one daemon thread per researcher: a thinking agent never blocks exit
            researcher.inbox = queue.Queue()
            threading.Thread(target=_serve, args=(researcher.inbox,), daemon=True,
                             name=f"nightlab-propose-{researcher.name}").start()
        researcher.inbox.put(propose)

    def _proposed(self, event: Proposed) -> None:
        lab = self.lab
        researcher, parent, work, claim, outcome = event.researcher, event.parent, event.work, event.claim, event.outcome
        researcher.busy = False
        self.asked -= 1
        self.tally.proposals += 1
        if isinstance(outcome, BaseException):
            spent = None
            if isinstance(outcome, ProposalError):
                spent = Proposal("(agent failed)", cost_usd=outcome.cost_usd, tokens_in=outcome.tokens_in,
                                 tokens_out=outcome.tokens_out)
            reason = f"agent {researcher.name} failed: " + (
                str(outcome) if isinstance(outcome, ProposalError) else f"{type(outcome).__name__}: {outcome}")
            # An agent that keeps failing (a missing binary, an API that is down) is asked again
            # after 2, 4, 8 ... seconds up to a minute, not at once, so it cannot fill the night with invalid rows.
            researcher.failures += 1
            if researcher.failures > 1:
                researcher.rest_until = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (researcher.failures - 1))
            self._invalid(researcher, parent, reason, spent, claim)
            return
        researcher.failures = 0
        try:
            best = lab.best_commit()
            if parent != best and not lab.git.move_changes(work, best):
                lab.say(f"{researcher.name}: the proposal conflicts with the new best; asking again")
                self.board.release(researcher.name)
                self.tally.proposals -= 1  # asked again: not a proposal of its own
                return
            exp = admit(lab, work, best, outcome, researcher.name, claim=claim,
                        **({"allowed": researcher.edits} if researcher.edits else {}))
        except Exception as e:  # noqa: BLE001 -- e.g. git cannot commit it: this proposal fails, not the night
            self._invalid(researcher, parent, f"nightlab error: could not admit the proposal: {type(e).__name__}: {e}",
                          outcome if isinstance(outcome, Proposal) else None, claim)
            return
        self.tally.rows += 1
        self.authors[exp.id] = (researcher, outcome)
        if exp.commit_sha and not exp.finished:
            self.ready.append(self._first(exp))
        else:
            self._finished(exp)

    def _invalid(self, researcher: Researcher, parent: str, reason: str, spent: Proposal | None, claim: str) -> None:
        """A proposal that failed (its agent, or nightlab preparing or admitting it) is an agent_failed row."""
        self.tally.rows += 1
        self._finished(agent_failed(self.lab, parent, researcher.name, reason, spent, claim=claim))

    def _spent(self) -> bool:
        """The agents' known cost reached ``run.max_cost_usd``: no new proposal is asked (said once)."""
        limit = self.lab.config.run.max_cost_usd
        if not limit or self.lab.store.cost_usd(self.lab.run.tag) < limit:
            return False
        if not self.over_budget:
            self.over_budget = True
            self.lab.say(f"the agents have cost ${self.lab.store.cost_usd(self.lab.run.tag):.2f}, "
                         f"run.max_cost_usd = ${limit:.2f}: no new proposals")
        return True

    def _tell(self, researcher: Researcher) -> None:
        for proposal, exp in researcher.outcomes:
            observe(self.lab, researcher.proposer, proposal, exp)
        researcher.outcomes.clear()

    # -- trials --------------------------------------------------------------------------------

    def _start(self, worker: Worker, exp_id: int, trial: Trial) -> None:
        lab = self.lab
        exp = lab.store.get(exp_id)
        work, run_dir = start_trial(lab, exp, trial, worker.name)
        if runs_processes(worker.trainer):  # real train.py processes: check what they leave behind
            self.guards[exp_id, trial.seed] = sandbox.Guard.take(lab.dir, lab.store.path, exp_id)
        progress = lab.on_progress
        on_progress = (lambda line: progress(f"[{worker.name}] {line}")) if progress else None
        self.in_flight[worker.name] = (exp_id, trial)
        self.begun.add(exp_id)
        future = self.pool.submit(
            worker.trainer, work, run_dir, lab.config, trial.seed, data_dir=lab.data_dir, on_progress=on_progress,
            on_stage=lambda stage, pgid: self._record_stage(exp_id, stage, pgid),
        )
        future.add_done_callback(lambda f: self.events.put(Trained(worker, exp_id, trial, f)))

    def _trained(self, event: Trained) -> None:
        lab = self.lab
        worker, exp_id, trial, future = event.worker, event.exp_id, event.trial, event.future
        self.idle.append(worker)
        self.in_flight.pop(worker.name, None)
        self.tally.trials += 1
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001 -- an executor failure is this trial's crash
            result = TrialResult("crash", reason=f"worker {worker.name} failed: {type(e).__name__}: {e}", error=str(e))
        guard = self.guards.pop((exp_id, trial.seed), None)
        if guard is not None and (touched := guard.check()):
            result = dataclasses.replace(result, status="invalid", val_bpb=None,
                                         reason=f"the trial changed the lab outside its run folder: {'; '.join(touched)}")
        exp = lab.store.get(exp_id)
        record_trial(lab, exp, trial, result)
        for (sibling, _seed), other in self.guards.items():  # seeds of one experiment train side by side
            if sibling == exp_id:
                other.accept(exp_id, trial.seed)
        if exp_id == self.baseline_id:
            if not any(queued == exp_id for queued, _ in self.ready) and not self._running(exp_id):
                again = baseline_trials(lab, lab.store.get(exp_id))  # seeds set aside as disturbed run again
                if again:
                    self.ready.extendleft((exp_id, t) for t in again)
                else:
                    self._baseline_measured()
            return
        if self.baseline_id is not None:
            self.waiting.append(exp_id)  # its verdict needs the baseline's
            return
        self._continue(exp)

    def _continue(self, exp: Experiment, first: bool = False) -> None:
        """Queue ``exp``'s next trial, or judge it when it has them all (``first``: queue its first
        trial only if it has none yet, as when the baseline is still being measured)."""
        lab = self.lab
        if first:
            self.ready.append(self._first(exp))
            return
        following = next_trial(lab, exp)
        if following is not None:
            self.ready.appendleft((exp.id, following))
            return
        self._finished(conclude(lab, exp))

    def _first(self, exp: Experiment) -> tuple[int, Trial]:
        """``exp``'s first trial, as the queue holds it."""
        return exp.id, Trial(exp.id, exp.commit_sha or "", self.lab.config.lab.seed, "first", 0)

    def _running(self, exp_id: int) -> bool:
        return any(running == exp_id for running, _ in self.in_flight.values())

    def _baseline_measured(self) -> None:
        """All the baseline's seeds are in: judge it (``BaselineError`` if none trained), then the
        experiments that were waiting for it."""
        lab = self.lab
        baseline = finish_baseline(lab, lab.store.get(self.baseline_id))
        self._after("the baseline: scoring the holdout", lambda: holdout.score(lab, baseline))
        if lab.config.run.promote_budget_s > 0:
            self.promoting.append(baseline.id)
        self.baseline_id = None
        waiting, self.waiting = self.waiting, []
        for exp_id in waiting:
            self._continue(lab.store.get(exp_id))

    # -- verdicts ------------------------------------------------------------------------------

    def _finished(self, exp: Experiment) -> None:
        lab = self.lab
        again = lab.store.select(lab.run.tag, origin=exp.id) if exp.reason.startswith("superseded") else []
        for row in again:
            self.tally.reapplied += 1
            self.tally.rows += 1
            self.ready.appendleft(self._first(row))
        if exp.reason.startswith("conflict:"):
            self.tally.conflicts += 1
        author = self.authors.pop(exp.id, None)
        if author is not None:
            researcher, proposal = author
            researcher.outcomes.append((proposal, exp))
            self.board.release(researcher.name)  # a re-applied change runs on without a claim
        self.done.append(exp)
        if exp.status == "keep":
            self._rebase_queued()
        # The verdict is recorded: what follows (holdout, notes, notifications, the lead) may fail, never change it.
        if exp.status == "keep":
            self._after(f"#{exp.id}: scoring the holdout", lambda: holdout.score(lab, exp))
            if lab.config.run.promote_budget_s > 0:
                self.promoting.append(exp.id)
        if exp.status == "keep" and exp.val_bpb is not None:
            line = f"#{exp.id} ({exp.agent}) {exp.description}: val_bpb {exp.val_bpb:.6f}"
            self._after(f"#{exp.id}: adding it to the findings", lambda: self.board.add_finding(line))
        if lab.on_finished:
            self._after(f"#{exp.id}: telling of its verdict", lambda: lab.on_finished(exp))
        if self.lead is not None and exp.kind == "experiment":
            self.since_lead += 1
            if self.since_lead >= self.lead.every:
                self.since_lead = 0
                self._after("lead", lambda: lab.say(f"lead: {self.lead(lab, self.board)}"))

    def _rebase_queued(self) -> None:
        """The best moved: queued experiments that have not trained yet go on top of it."""
        for i, (exp_id, trial) in enumerate(self.ready):
            if trial.kind != "first" or exp_id in self.begun:
                continue
            exp = rebase(self.lab, self.lab.store.get(exp_id))
            if exp.commit_sha != trial.commit:
                self.ready[i] = (exp_id, dataclasses.replace(trial, commit=exp.commit_sha or ""))

    def _after(self, what: str, work: Callable[[], object]) -> None:
        """Run work that follows a verdict; an error in it is told, and the night goes on."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 -- e.g. a full disk while writing the notes
            self.lab.say(f"{what} failed: {type(e).__name__}: {e}")


def _serve(inbox: queue.Queue) -> None:
    while True:
        inbox.get()()


def close_agent(proposer: Proposer) -> None:
    """Stop what ``proposer`` still runs (a CLI agent's process group) once the night is over: the
    thread that waits for it dies with the interpreter, and the agent would edit on unwatched."""
    close = getattr(proposer, "close", None)
    if close is not None:
        close()


def run_single(lab: Lab, proposer: Proposer, *, max_experiments: int = 0, hours: float = 0.0,
               stop: threading.Event | None = None) -> list[Experiment]:
    """``program.md``'s one researcher on the lab's one local worker (``lab.trainer`` on
    ``lab.config.lab.device``): the scheduler with one of each. Returns the experiments it finished."""
    device = resolve_device(lab.config.lab.device) if runs_processes(lab.trainer) else ""
    worker = Worker(lab.worker, lab.trainer, device=device)
    return Scheduler(lab, [Researcher(proposer.name, proposer)], [worker]).run(
        max_experiments=max_experiments, hours=hours, stop=stop)
