"""`qianwen chat`: an interactive chat in the terminal, streaming answers.

When stdin is not a terminal, each input line is one user turn: the answer is printed and the
program exits at the end of input.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_options
from .structured import add_structured_args, structured_options

HELP = """Commands:
  /help            show this help
  /clear           forget the conversation (keeps the system prompt)
  /system [TEXT]   set the system prompt (no text: remove it)
  /exit            quit (also /quit, /bye, Ctrl-D)
Ctrl-C stops the current answer."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_args(p)
    add_sampling_args(p)
    add_structured_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=run)


class ChatSession:
    def __init__(self, model, system: str | None, options: dict) -> None:
        self.model, self.options = model, options
        self.system = system
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def answer(self, text: str, out=None, dim: bool | None = None) -> str:
        """Stream the answer to `out`; Qwen3 thinking is shown dimmed (on a terminal, or with dim=True)
        and kept out of the history."""
        from ..chat.history import fit_history
        from ..chat.reasoning import ReasoningParser

        out = out or sys.stdout  # looked up now: stdout may have been replaced since import

        self.history.append({"role": "user", "content": text})
        m = self.model
        max_new = self.options.get("max_tokens") or m.sampling_defaults["max_tokens"]
        budget = max(m.context_length - min(max_new, m.context_length // 2), 1)
        msgs = fit_history(self.messages(), lambda ms: len(m.encode_chat(ms)), budget)
        self.history = [x for x in msgs if x.get("role") != "system" or not self.system]
        dim = out.isatty() if dim is None else dim
        thinker = ReasoningParser() if m.thinks else None
        reply: list[str] = []
        thinking = [False]

        def show(deltas: list[dict[str, str]]) -> None:
            for d in deltas:
                if "reasoning_content" in d:
                    if not thinking[0]:
                        out.write("\x1b[2m" if dim else "")
                        thinking[0] = True
                    out.write(d["reasoning_content"])
                    continue
                if thinking[0]:
                    out.write("\x1b[0m\n" if dim else "\n")
                    thinking[0] = False
                reply.append(d["content"])
                out.write(d["content"])
            out.flush()

        try:
            for piece in m.chat(msgs, stream=True, **self.options):
                show(thinker.feed(piece) if thinker else [{"content": piece}])
        except KeyboardInterrupt:
            out.write(" [stopped]")
        if thinker:
            show(thinker.finish())
        out.write("\x1b[0m\n" if thinking[0] and dim else "\n")
        out.flush()
        answer = "".join(reply)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd == "/clear":
            self.history.clear()
            print("(conversation cleared)")
        elif cmd == "/system":
            self.system = arg.strip() or None
            print(f"(system prompt {'set' if self.system else 'removed'})")
        else:
            print(HELP)
        return True


def run(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        print("Loading model...", file=sys.stderr)
    options = sampling_options(args) | structured_options(args, chat=True)
    model = load_model(args)
    session = ChatSession(model, args.system, options)
    if not interactive:
        for line in sys.stdin:
            if line.strip():
                session.answer(line.rstrip("\n"))
        return 0
    import readline  # noqa: F401  (line editing and history for input())

    print(f"Chatting with {model.name}. Type /help for commands.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line.strip()):
                return 0
            continue
        session.answer(line)
