"""The reviewer gate and the lead: rules, an LLM on a scripted server, and the veto inside the loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "agents"))

from llm_server import ScriptedServer, chat, error  # noqa: E402

from fixtures.standin.helpers import constant_step  # noqa: E402
from nightlab.config import ApiAgentConfig, load  # noqa: E402
from nightlab.agents.api import ApiProposer  # noqa: E402
from nightlab.agents.scripted import ScriptedProposer  # noqa: E402
from nightlab.night.state import Lab# noqa: E402
from nightlab.night.proposals import context
from nightlab.agents.lead import ApiLead, StatsLead  # noqa: E402
from nightlab.night.scheduler import run_single  # noqa: E402
from nightlab.night.state import start_run
from nightlab.night.notes import Board  # noqa: E402
from nightlab.agents.reviewer import ApiReviewer, RulesReviewer, parse_answer  # noqa: E402
from nightlab.sim.simulate import MemoryGit, SimulatedTrainer, Surface, _masked  # noqa: E402
from nightlab.night.store import Store  # noqa: E402

SOURCE = "DEPTH = 8  # layers\nASPECT_RATIO = 64  # width\nMATRIX_LR = 0.04  # lr\nWARMUP = 0.5  # share\n"
KEY_ENV = "NIGHTLAB_TEST_KEY"


def _lab(tmp_path: Path, reviewer=None) -> Lab:
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    (lab_dir / "train.py").write_text(SOURCE)
    (lab_dir / "nightlab.toml").write_text("[run]\nbaseline_runs = 2\nconfirm_runs = 1\n")
    surface = Surface({"DEPTH": 14.0, "MATRIX_LR": 0.02}, {"DEPTH": 0.05, "MATRIX_LR": 0.05}, floor=0.9,
                      noise=0.0002, edit_effect=0.0005, baseline_text=_masked(SOURCE))
    vcs = MemoryGit(lab_dir, files=("train.py",))
    store = Store.open(lab_dir)
    config = load(lab_dir)
    run = start_run(lab_dir, store, config, "scripted", "t", False, vcs=vcs)
    return Lab(lab_dir, config, lab_dir, store, run, say=lambda line: None, trainer=SimulatedTrainer(surface), git=vcs,
               reviewer=reviewer)


def _peek_at_validation(worktree: Path) -> str:
    path = worktree / "train.py"
    path.write_text(path.read_text().replace("DEPTH = 8", "DEPTH = 12") + 'VAL = "val.tokens.npy"  # peek\n')
    return "deeper, and a look at the validation split"


def test_a_vetoed_win_is_discarded_with_its_reason_and_the_best_stays(tmp_path):
    lab = _lab(tmp_path, reviewer=RulesReviewer("reviewer"))
    proposer = ScriptedProposer([_peek_at_validation, constant_step("deeper", "DEPTH", 12),
                                 constant_step("lower lr", "MATRIX_LR", 0.02)])
    run_single(lab, proposer, max_experiments=3)
    base, peek, deeper, _ = lab.experiments()
    assert peek.status == "discard" and peek.reason.startswith("vetoed by reviewer: touches the measurement")
    assert "beats the best beyond the noise" in peek.reason  # what the measurement said is kept too
    assert peek.review.startswith("veto by reviewer:") and "val.tokens.npy" in peek.review
    assert deeper.parent_commit == base.commit_sha  # the veto did not move the best
    assert deeper.status == "keep" and deeper.review == "approve by reviewer: no rule broken"
    assert "vetoed by review" in proposer.contexts[2].last_error  # asked while #3 trained, after #2's verdict


def test_rules_veto_a_bigger_model_and_needless_complexity():
    from nightlab.night.store import Experiment

    def row(**kw):
        fields = {f: None for f in Experiment.__dataclass_fields__}
        fields.update(id=1, run_tag="t", kind="experiment", worker="w", agent="a", description="d", rationale="",
                      files_changed=1, lines_added=0, lines_removed=0, status="keep", stage="done", cost_usd=0.0,
                      tokens_in=0, tokens_out=0, reason="", error="", created_at="", review="", claim="")
        fields.update(kw)
        return Experiment(**fields)

    best = row(val_bpb=1.000, num_params=1_000_000)
    rules = RulesReviewer("r")
    bigger = rules.check("+DEPTH = 16\n", row(val_bpb=0.998, num_params=2_000_000), best)
    assert not bigger.approve and "2.0x bigger model" in bigger.reason
    assert rules.check("+DEPTH = 16\n", row(val_bpb=0.990, num_params=2_000_000), best) is None  # a big gain
    long_diff = "".join(f"+x{i} = {i}\n" for i in range(40))
    complex_ = rules.check(long_diff, row(val_bpb=0.999, num_params=1_000_000), best)
    assert not complex_.approve and "40 added lines" in complex_.reason
    assert rules.check("+++ b/train.py\n+DEPTH = 9\n", row(val_bpb=0.999, num_params=1_000_000), best) is None
    gaming = rules.check('+    json.dump({"val_bpb": 0.5}, open(out / "eval.json", "w"))\n', row(val_bpb=0.9), best)
    assert not gaming.approve and "eval.json" in gaming.reason


def test_parse_answer():
    assert parse_answer("**VETO**: reads the validation split", "r").approve is False
    assert parse_answer("Looks fine.\nAPPROVE: a clean change", "r").reason == "a clean change"
    assert parse_answer("no idea", "r").approve and "unreadable review" in parse_answer("no idea", "r").reason


def _client(server: ScriptedServer) -> ApiProposer:
    config = ApiAgentConfig(base_url=server.url + "/v1", model="gpt-4o-mini", api_key_env=KEY_ENV, timeout_s=5.0,
                            max_retries=0)
    return ApiProposer(config, environ={KEY_ENV: "sk-test"}, base_delay=0.01)


def test_an_llm_reviewer_reads_the_diff_and_may_veto(tmp_path):
    pytest.importorskip("openai")
    with ScriptedServer([chat("VETO: the schedule change is a bug (warmup of 0)"), error(401)]) as server:
        lab = _lab(tmp_path, reviewer=ApiReviewer(_client(server), "Be strict about schedules.", "critic"))
        run_single(lab, ScriptedProposer([constant_step("deeper", "DEPTH", 12),
                                        constant_step("lower lr", "MATRIX_LR", 0.02)]), max_experiments=2)
        asked = server.requests[0].body["messages"][-1]["content"]
    deeper, lower = lab.experiments()[1:]
    assert "Be strict about schedules." in asked and "+DEPTH = 12" in asked and "deeper" in asked
    assert deeper.status == "discard" and deeper.review == "veto by critic: the schedule change is a bug (warmup of 0)"
    assert lower.status == "keep" and lower.review.startswith("approve by critic: review failed")


def test_leads_rewrite_the_agenda(tmp_path):
    lab = _lab(tmp_path)
    run_single(lab, ScriptedProposer([constant_step("deeper", "DEPTH", 12), constant_step("wider", "ASPECT_RATIO", 128),
                                    constant_step("warmer", "WARMUP", 0.6)]), max_experiments=3)
    board = Board(lab.dir)
    said = StatsLead()(lab, board)
    items = board.items()
    assert said == "agenda rewritten: 8 items, 0 moves to avoid"
    assert items[0].startswith("DEPTH: try higher (1 tries, 1 kept, best gain +0.01")
    assert "WARMUP: try higher (1 tries, 0 kept" in "\n".join(items)  # "wider" conflicted with #2: asked again
    assert any(i.startswith("MATRIX_LR: try") and "untried" in i for i in items)
    pytest.importorskip("openai")
    with ScriptedServer([chat("# Agenda\n\n- MATRIX_LR: try 0.02\n- longer warmdown\n"), error(500)]) as server:
        lead = ApiLead(_client(server), "Focus on the optimizer.")
        assert lead(lab, board) == "agenda rewritten by lead"
        assert board.items() == ["MATRIX_LR: try 0.02", "longer warmdown"]
        asked = server.requests[0].body["messages"][-1]["content"]
        assert "Focus on the optimizer." in asked and "warmer" in asked and "DEPTH: try higher" in asked
        assert "failed" in lead(lab, board) and board.items() == ["MATRIX_LR: try 0.02", "longer warmdown"]
    assert context(lab).notes.count("MATRIX_LR: try 0.02") == 1
