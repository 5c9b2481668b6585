"""Keep a conversation inside the context window: drop the oldest turns, keep the system prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fit_history(messages: list[dict[str, Any]], count: Callable[[list[dict[str, Any]]], int],
                budget: int) -> list[dict[str, Any]]:
    """The longest suffix of the turns (after any system message) whose prompt fits in `budget` tokens.
    The last message always stays; whole user/assistant exchanges go first."""
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = messages[len(system):]
    while len(turns) > 1 and count(system + turns) > budget:
        # drop up to the next user message so the history starts with a user turn
        cut = next((i for i in range(1, len(turns)) if turns[i].get("role") == "user"), 1)
        turns = turns[cut:]
    return system + turns
