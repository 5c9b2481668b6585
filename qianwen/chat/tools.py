"""Tool calling: prompt rendering and answer parsing for the Hermes and ReAct formats.

Hermes (Qwen2.5 and later, and our default for every other model) lists the tools as JSON inside
`<tools></tools>` in the system turn and expects `<tool_call>{"name": ..., "arguments": ...}</tool_call>`;
`render_hermes` reproduces the official Qwen2.5-Instruct template character for character.
ReAct (the original Qwen-7B-Chat) describes the tools in the last user turn and expects
`Action:` / `Action Input:` lines, stopping at `Observation:` (the QwenLM `openai_api.py` scheme).
Parsers never raise: text that is not a well-formed call stays plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..generation.constrain import lark_json, with_thinking
from .template import QWEN25_SYSTEM, QWEN_DEFAULT_SYSTEM

DEFAULT_SYSTEM = QWEN_DEFAULT_SYSTEM

HERMES_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

REACT_TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} "
    "API useful for? {description_for_model} Parameters: {parameters} Format the arguments as a JSON object."
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following tools:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
REACT_STOP = "Observation:"


@dataclass
class ToolCall:
    """One parsed call, in OpenAI's shape: `arguments` is a JSON string."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = new_call_id()

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_format(default: str, template_source: str | None) -> str:
    """Which prompt format a model gets for tools: "template" when its template handles tools, else
    its architecture's `default` ("hermes" or "react", qianwen/models/registry.py)."""
    if template_source and re.search(r"\btools\b", template_source):
        return "template"
    return default


def prepare_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy OpenAI messages into the form templates expect: text content, tool-call arguments as objects.

    OpenAI sends `arguments` as a JSON string; templates (Qwen's included) render them with `tojson`,
    so they are parsed back to objects first, as vLLM does. Content given as a list of parts is joined.
    """
    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                tc = json.loads(json.dumps(tc))  # deep copy of plain data
                fn = tc.get("function", tc)
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass  # keep the string: rendered as a JSON string
                calls.append(tc)
            m["tool_calls"] = calls
        out.append(m)
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def render_hermes(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  default_system: str = QWEN25_SYSTEM, add_generation_prompt: bool = True) -> str:
    """The Qwen2.5-Instruct chat template (tests/data/qwen2.5-instruct.jinja), in Python."""
    out: list[str] = []
    has_system = bool(messages) and messages[0].get("role") == "system"
    system = _text(messages[0].get("content")) if has_system else default_system
    if tools:
        out.append("<|im_start|>system\n" + system + HERMES_TOOLS_HEADER)
        out.extend("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        out.append(HERMES_TOOLS_FOOTER)
    else:
        out.append("<|im_start|>system\n" + system + "<|im_end|>\n")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user" or (role == "system" and i > 0) or (role == "assistant" and not m.get("tool_calls")):
            out.append(f"<|im_start|>{role}\n{_text(m.get('content'))}<|im_end|>\n")
        elif role == "assistant":
            out.append("<|im_start|>assistant")
            if m.get("content"):
                out.append("\n" + _text(m["content"]))
            for tc in m["tool_calls"]:
                fn = tc.get("function", tc)
                args = json.dumps(fn.get("arguments"), ensure_ascii=False)
                out.append(f'\n<tool_call>\n{{"name": "{fn.get("name")}", "arguments": {args}}}\n</tool_call>')
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i == 0 or messages[i - 1].get("role") != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + _text(m.get("content")) + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _react_instruction(tools: list[dict[str, Any]]) -> str:
    descs, names = [], []
    for t in tools:
        fn = t.get("function", t)
        name = fn.get("name", "")
        descs.append(REACT_TOOL_DESC.format(
            name_for_model=fn.get("name_for_model", name), name_for_human=fn.get("name_for_human", name),
            description_for_model=fn.get("description_for_model", fn.get("description", "")),
            parameters=json.dumps(fn.get("parameters", {}), ensure_ascii=False)))
        names.append(fn.get("name_for_model", name))
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(descs), tool_names=", ".join(names))


def _args_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def render_react(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 default_system: str = DEFAULT_SYSTEM) -> str:
    """A ChatML prompt in Qwen-7B-Chat's ReAct scheme (QwenLM openai_api.py `parse_messages`).

    Tool results become `Observation:` lines inside the assistant turn; when the conversation ends on a
    tool result, the assistant turn is left open after `Thought:` so the model continues it.
    """
    system = default_system
    turns: list[list[str]] = []  # [role, content]
    for i, m in enumerate(messages):
        role, content = m.get("role"), _text(m.get("content")).lstrip("\n").rstrip()
        if role == "system":
            if i == 0:
                system = content
            else:
                turns.append(["user", content])
        elif role == "user":
            turns.append(["user", content])
        elif role == "tool":
            if not turns or turns[-1][0] != "assistant":
                turns.append(["assistant", ""])
            turns[-1][1] += f"\nObservation: {content}"
        elif role == "assistant":
            if m.get("tool_calls"):
                text = content if content.startswith("Thought:") else f"Thought: {content}"
                for tc in m["tool_calls"]:
                    fn = tc.get("function", tc)
                    text += f"\nAction: {fn.get('name')}\nAction Input: {_args_text(fn.get('arguments'))}"
            elif tools:
                text = f"Thought: I now know the final answer.\nFinal Answer: {content}"
            else:
                text = content
            if turns and turns[-1][0] == "assistant":
                turns[-1][1] += "\n" + text
            else:
                turns.append(["assistant", text])
    open_assistant = bool(turns) and turns[-1][0] == "assistant" and messages[-1].get("role") == "tool"
    if open_assistant:
        turns[-1][1] += "\nThought:"
    if tools:  # the instruction goes in front of the last user question
        last_user = max((k for k, t in enumerate(turns) if t[0] == "user"), default=None)
        if last_user is not None:
            turns[last_user][1] = f"{_react_instruction(tools)}\n\nQuestion: {turns[last_user][1]}"
    out = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for k, (role, content) in enumerate(turns):
        content = content.lstrip("\n")
        if open_assistant and k == len(turns) - 1:
            out.append(f"<|im_start|>{role}\n{content}")
        else:
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if not open_assistant:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ---------------------------------------------------------------- constraints

def _functions(tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    fns = [t.get("function", t) for t in tools]
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        fns = [f for f in fns if f.get("name") == name]
    return fns


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object", "properties": {}}


def call_grammar(fmt: str, tools: list[dict[str, Any]], tool_choice: Any, parallel: bool = True,
                 think: bool = False, in_thought: bool = False) -> str | None:
    """A Lark grammar (llguidance) that makes tool calls well-formed, with arguments matching each
    function's `parameters` schema. `tool_choice` "required" or a named function: the answer is calls
    only; "auto" (or None): plain text, or text followed by calls (a started call is constrained).
    Without tools, or with "none": None. `think`: a Qwen3 `<think>` block comes first. `in_thought`: a
    ReAct prompt that ends in `Thought:` (continuing after a tool result)."""
    if not tools or tool_choice == "none":
        return None
    fns = _functions(tools, tool_choice)
    forced = tool_choice == "required" or isinstance(tool_choice, dict)
    rules = [f"f{i}: " + lark_json({"type": "object", "properties": {"name": {"const": f["name"]},
                                                                      "arguments": _params(f)},
                                    "required": ["name", "arguments"], "additionalProperties": False})
             for i, f in enumerate(fns)]
    alts = " | ".join(f"f{i}" for i in range(len(fns)))
    if fmt == "react":  # Thought: ... / Action: name / Action Input: {...} / Observation:
        rules = [f"f{i}: " + json.dumps(f"Action: {f['name']}\nAction Input: ") + " " + lark_json(_params(f))
                 for i, f in enumerate(fns)]
        action = f'react_thought ({alts}) "\\n{REACT_STOP}"'
        body = action if forced else f'react_thought (({alts}) "\\n{REACT_STOP}" | "Final Answer:" answer)'
        start = "" if in_thought else '"Thought:" '
        rules += [f'react_thought: {start}/[^\\n]*/ "\\n"', 'answer[stop=""]: /(?s:.*)/']
        rules.append("body: " + body)
        return with_thinking("\n".join(rules)) if think else "start: body\n" + "\n".join(rules)
    more = ' ("\\n" call)*' if parallel else ""
    rules += [f'args: "\\n" ({alts}) "\\n{TOOL_CALL_CLOSE}"', f'call: "{TOOL_CALL_OPEN}" args']
    if forced:
        rules.append("body: call" + more)
    else:
        rules += ["body: text | prose args" + more, 'text[stop=""]: /(?s:.*)/',
                  f'prose[stop="{TOOL_CALL_OPEN}"]: /(?s:.*)/']
    return with_thinking("\n".join(rules)) if think else "start: body\n" + "\n".join(rules)


# ---------------------------------------------------------------- parsing

def _parse_call_json(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # a JSON string inside the JSON: parse once more
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, ValueError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split an answer into content and `<tool_call>` blocks. Bad blocks stay in the content."""
    parser = HermesStreamParser()
    deltas = parser.feed(text) + parser.finish()
    return _collect(deltas)


def _react_call(name: str, raw_args: str) -> ToolCall | None:
    if not name:
        return None
    try:
        args = json.loads(raw_args) if raw_args else {}
    except (json.JSONDecodeError, ValueError):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


def parse_react(text: str) -> tuple[str | None, list[ToolCall]]:
    """`Thought/Action/Action Input` to one call (content is the thought); else the Final Answer."""
    t = "\n" + text  # so an answer that starts with "Action:" is found too
    i, j = t.find("\nAction:"), t.find("\nAction Input:")
    if 0 <= i < j:
        k = t.find("\n" + REACT_STOP, j)
        call = _react_call(t[i + len("\nAction:"):j].strip(),
                           t[j + len("\nAction Input:"):k if k >= 0 else len(t)].strip())
        if call is not None:
            return (t[1:i].strip() or None) if i > 0 else None, [call]
    z = text.rfind("Final Answer:")
    if z >= 0:
        text = text[z + len("Final Answer:"):].lstrip(" ")
    return (text or None), []


def _collect(deltas: list[dict[str, Any]]) -> tuple[str | None, list[ToolCall]]:
    content = "".join(d["content"] for d in deltas if "content" in d)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            fn = tc.get("function", {})
            if tc["index"] not in calls:
                calls[tc["index"]] = ToolCall(fn.get("name", ""), "", tc.get("id", ""))
            calls[tc["index"]].arguments += fn.get("arguments", "")
    return (content or None), [calls[k] for k in sorted(calls)]


class HermesStreamParser:
    """Turns streamed answer text into OpenAI chat deltas: `{"content": s}` or `{"tool_calls": [...]}`.

    Content is passed on as it comes, except a tail that could start `<tool_call>`; whitespace next to
    a call is dropped. A complete block becomes two deltas (id + name, then the arguments), as OpenAI
    streams them; a block that is not valid JSON is passed on as content.
    """

    def __init__(self) -> None:
        self.buf = ""
        self.in_call = False
        self.calls = 0
        self.pending_ws = ""  # whitespace held back: dropped if a call follows
        self.after_call = False

    def _content(self, text: str) -> list[dict[str, Any]]:
        if self.after_call:
            text = text.lstrip()
            if text:
                self.after_call = False
        if not text:
            return []
        text = self.pending_ws + text
        stripped = text.rstrip()
        self.pending_ws = text[len(stripped):]
        return [{"content": stripped}] if stripped else []

    def _call(self, body: str) -> list[dict[str, Any]]:
        call = _parse_call_json(body.strip())
        if call is None:
            return self._content(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
        idx, self.calls = self.calls, self.calls + 1
        self.pending_ws, self.after_call = "", True
        return [{"tool_calls": [{"index": idx, "id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": ""}}]},
                {"tool_calls": [{"index": idx, "function": {"arguments": call.arguments}}]}]

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buf += text
        out: list[dict[str, Any]] = []
        while True:
            if self.in_call:
                k = self.buf.find(TOOL_CALL_CLOSE)
                if k < 0:
                    return out
                out += self._call(self.buf[:k])
                self.buf, self.in_call = self.buf[k + len(TOOL_CALL_CLOSE):], False
                continue
            k = self.buf.find(TOOL_CALL_OPEN)
            if k >= 0:
                out += self._content(self.buf[:k])
                self.buf, self.in_call = self.buf[k + len(TOOL_CALL_OPEN):], True
                continue
            keep = _partial_suffix(self.buf, TOOL_CALL_OPEN)
            out += self._content(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return out

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.in_call:  # an unclosed block at the end: a call if it parses, else text
            call = _parse_call_json(self.buf.strip())
            if call is not None:
                out += self._call(self.buf)
            else:
                out += self._content(TOOL_CALL_OPEN + self.buf)
        else:
            out += self._content(self.buf)
        self.buf = ""
        if self.pending_ws and not self.calls:
            out.append({"content": self.pending_ws})
        self.pending_ws = ""
        return out

    @property
    def has_calls(self) -> bool:
        return self.calls > 0


class ReactStreamParser:
    """ReAct answers stream as content only after `Final Answer:`; calls are decided at the end."""

    def __init__(self) -> None:
        self.text = ""
        self.streamed = 0  # chars of self.text already sent as content (after Final Answer:)
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        if "\nAction:" in self.text or self.text.startswith("Action:"):
            return []  # decide at the end
        z = self.text.rfind("Final Answer:")
        if z < 0:
            return []
        start = max(self.streamed, z + len("Final Answer:"))
        if self.streamed == 0:
            while start < len(self.text) and self.text[start] == " ":
                start += 1
            if start >= len(self.text):
                return []
        piece, self.streamed = self.text[start:], len(self.text)
        return [{"content": piece}] if piece else []

    def finish(self) -> list[dict[str, Any]]:
        if self.streamed:
            return []
        content, calls = parse_react(self.text)
        self.calls = len(calls)
        out: list[dict[str, Any]] = [{"content": content}] if content else []
        for idx, c in enumerate(calls):
            out.append({"tool_calls": [{"index": idx, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": idx, "function": {"arguments": c.arguments}}]})
        return out

    @property
    def has_calls(self) -> bool:
        return self.calls > 0


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def stream_parser(fmt: str) -> HermesStreamParser | ReactStreamParser:
    return ReactStreamParser() if fmt == "react" else HermesStreamParser()


def parse_tool_calls(fmt: str, text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_react(text) if fmt == "react" else parse_hermes(text)
