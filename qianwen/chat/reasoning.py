"""Qwen3's thinking mode: the answer's `<think>...</think>` block is reasoning, kept apart from the content.

Qwen3 templates (tests/data/qwen3.jinja) take `enable_thinking` (False renders an empty think block in the
prompt, so the model answers directly) and honour `/think` and `/no_think` in user turns. The model
writes `<think>\\n...\\n</think>\\n\\n` before its answer; `ReasoningParser` splits a streamed answer into
`reasoning_content` and `content` deltas, as vLLM's qwen3 reasoning parser does: text only counts as
reasoning when the answer starts with `<think>` (or the prompt already opened one).
"""

from __future__ import annotations

from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def template_thinks(template_source: str | None) -> bool:
    """Whether a chat template writes (or expects) `<think>` blocks."""
    return bool(template_source) and THINK_OPEN in template_source


def prompt_opens_thinking(prompt_text: str) -> bool:
    """A prompt that ends inside an open think block (templates that force thinking)."""
    k = prompt_text.rfind(THINK_OPEN)
    return k >= 0 and THINK_CLOSE not in prompt_text[k:]


def thinking_allowed(prompt_text: str) -> bool:
    """False when the prompt already closed an (empty) think block for this turn (enable_thinking=False)."""
    tail = prompt_text.rstrip()
    return not tail.endswith(THINK_CLOSE)


def _partial(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Streamed answer text -> [{"reasoning_content": s} | {"content": s}] deltas."""

    def __init__(self, in_think: bool = False) -> None:
        self.state = "think" if in_think else "start"  # start -> think -> after -> content
        self.buf = ""
        self.fresh = True  # at the start of the think block: its leading newline is dropped

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while self.buf:
            if self.state == "start":  # does the answer open a think block?
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state = s[len(THINK_OPEN):].lstrip("\n"), "think"
                elif THINK_OPEN.startswith(s):
                    return out  # not decided yet
                else:
                    self.state = "content"
            elif self.state == "think":
                if self.fresh:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        return out
                    self.fresh = False
                k = self.buf.find(THINK_CLOSE)
                if k >= 0:
                    piece = self.buf[:k].rstrip("\n")
                    if piece:
                        out.append({"reasoning_content": piece})
                    self.buf, self.state = self.buf[k + len(THINK_CLOSE):], "after"
                    continue
                keep = _partial(self.buf, THINK_CLOSE)
                keep += len(self.buf[:len(self.buf) - keep]) - len(self.buf[:len(self.buf) - keep].rstrip("\n"))
                piece, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if piece:
                    out.append({"reasoning_content": piece})
                return out
            elif self.state == "after":  # the blank lines between </think> and the answer
                self.buf = self.buf.lstrip()
                if self.buf:
                    self.state = "content"
            else:
                out.append({"content": self.buf})
                self.buf = ""
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The rest: an unfinished think block stays reasoning; an undecided start is content."""
        out: list[dict[str, Any]] = []
        if self.buf:
            key = "reasoning_content" if self.state == "think" else "content"
            text = self.buf if self.buf.strip() else ""
            if text:
                out.append({key: text})
        self.buf = ""
        return out


def split_reasoning(text: str, in_think: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole answer."""
    p = ReasoningParser(in_think)
    deltas = p.feed(text) + p.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    return (reasoning or None), content
