"""What an LLM call cost: a small table of list prices, in US dollars per million tokens.

A model matches the longest entry its name starts with, so dated names
(``claude-sonnet-4-20250514``) find their family. An unknown model (a local server, a new name)
has an unknown cost, None, never a made-up 0: its tokens are still recorded, and a price can be
added here.
"""

from __future__ import annotations

# model name prefix -> (input, output) USD per million tokens, at the providers' list prices.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o3-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-opus-4-5": (5.00, 25.00),
    "claude-opus-4": (15.00, 75.00),
}


def price(model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens for ``model``, None when unknown."""
    matches = [prefix for prefix in PRICES if model.startswith(prefix)]
    return PRICES[max(matches, key=len)] if matches else None


def cost_usd(model: str, tokens_in: int, tokens_out: int) -> float | None:
    known = price(model)
    if known is None:
        return None
    return (tokens_in * known[0] + tokens_out * known[1]) / 1e6
