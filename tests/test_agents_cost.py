"""What the agents cost: recorded for every proposal (unknown stays unknown), reported per kept
gain, and ``run.max_cost_usd`` stops new proposals once spent. The simulated lab with real git-like
history and a real store; the agent is scripted, its cost set as an LLM's would be."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fixtures.standin.helpers import constant_step
from nightlab.agents.scripted import ScriptedProposer
from nightlab.night.proposals import Proposal
from nightlab.night.scheduler import Researcher, Scheduler
from nightlab.report import markdown
from nightlab.report.data import costs, load_night
from test_scheduler import _simulated_lab, _workers


class Priced(ScriptedProposer):
    """The scripted researcher, each proposal costing what an LLM call would (None: not reported)."""

    def __init__(self, steps, usd: float | None) -> None:
        super().__init__(steps)
        self.usd = usd

    def propose(self, context, worktree: Path) -> Proposal:
        proposal = super().propose(context, worktree)
        tokens = None if self.usd is None else 1000
        return replace(proposal, cost_usd=self.usd, tokens_in=tokens, tokens_out=tokens)


STEPS = [constant_step(f"lr {v}", "MATRIX_LR", v) for v in (0.03, 0.02, 0.015, 0.01, 0.005)]


def test_max_cost_usd_stops_new_proposals_once_spent(tmp_path):
    lab = _simulated_lab(tmp_path, seconds=0.05)
    lab.config = lab.config.with_overrides(["run.max_cost_usd=0.25"])
    told = []
    lab.say = told.append
    agent = Priced(STEPS, usd=0.1)
    Scheduler(lab, [Researcher("a", agent)], _workers(lab, 1)).run(max_experiments=5)
    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    assert len(agent.contexts) == len(rows) == 3  # $0.10, $0.20, $0.30: the third reached the limit
    assert lab.store.cost_usd(lab.run.tag) == sum(e.cost_usd for e in rows)
    assert sum("run.max_cost_usd = $0.25: no new proposals" in line for line in told) == 1


def test_an_agent_that_does_not_report_its_cost_is_unknown_never_zero(tmp_path):
    lab = _simulated_lab(tmp_path, seconds=0.05)
    Scheduler(lab, [Researcher("a", Priced(STEPS[:2], usd=None))], _workers(lab, 1)).run(max_experiments=2)
    rows = [e for e in lab.experiments() if e.kind == "experiment"]
    assert [(e.cost_usd, e.tokens_in) for e in rows] == [(None, None)] * 2
    night = load_night(lab.dir)
    spent = costs(night.rows)
    assert spent.usd == 0.0 and spent.unknown == 2
    assert "2 proposal(s) of agents that do not report their cost are not counted" in markdown.render_markdown(night)


def test_the_report_counts_the_repeats_it_refused(tmp_path):
    lab = _simulated_lab(tmp_path, seconds=0.05)
    twice = [constant_step("lr", "MATRIX_LR", 0.02), constant_step("lr again", "MATRIX_LR", 0.02)]
    Scheduler(lab, [Researcher("a", Priced(twice, usd=0.1))], _workers(lab, 1)).run(max_experiments=2)
    text = markdown.render_markdown(load_night(lab.dir))
    assert "$0.20 (2,000 tokens in, 2,000 out)" in text and "1 proposal(s) refused as repeats, never trained" in text


def test_the_report_gives_the_cost_per_kept_gain(tmp_path):
    lab = _simulated_lab(tmp_path, seconds=0.05)
    Scheduler(lab, [Researcher("a", Priced(STEPS[1:2], usd=0.5))], _workers(lab, 1)).run(max_experiments=1)
    night = load_night(lab.dir)
    spent = costs(night.rows)
    (kept,) = [r for r in night.rows if r.status == "keep" and r.exp.kind == "experiment"]
    assert spent.gain == night.baseline.exp.val_bpb - kept.exp.val_bpb > 0
    assert spent.usd_per_milli_bpb == 0.5 / (spent.gain * 1000)
    assert f"${spent.usd_per_milli_bpb:.2f} per 0.001 val_bpb gained" in markdown.render_markdown(night)


def test_an_api_model_without_a_price_or_a_usage_is_unknown_cost(tmp_path):
    from fixtures.agents.llm_server import ScriptedServer, chat
    from nightlab.agents.api import ApiProposer
    from nightlab.config import ApiAgentConfig
    from nightlab.night.proposals import Context

    reply = ("DESCRIPTION: double the learning rate\nRATIONALE: faster\n\n```\n<<<<<<< SEARCH train.py\n"
             "LR = 0.01\n=======\nLR = 0.02\n>>>>>>> REPLACE\n```\n")
    no_usage = chat(reply)
    del no_usage.body["usage"]
    ctx = Context(program="", best_source={"train.py": "LR = 0.01\n"}, history="")
    for model, scripted, expected in (("my-local-model", chat(reply, 1000, 200), (None, 1000, 200)),
                                      ("gpt-4o-mini", no_usage, (None, None, None))):
        (tmp_path / "train.py").write_text("LR = 0.01\n")
        with ScriptedServer([scripted]) as server:
            config = ApiAgentConfig(base_url=server.url + "/v1", model=model, api_key_env="KEY", timeout_s=5.0)
            proposal = ApiProposer(config, environ={"KEY": "k"}, base_delay=0.01).propose(ctx, tmp_path)
        assert (proposal.cost_usd, proposal.tokens_in, proposal.tokens_out) == expected, model
