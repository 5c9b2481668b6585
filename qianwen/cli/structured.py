"""Command-line options for structured output and thinking, shared by `generate` and `chat`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import QianwenError


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output constraints and thinking")
    g.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                   help="answer with JSON matching this schema (a file, or the schema itself starting with '{')")
    g.add_argument("--json", action="store_true", help="answer with a JSON object")
    g.add_argument("--no-think", action="store_true",
                   help="Qwen3: answer without thinking (chat template enable_thinking=false)")


def structured_options(args: argparse.Namespace, chat: bool) -> dict[str, Any]:
    """Model.generate/chat keyword arguments for these options."""
    out: dict[str, Any] = {}
    if args.json_schema and args.json:
        raise QianwenError("give --json-schema or --json, not both")
    if args.json_schema:
        inline = args.json_schema.lstrip().startswith("{")
        try:
            text = args.json_schema if inline else Path(args.json_schema).read_text(encoding="utf-8")
            out["json_schema"] = json.loads(text)
        except OSError as e:
            raise QianwenError(f"cannot read the JSON schema {args.json_schema}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise QianwenError(f"{'--json-schema' if inline else args.json_schema} is not JSON: {e}") from None
    elif args.json:
        out["response_format"] = {"type": "json_object"}
    if args.no_think and chat:
        out["chat_template_kwargs"] = {"enable_thinking": False}
    return out
