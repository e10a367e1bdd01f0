"""The api proposer end to end against scripted LLM servers on 127.0.0.1."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "agents"))

from llm_server import Scripted, ScriptedServer, chat, error, message  # noqa: E402

from nightlab.config import ApiAgentConfig, Config, ConfigError  # noqa: E402
from nightlab import agents  # noqa: E402
from nightlab.agents import pricing  # noqa: E402
from nightlab.agents.api import ApiProposer  # noqa: E402
from nightlab.night.proposals import Context, ProposalError# noqa: E402
from nightlab.agents.edits import REPLY_FORMAT  # noqa: E402

CANARY = "sk-canary-7f3a9c1e5b2d4680"
KEY_ENV = "NIGHTLAB_TEST_KEY"
TRAIN = "import math\n\nLR = 0.01  # learning rate\nDEPTH = 4  # layers\n"
GOOD_REPLY = """DESCRIPTION: double the learning rate
RATIONALE: the loss curve is still falling steeply at the end,
so a larger step should help.

```
<<<<<<< SEARCH train.py
LR = 0.01  # learning rate
=======
LR = 0.02  # learning rate
>>>>>>> REPLACE
```
"""


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    (tmp_path / "train.py").write_text(TRAIN)
    return tmp_path


@pytest.fixture(autouse=True)
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the SDKs' and HTTP libraries' debug logs included
    return caplog


def context() -> Context:
    return Context(
        program="Lower val_bpb. Be bold.",
        best_source={"train.py": TRAIN},
        history="#1 keep 1.234567 baseline",
        notes="agenda: try learning rates",
        last_error="Traceback: CUDA out of memory",
        best_val_bpb=1.234567,
        noise=0.0012,
    )


def openai_proposer(server: ScriptedServer, **config: object) -> ApiProposer:
    options = {"base_url": server.url + "/v1", "model": "gpt-4o-mini", "api_key_env": KEY_ENV, "timeout_s": 5.0}
    options.update(config)
    return ApiProposer(ApiAgentConfig(**options), environ={KEY_ENV: CANARY}, base_delay=0.01)


def assert_no_key(*texts: str) -> None:
    for text in texts:
        assert CANARY not in text


def test_openai_compatible_happy_path(worktree: Path, all_logs: pytest.LogCaptureFixture) -> None:
    with ScriptedServer([chat(GOOD_REPLY, prompt_tokens=1000, completion_tokens=200)]) as server:
        proposal = openai_proposer(server).propose(context(), worktree)
    assert (worktree / "train.py").read_text() == TRAIN.replace("LR = 0.01", "LR = 0.02")
    assert proposal.description == "double the learning rate"
    assert proposal.rationale.startswith("the loss curve is still falling")
    assert (proposal.tokens_in, proposal.tokens_out) == (1000, 200)
    assert proposal.cost_usd == pytest.approx((1000 * 0.15 + 200 * 0.60) / 1e6)
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {CANARY}"  # the key is sent, only there
    assert request.body["model"] == "gpt-4o-mini" and request.body["max_tokens"] == 8192
    system, user = request.body["messages"]
    assert system["role"] == "system" and "val_bpb" in system["content"]
    for part in (
        "Lower val_bpb. Be bold.",
        "#1 keep 1.234567",
        "agenda: try learning rates",
        "CUDA out of memory",
        "1.234567",
        "0.001200",
        TRAIN.strip(),
        REPLY_FORMAT.strip(),
    ):
        assert part in user["content"], part
    assert_no_key(all_logs.text, repr(proposal), *(p.read_text() for p in worktree.iterdir()))


def test_rate_limit_server_error_and_stall_are_retried(worktree: Path, all_logs: pytest.LogCaptureFixture) -> None:
    script = [
        error(429, "slow down", headers={"Retry-After": "0.05"}),
        error(500, "internal"),
        Scripted(delay=1.5, body=chat(GOOD_REPLY).body),  # answers after the client gave up
        chat(GOOD_REPLY, prompt_tokens=10, completion_tokens=5),
    ]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    with ScriptedServer(script) as server:
        proposer = openai_proposer(server, timeout_s=0.3, max_retries=3)
        proposer._sleep = sleep
        started = time.monotonic()
        proposal = proposer.propose(context(), worktree)
        elapsed = time.monotonic() - started
    assert len(server.requests) == 4
    assert sleeps[0] == pytest.approx(0.05)  # Retry-After honoured
    assert 0.01 * 2 * 0.5 <= sleeps[1] <= 0.01 * 2 and 0.01 * 4 * 0.5 <= sleeps[2] <= 0.01 * 4  # jittered backoff
    assert elapsed < 1.5  # the stalled answer was not waited for
    assert proposal.description == "double the learning rate" and proposal.tokens_in == 10
    assert "LR = 0.02" in (worktree / "train.py").read_text()
    retries = [r.getMessage() for r in all_logs.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and "HTTP 429" in retries[0] and "HTTP 500" in retries[1] and "0.3 s" in retries[2]
    assert_no_key(all_logs.text)


def test_retries_give_up_with_a_proposal_error(worktree: Path) -> None:
    with ScriptedServer([error(503, "overloaded"), error(502, "bad gateway")]) as server:
        with pytest.raises(ProposalError, match=r"HTTP 502.*after 2 attempts"):
            openai_proposer(server, max_retries=1).propose(context(), worktree)
    assert len(server.requests) == 2
    assert (worktree / "train.py").read_text() == TRAIN


def test_auth_error_is_not_retried_and_never_shows_the_key(worktree: Path, all_logs: pytest.LogCaptureFixture) -> None:
    with ScriptedServer([error(401, f"Incorrect API key provided: {CANARY}")]) as server:
        with pytest.raises(ProposalError) as caught:
            openai_proposer(server).propose(context(), worktree)
    assert len(server.requests) == 1
    assert "HTTP 401" in str(caught.value) and "[api key]" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no SDK error chained
    assert_no_key(str(caught.value), repr(caught.value), caught.value.reason, all_logs.text)


MALFORMED = [
    pytest.param(
        chat("Here is my idea: raise the LR.\n" + GOOD_REPLY.split("\n", 2)[2]), "DESCRIPTION", id="no-description"
    ),
    pytest.param(chat("DESCRIPTION: x\nRATIONALE: y\n"), "no SEARCH/REPLACE or FILE block", id="no-edit"),
    pytest.param(
        chat(GOOD_REPLY.replace("LR = 0.01  # learning rate\n=", "LR = 0.5\n=")), "does not occur", id="no-match"
    ),
    pytest.param(
        chat(GOOD_REPLY.replace("SEARCH train.py", "SEARCH lab.py")), "only train.py may be edited", id="other-file"
    ),
    pytest.param(chat(GOOD_REPLY.replace(">>>>>>> REPLACE", "")), "not closed", id="unclosed"),
    pytest.param(chat(None, finish="length"), "empty reply", id="empty"),
    pytest.param(Scripted(body="<html>not json</html>"), "not a chat completion", id="not-json"),
    pytest.param(Scripted(body={"id": "x", "object": "chat.completion"}), "not a chat completion", id="no-choices"),
]


@pytest.mark.parametrize("scripted, reason", MALFORMED)
def test_malformed_replies_are_proposal_errors(worktree: Path, scripted: Scripted, reason: str) -> None:
    with ScriptedServer([scripted]) as server:
        with pytest.raises(ProposalError, match=reason) as caught:
            openai_proposer(server, max_retries=0).propose(context(), worktree)
    assert (worktree / "train.py").read_text() == TRAIN  # nothing half-applied
    assert len(server.requests) == 1
    if scripted.body and isinstance(scripted.body, dict) and scripted.body.get("usage"):
        assert caught.value.tokens_in == 1000 and caught.value.cost_usd > 0  # the failed call still cost


def test_anthropic_messages_happy_path(worktree: Path, all_logs: pytest.LogCaptureFixture) -> None:
    config = ApiAgentConfig(provider="anthropic", model="claude-sonnet-4-20250514", api_key_env=KEY_ENV, timeout_s=5.0)
    with ScriptedServer([message(GOOD_REPLY, input_tokens=2000, output_tokens=300)]) as server:
        config = ApiAgentConfig(**{**config.__dict__, "base_url": server.url})
        proposal = ApiProposer(config, environ={KEY_ENV: CANARY}).propose(context(), worktree)
    [request] = server.requests
    assert request.path == "/v1/messages"
    sent = {request.headers.get("x-api-key"), request.headers.get("authorization")}
    assert CANARY in sent or f"Bearer {CANARY}" in sent  # SDK versions differ in the header
    assert "val_bpb" in request.body["system"] and request.body["max_tokens"] == 8192
    assert "Lower val_bpb" in request.body["messages"][0]["content"]
    assert proposal.description == "double the learning rate" and "LR = 0.02" in (worktree / "train.py").read_text()
    assert proposal.cost_usd == pytest.approx(pricing.cost_usd("claude-sonnet-4", 2000, 300)) and proposal.cost_usd > 0
    assert_no_key(all_logs.text)


def test_factory_and_configuration_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        agents.create("api", Config().with_overrides(["api.model=gpt-4.1"]), tmp_path)
    with pytest.raises(ConfigError, match="api.model"):
        agents.create("api", Config(), tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    proposer = agents.create("api", Config().with_overrides(["api.model=gpt-4.1"]), tmp_path)
    assert proposer.name == "api"
    assert_no_key(repr(proposer), str(vars(proposer).get("config")))
    local = agents.create(
        "api", Config().with_overrides(["api.model=qwen", "api.base_url=http://127.0.0.1:1/v1"]), tmp_path
    )
    assert local.name == "api"  # a local server needs no key


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # as if not installed
    config = ApiAgentConfig(provider="anthropic", model="claude-sonnet-4", api_key_env=KEY_ENV)
    with pytest.raises(ConfigError, match=r"pip install 'nightlab\[api\]'"):
        ApiProposer(config, environ={KEY_ENV: CANARY})


def test_price_table_matches_model_families() -> None:
    assert pricing.price("claude-opus-4-5-20251101") == (5.0, 25.0)
    assert pricing.price("claude-opus-4-1") == (15.0, 75.0)
    assert pricing.price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert pricing.price("my-local-model") is None and pricing.cost_usd("my-local-model", 10**6, 10**6) is None
