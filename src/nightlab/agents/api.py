"""The ``api`` proposer: an LLM behind an API writes the edit as text, nightlab applies it.

Providers: ``openai`` (the ``openai`` SDK against any OpenAI-compatible endpoint: OpenAI itself,
or a local server through ``api.base_url``) and ``anthropic`` (the ``anthropic`` SDK). Both are
optional: ``pip install 'nightlab[api]'``. The reply format is in ``edits.REPLY_FORMAT``.

Rate limits (429), server errors (5xx), 408/409, timeouts and dropped connections are retried
with jittered exponential backoff that honours ``Retry-After``, up to ``api.max_retries`` times.
The SDKs' own retries are switched off: one ``tenacity`` policy here counts every retry, logs
it and can use a tiny base delay in tests. Anything else, and a reply that cannot be applied, is a
``ProposalError`` carrying what the call cost. The API key is read once from the environment
variable ``api.api_key_env`` and never appears in a message, log line or proposal.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from nightlab.config import API_PROVIDERS, ApiAgentConfig, ConfigError
from nightlab.agents import pricing
from nightlab.night.proposals import Context, Proposal, ProposalError
from nightlab.agents.edits import REPLY_FORMAT, apply_edits, parse_reply
from nightlab.agents.prompt import Prompt, build_prompt

log = logging.getLogger(__name__)

PROVIDERS = API_PROVIDERS
RETRY_STATUS = {408, 409, 429}  # and every 5xx
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
NO_KEY = "no-key"  # sent to local servers that need none (the SDK insists on some key)


@dataclass(frozen=True)
class Completion:
    text: str
    tokens_in: int | None  # None: the response said no usage
    tokens_out: int | None
    finish: str  # why generation stopped, as the provider says it (stop, length, end_turn, max_tokens)


class ApiProposer:
    """Asks an LLM for one experiment per ``propose`` and applies its edits to the worktree."""

    name = "api"

    def __init__(
        self,
        config: ApiAgentConfig,
        *,
        environ: Mapping[str, str] | None = None,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if config.provider not in PROVIDERS:
            raise ConfigError(f"api.provider = {config.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if not config.model:
            raise ConfigError('api.model is empty; name the model, e.g. api.model="gpt-4.1"')
        self.config = config
        self.base_delay, self.max_delay, self._sleep = base_delay, max_delay, sleep
        self._key = self._read_key(os.environ if environ is None else environ)
        self._sdk = _import_sdk(config.provider)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"ApiProposer(provider={self.config.provider!r}, model={self.config.model!r})"

    def propose(self, context: Context, worktree: Path) -> Proposal:
        prompt = build_prompt(context, REPLY_FORMAT)
        completion = self._complete(prompt)
        cost = _cost(self.config.model, completion.tokens_in, completion.tokens_out)
        spent = {"cost_usd": cost, "tokens_in": completion.tokens_in, "tokens_out": completion.tokens_out}
        try:
            reply = parse_reply(completion.text)
            apply_edits(Path(worktree), reply.edits, context.allowed_files)
        except ProposalError as e:
            hint = (
                " (the reply hit api.max_tokens and was cut off)"
                if completion.finish in ("length", "max_tokens")
                else ""
            )
            raise ProposalError(
                self._redact(f"{e.reason}{hint}; reply began: {completion.text[:200]!r}"), **spent
            ) from None
        return Proposal(description=reply.description, rationale=reply.rationale, **spent)

    def observe(self, proposal: Proposal, status: str, val_bpb: float | None) -> None:
        """The outcome reaches the model through the history in the next context."""

    def complete(self, prompt: Prompt) -> Completion:
        """One reply to ``prompt`` with the retries above (the org's reviewer and lead ask through this)."""
        return self._complete(prompt)

    # -- the call, with retries ------------------------------------------------------------

    def _complete(self, prompt: Prompt) -> Completion:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.max_retries + 1),
            retry=tenacity.retry_if_exception(lambda e: self._retry_reason(e) is not None),
            wait=self._wait,
            sleep=lambda seconds: self._sleep(seconds),  # looked up per call: tests swap it
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._request, prompt)
        except ProposalError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a retry or a ProposalError
            attempts = retrying.statistics.get("attempt_number", 1)
            tried = f" after {attempts} attempts" if attempts > 1 else ""
            raise ProposalError(self._redact(f"{self._where()}: {_describe(e)}{tried}")) from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        return self._delay(state.attempt_number - 1, state.outcome.exception())

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        reason = self._retry_reason(state.outcome.exception())
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: %s; retry %d of %d in %.2f s",
            self._where(), reason, state.attempt_number, self.config.max_retries, delay,
        )

    def _retry_reason(self, error: Exception) -> str | None:
        status = getattr(error, "status_code", None)
        if isinstance(error, self._sdk.APIStatusError) and isinstance(status, int):
            return f"HTTP {status}" if status in RETRY_STATUS or status >= 500 else None
        if isinstance(error, self._sdk.APITimeoutError):
            return f"no answer within {self.config.timeout_s:g} s"
        if isinstance(error, self._sdk.APIConnectionError):
            return "connection failed"
        return None

    def _delay(self, attempt: int, error: Exception) -> float:
        """Retry-After when the server sends one, else base * 2^attempt with jitter; capped."""
        headers = getattr(getattr(error, "response", None), "headers", None) or {}
        wait = _retry_after(headers)
        if wait is None:
            wait = self.base_delay * 2**attempt * random.uniform(0.5, 1.0)
        return min(max(wait, 0.0), self.max_delay)

    def _where(self) -> str:
        return f"{self.config.provider} model {self.config.model}"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if len(self._key) >= 4 else text

    def _read_key(self, environ: Mapping[str, str]) -> str:
        name = self.config.api_key_env
        if self.config.provider == "anthropic" and name == DEFAULT_KEY_ENV["openai"]:
            name = DEFAULT_KEY_ENV["anthropic"]  # the config's default names OpenAI's variable
        key = environ.get(name, "")
        if key:
            return key
        if self.config.base_url:
            return NO_KEY
        raise ConfigError(
            f"the api agent reads its key from the environment variable {name}, which is not set; "
            f"export {name}=... or name another variable with api.api_key_env"
        )

    # -- the providers ---------------------------------------------------------------------

    def _request(self, prompt: Prompt) -> Completion:
        if self._client is None:
            options: dict[str, Any] = {"api_key": self._key, "timeout": self.config.timeout_s, "max_retries": 0}
            if self.config.base_url:
                options["base_url"] = self.config.base_url
            self._client = (self._sdk.OpenAI if self.config.provider == "openai" else self._sdk.Anthropic)(**options)
        if self.config.provider == "openai":
            return self._openai(prompt)
        return self._anthropic(prompt)

    def _openai(self, prompt: Prompt) -> Completion:
        # OpenAI's own endpoint wants max_completion_tokens (its reasoning models refuse
        # max_tokens); local OpenAI-compatible servers know max_tokens.
        limit = "max_tokens" if self.config.base_url else "max_completion_tokens"
        response = self._client.chat.completions.create(
            model=self.config.model,
            messages=[{"role": "system", "content": prompt.system}, {"role": "user", "content": prompt.user}],
            **{limit: self.config.max_tokens},
        )
        try:
            choice = response.choices[0]
            text, finish = choice.message.content, choice.finish_reason or ""
        except (AttributeError, IndexError, TypeError):
            raise ProposalError(
                f"{self._where()}: the response is not a chat completion (no choices[0].message)"
            ) from None
        usage = getattr(response, "usage", None)
        return self._completion(
            text, getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None), finish
        )

    def _anthropic(self, prompt: Prompt) -> Completion:
        response = self._client.messages.create(
            model=self.config.model,
            max_tokens=self.config.max_tokens,
            system=prompt.system,
            messages=[{"role": "user", "content": prompt.user}],
        )
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise ProposalError(f"{self._where()}: the response has no content blocks")
        text = "".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", "") == "text")
        usage = getattr(response, "usage", None)
        finish = getattr(response, "stop_reason", "") or ""
        return self._completion(text, getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None),
                                finish)

    def _completion(self, text: Any, tokens_in: Any, tokens_out: Any, finish: str) -> Completion:
        tokens_in, tokens_out = _tokens(tokens_in), _tokens(tokens_out)
        if not isinstance(text, str) or not text.strip():
            cost = _cost(self.config.model, tokens_in, tokens_out)
            raise ProposalError(
                f"{self._where()}: empty reply (finish: {finish or 'unknown'})",
                cost_usd=cost,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
            )
        return Completion(text, tokens_in, tokens_out, finish)


def _tokens(count: Any) -> int | None:
    """A usage count as an int; None where the response gave none (unknown, never 0)."""
    return int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) else None


def _cost(model: str, tokens_in: int | None, tokens_out: int | None) -> float | None:
    return None if tokens_in is None or tokens_out is None else pricing.cost_usd(model, tokens_in, tokens_out)


def _import_sdk(provider: str) -> Any:
    try:
        if provider == "openai":
            import openai as sdk  # deferred: optional SDK (nightlab[api])
        else:
            import anthropic as sdk  # deferred: optional SDK (nightlab[api])
    except ImportError:
        raise ConfigError(
            f"the api agent with provider {provider} needs the {provider} package: pip install 'nightlab[api]'"
        ) from None
    return sdk


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            moment = email.utils.parsedate_to_datetime(value)
            return moment.timestamp() - time.time()
    except (TypeError, ValueError, OverflowError):
        return None


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    message = str(error).strip() or type(error).__name__
    head = f"HTTP {status}: " if isinstance(status, int) else f"{type(error).__name__}: "
    return head + message[:500]
