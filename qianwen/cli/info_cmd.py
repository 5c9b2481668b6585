"""`qianwen info`: what a model is (architecture, size, dtype, context, template)."""

from __future__ import annotations

import argparse

from .common import add_model_args, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's architecture, parameters, dtype, context and chat template")
    add_model_args(p)
    p.add_argument("--template", action="store_true", help="print the whole chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qianwen.quant.summary import weight_summary

    m = load_model(args)
    c = m.config
    w = weight_summary(m.net)  # quantized weights are buffers: counted by their logical size
    rows = [
        ("model", m.name), ("path", str(m.path)), ("architecture", c.model_type),
        ("parameters", f"{w.total / 1e6:.1f}M"), ("weights", f"{w.describe()}; {w.bytes_held / 1e6:.1f} MB held"),
        ("dtype", str(m.dtype).replace("torch.", "")),
        ("device", str(m.device)), ("context length", str(m.context_length)),
        ("layers", str(c.num_hidden_layers)), ("hidden size", str(c.hidden_size)),
        ("attention heads", f"{c.num_attention_heads} (kv {c.num_key_value_heads})"),
        ("rope", f"theta {c.rope_theta:g}" + (f", {c.rope_scaling}" if c.rope_scaling else "")),
        ("vocabulary", f"{m.tokenizer.vocab_size} tokens"), ("stop tokens", str(sorted(m.stop_token_ids))),
        ("chat template", "built-in ChatML" if m.chat_template.builtin else
         f"from the checkpoint ({len(m.chat_template.source)} chars)"),
    ]
    for k, v in rows:
        print(f"{k:<16} {v}")
    if args.template:
        print(m.chat_template.source)
    return 0
