"""The search proposer: constants found and rewritten in place, Optuna improving a stand-in objective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nightlab.config import Config, ConfigError, SearchAgentConfig, load
from nightlab import agents
from nightlab.night.proposals import Context
from nightlab.agents.constants import find_constants, write_constants
from nightlab.agents.search import FAIL_VALUE, SearchProposer, dimension_for, search_space

SOURCE = '''"""A stand-in train.py."""
import math

S = "é"; X = 12  # the x knob (a non-ASCII character precedes it on this line)
Y = 0.08  # the y knob
COMPILE = True  # a switch, not a number
NAME = "gpt"
WARMUP = 0.0  # zero: not tuned
TOTAL = 2**19  # tokens per step
OFFSET = -1
WIDE = 3 * 1024
CAP = 0.95  # stays below one
lower_case = 5

if math.pi > 3:
    X = 4  # a second assignment of X
    DERIVED = X * 2


def f():
    INSIDE = 3
    return INSIDE
'''


def objective(source: str) -> float:
    """The stand-in for val_bpb: a bowl with its minimum at X = 7, Y = 0.02."""
    values = {c.key: c.value for c in find_constants(source)}
    return (values["X"] - 7) ** 2 / 50 + (values["Y"] - 0.02) ** 2 * 1000


def test_constants_found_with_values_and_keys() -> None:
    found = {c.key: c.value for c in find_constants(SOURCE)}
    assert found == {
        "X": 12,
        "Y": 0.08,
        "WARMUP": 0.0,
        "TOTAL": 2**19,
        "OFFSET": -1,
        "WIDE": 3072,
        "CAP": 0.95,
        "X#2": 4,
    }
    assert [c.is_pow2_form for c in find_constants(SOURCE) if c.key == "TOTAL"] == [True]


def test_write_back_changes_only_the_values() -> None:
    out = write_constants(SOURCE, {"X": 9, "Y": 0.031, "TOTAL": 2**20, "WIDE": 4096, "X#2": 5})
    changed = [(a, b) for a, b in zip(SOURCE.splitlines(), out.splitlines()) if a != b]
    assert changed == [
        (
            'S = "é"; X = 12  # the x knob (a non-ASCII character precedes it on this line)',
            'S = "é"; X = 9  # the x knob (a non-ASCII character precedes it on this line)',
        ),
        ("Y = 0.08  # the y knob", "Y = 0.031  # the y knob"),
        ("TOTAL = 2**19  # tokens per step", "TOTAL = 2**20  # tokens per step"),
        ("WIDE = 3 * 1024", "WIDE = 4096"),
        ("    X = 4  # a second assignment of X", "    X = 5  # a second assignment of X"),
    ]
    with pytest.raises(KeyError, match="NOPE"):
        write_constants(SOURCE, {"NOPE": 1})


def test_search_space_follows_the_values() -> None:
    dims = {d.key: d for d in search_space(SOURCE)}
    assert set(dims) == {"X", "Y", "TOTAL", "WIDE", "CAP", "X#2"}  # zero, negative, bool, str skipped
    assert (dims["X"].kind, dims["X"].low, dims["X"].high) == ("int", 6, 24)
    assert (dims["TOTAL"].kind, dims["TOTAL"].low, dims["TOTAL"].high) == ("pow2", 17, 21)
    assert dims["Y"].log and math.isclose(dims["Y"].low, 0.02) and math.isclose(dims["Y"].high, 0.32)
    assert dims["CAP"].high < 1
    assert (dims["WIDE"].kind, dims["WIDE"].low, dims["WIDE"].high, dims["WIDE"].log) == ("int", 768, 12288, True)
    assert [d.key for d in search_space(SOURCE, ("Y",))] == ["Y"]
    with pytest.raises(ConfigError, match="NOPE"):
        search_space(SOURCE, ("NOPE",))
    zero = find_constants("Z = 0\n")[0]
    assert dimension_for(zero) is None


def _run(proposer: SearchProposer, start: str, workdir: Path, n: int) -> tuple[float, str, list[str]]:
    """A greedy loop around the proposer: keep what lowers the objective."""
    best_source, best = start, objective(start)
    descriptions = []
    for _ in range(n):
        worktree = workdir / "wt"
        worktree.mkdir(exist_ok=True)
        (worktree / "train.py").write_text(best_source)
        proposal = proposer.propose(Context("p", {"train.py": best_source}, "", best_val_bpb=best), worktree)
        source = (worktree / "train.py").read_text()
        value = objective(source)
        proposer.observe(proposal, "keep" if value < best else "discard", value)
        descriptions.append(proposal.description)
        if value < best:
            best, best_source = value, source
    return best, best_source, descriptions


def test_tpe_improves_the_stand_in_objective_and_keeps_comments(tmp_path: Path) -> None:
    config = SearchAgentConfig(mode="global", constants=("X", "Y"))
    proposer = SearchProposer(config, storage=tmp_path / "optuna.db", seed=3)
    initial = objective(SOURCE)
    best, best_source, descriptions = _run(proposer, SOURCE, tmp_path, 30)
    assert best < initial / 10, (initial, best)
    assert descriptions[0].startswith("search: X 12→")  # the baseline was told, not re-run
    assert "# the x knob (a non-ASCII" in best_source and "# the y knob" in best_source
    assert [a for a, b in zip(SOURCE.splitlines(), best_source.splitlines()) if a != b] == [
        line for line in SOURCE.splitlines() if line.startswith(('S = "é"; X =', "Y ="))
    ]
    values, value = proposer.best()
    assert math.isclose(value, best)

    # A new proposer on the same storage continues the study with its original space.
    again = SearchProposer(config, storage=tmp_path / "optuna.db", seed=3)
    proposal = again.propose(Context("p", {"train.py": best_source}, "", best_val_bpb=best), tmp_path / "wt")
    assert len(again._study.trials) == 32  # 30 + the baseline + this one
    assert [d.low for d in again._space] == [6, pytest.approx(0.02)]  # anchored at the first baseline
    again.observe(proposal, "discard", objective((tmp_path / "wt" / "train.py").read_text()))


def test_failures_are_told_as_bad_values_and_baseline_comes_first(tmp_path: Path) -> None:
    proposer = SearchProposer(SearchAgentConfig(mode="global", constants=("X", "Y")), storage=None)
    (tmp_path / "train.py").write_text(SOURCE)
    # Asked while the baseline trains (no measured best yet): the study's first trial, the baseline's
    # own values, is not proposed again; it waits for the baseline's value.
    first = proposer.propose(Context("p", {"train.py": SOURCE}, ""), tmp_path)
    assert first.description.startswith("search: ") and first.description != "search: baseline values"
    assert (tmp_path / "train.py").read_text() != SOURCE
    proposer.observe(first, "crash", None)
    (tmp_path / "train.py").write_text(SOURCE)
    second = proposer.propose(Context("p", {"train.py": SOURCE}, "", best_val_bpb=4.1), tmp_path)
    assert second.params != first.params and second.description.startswith("search: ")
    values = [t.value for t in proposer._study.trials]
    assert values[:2] == [4.1, FAIL_VALUE]  # the baseline told its value once known, then the crash
    assert proposer._study.trials[0].params == {"X": 12, "Y": pytest.approx(0.08)}


def test_cmaes_sampler_proposes_within_the_space(tmp_path: Path) -> None:
    proposer = SearchProposer(SearchAgentConfig(mode="global", sampler="cmaes", constants=("X", "Y")), storage=tmp_path / "o.db")
    best, _, descriptions = _run(proposer, SOURCE, tmp_path, 12)
    assert best < objective(SOURCE)
    for trial in proposer._study.trials:
        assert 6 <= trial.params["X"] <= 24 and 0.02 <= trial.params["Y"] <= 0.32


def test_factory_puts_the_study_in_the_lab_state(tmp_path: Path) -> None:
    for mode, state in (("global", "optuna.db"), ("local", "search-local.json")):
        proposer = agents.create("search", Config().with_overrides(["search.constants=['Y']", f"search.mode={mode!r}"]),
                                 tmp_path)
        (tmp_path / "train.py").write_text(SOURCE)
        proposer.propose(Context("p", {"train.py": SOURCE}, "", best_val_bpb=1.0), tmp_path)
        assert (tmp_path / ".nightlab" / state).exists(), mode
    with pytest.raises(ConfigError, match="sampler"):
        SearchProposer(SearchAgentConfig(sampler="grid"))
    with pytest.raises(ConfigError, match="search.constants names DEPHT"):
        agents.create("search", Config().with_overrides(["search.constants=['DEPHT']"]), tmp_path)


def test_description_shows_values_as_written(tmp_path: Path) -> None:
    proposer = SearchProposer(SearchAgentConfig(mode="global", constants=("TOTAL",)), seed=1)
    (tmp_path / "train.py").write_text(SOURCE)
    proposal = proposer.propose(Context("p", {"train.py": SOURCE}, "", best_val_bpb=1.0), tmp_path)
    exponent = int(proposal.params["TOTAL"]).bit_length() - 1
    assert proposal.description == f"search: TOTAL 2**19→2**{exponent}"
    assert f"TOTAL = 2**{exponent}  # tokens per step" in (tmp_path / "train.py").read_text()


# -- the local researcher (search.mode = "local", the default) ---------------------------------

LOCAL_KEYS = ("X", "Y", "TOTAL", "CAP", "WIDE")


def _values(source: str) -> dict[str, float]:
    return {c.key: c.value for c in find_constants(source) if c.key in LOCAL_KEYS}


def test_local_proposals_move_few_constants_of_the_best_and_never_repeat(tmp_path: Path) -> None:
    proposer = SearchProposer(SearchAgentConfig(constants=LOCAL_KEYS), storage=tmp_path / "optuna.db", seed=5)
    best, best_source, descriptions = _run(proposer, SOURCE, tmp_path, 40)
    assert best < objective(SOURCE)
    for description in descriptions:
        assert description.startswith("search: ") and "step x" in description, description
    points = proposer.local.state["measured"]
    assert len(points) == len(set(points)) == 40  # no point proposed twice
    # From one best, 30 proposals in a row: each moves 1 to 3 constants, never the same way twice, and
    # a shape (the batch size) alone and in a minority of them.
    source = SOURCE + "MATRIX_LR = 0.04\nWEIGHT_DECAY = 0.2\nEMBEDDING_LR = 0.6\nUNEMBEDDING_LR = 0.004\n" \
                      "TOTAL_BATCH_SIZE = 2**16\n"
    keys = (*LOCAL_KEYS, "MATRIX_LR", "WEIGHT_DECAY", "EMBEDDING_LR", "UNEMBEDDING_LR", "TOTAL_BATCH_SIZE")
    before = {c.key: c.value for c in find_constants(source)}
    again = SearchProposer(SearchAgentConfig(constants=keys), storage=None, seed=5)
    (tmp_path / "train.py").write_text(source)
    sizes, shapes = [], 0
    for _ in range(30):
        proposal = again.propose(Context("p", {"train.py": source}, "", best_val_bpb=1.0), tmp_path)
        moved = {c.key: c.value for c in find_constants((tmp_path / "train.py").read_text())}
        changed = {k for k, v in before.items() if moved[k] != v}
        assert 1 <= len(changed) <= 3 and set(proposal.params) == changed, proposal.description
        assert changed == {"TOTAL_BATCH_SIZE"} or "TOTAL_BATCH_SIZE" not in changed  # a shape moves alone
        shapes += changed == {"TOTAL_BATCH_SIZE"}
        sizes.append(len(changed))
        again.observe(proposal, "discard", 2.0)
        (tmp_path / "train.py").write_text(source)
    points = again.local.state["measured"]
    assert len(points) == len(set(points)) == 30
    assert 1 <= shapes <= 12 and max(sizes) > 1  # shapes less often; some interacting groups move together


def test_local_step_grows_after_wins_and_shrinks_after_losses(tmp_path: Path) -> None:
    proposer = SearchProposer(SearchAgentConfig(constants=("Y",)), storage=None, seed=0)
    (tmp_path / "train.py").write_text(SOURCE)
    first = proposer.local.step("Y")
    proposal = proposer.propose(Context("p", {"train.py": SOURCE}, "", best_val_bpb=1.0), tmp_path)
    assert proposal.description.startswith("search: Y 0.08→") and f"step x{first:.3g}" in proposal.description
    proposer.observe(proposal, "keep", 0.9)
    grown = proposer.local.step("Y")
    assert grown > first
    won = (tmp_path / "train.py").read_text()
    direction = "raise" if proposal.params["Y"] > 0.08 else "lowering"
    again = proposer.propose(Context("p", {"train.py": won}, "", best_val_bpb=0.9), tmp_path)
    proposer.observe(again, "discard", 0.95)
    proposer.observe(proposer.propose(Context("p", {"train.py": won}, "", best_val_bpb=0.9), tmp_path), "crash", None)
    assert proposer.local.step("Y") < grown
    # The description says what and why: the step and the direction's record.
    (tmp_path / "train.py").write_text(won)
    fresh = SearchProposer(SearchAgentConfig(constants=("Y",)), storage=None, seed=0)
    fresh.local.state = proposer.local.state
    fresh.local.state["arms"]["Y"]["up" if direction == "raise" else "down"] = [1.0, 1.0]
    fresh.local.state["arms"]["Y"]["up" if direction != "raise" else "down"] = [0.0] * 5
    said = fresh.propose(Context("p", {"train.py": won}, "", best_val_bpb=0.9), tmp_path).description
    assert f"the last two {direction}s won" in said, said


def test_local_statistics_survive_a_resume(tmp_path: Path) -> None:
    config = SearchAgentConfig(constants=("X", "Y"))
    proposer = SearchProposer(config, storage=tmp_path / "optuna.db", seed=1)
    best, best_source, _ = _run(proposer, SOURCE, tmp_path, 6)
    (tmp_path / "wt" / "train.py").write_text(best_source)
    pending = proposer.propose(Context("p", {"train.py": best_source}, "", best_val_bpb=best), tmp_path / "wt")
    before = json.loads((tmp_path / "search-local.json").read_text())
    assert before["arms"] and len(before["measured"]) == 7

    resumed = SearchProposer(config, storage=tmp_path / "optuna.db", seed=1)  # a new process: --resume
    assert resumed.local.state["arms"] == before["arms"]
    resumed.observe(pending, "keep", best - 0.1)  # an outcome asked for before the restart is still learned
    assert sum(len(resumed.local.state["arms"][k]["up"] + resumed.local.state["arms"][k]["down"])
               for k in ("X", "Y")) == 7
    (tmp_path / "wt" / "train.py").write_text(best_source)
    nxt = resumed.propose(Context("p", {"train.py": best_source}, "", best_val_bpb=best), tmp_path / "wt")
    assert json.dumps(_values((tmp_path / "wt" / "train.py").read_text()), sort_keys=True) not in before["measured"]
    assert nxt.params != pending.params


def test_a_bad_search_mode_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        Config().with_overrides(["search.mode=wide"])
    assert str(error.value) == "--set: search.mode must be one of local, global, got 'wide'"
    (tmp_path / "nightlab.toml").write_text('[search]\nmode = "greedy"\n')
    with pytest.raises(ConfigError, match="search.mode must be one of local, global"):
        load(tmp_path)
    assert not (tmp_path / ".nightlab").exists()  # refused before anything was made
    with pytest.raises(ConfigError, match="search.mode"):
        SearchProposer(SearchAgentConfig(mode="wide"))
