"""Output constraints of an OpenAI request (`response_format`, vLLM's `guided_*` and `structured_outputs`)
as per-sequence logits processors; what cannot be enforced is a 400 naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..generation.constrain import (
    GrammarError,
    GrammarProcessor,
    check_grammar,
    grammar_from_request,
    ll_tokenizer,
)
from .serving import APIError

if TYPE_CHECKING:
    from ..api import Model  # the loaded model (type only: no upward import at run time)

# vLLM's structured_outputs keys -> ours
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def request_grammar(req: Any, think: bool = False) -> str | None:
    """The grammar a request asks for (None: free text); `think`: a Qwen3 think block may come first."""
    spec: dict[str, Any] = {"response_format": req.response_format, "json_schema": req.guided_json,
                            "regex": req.guided_regex, "choice": req.guided_choice, "grammar": req.guided_grammar}
    so = req.structured_outputs or {}
    unknown = sorted(k for k, v in so.items() if v is not None and k not in _STRUCTURED_OUTPUTS
                     and k != "json_object")
    if unknown:
        raise APIError(400, f"structured_outputs does not support {', '.join(unknown)}", param="structured_outputs")
    for key, ours in _STRUCTURED_OUTPUTS.items():
        if so.get(key) is not None:
            if spec[ours] is not None:
                raise APIError(400, f"structured_outputs.{key} and guided_* both given", param="structured_outputs")
            spec[ours] = so[key]
    if so.get("json_object"):
        spec["response_format"] = spec["response_format"] or {"type": "json_object"}
    try:
        return grammar_from_request(**spec, think=think)
    except GrammarError as e:
        raise APIError(400, str(e), param=_param(req)) from None


def _param(req: Any) -> str:
    for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name, None) is not None:
            return name
    return "structured_outputs"


def processor_factory(model: Model, grammar: str | None, param: str = "response_format"
                      ) -> Callable[[], list[Any]] | None:
    """A function making fresh processors for each sequence, after checking the grammar once."""
    if grammar is None:
        return None
    lltok = ll_tokenizer(model.tokenizer, model.stop_token_ids)
    try:
        check_grammar(grammar, lltok)
    except GrammarError as e:
        raise APIError(400, str(e), param=param) from None
    return lambda: [GrammarProcessor(lltok, grammar, model.config.vocab_size)]
