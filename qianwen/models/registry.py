"""What one architecture module registers: everything the rest of qianwen needs to know about a
`model_type`, in one record (docs/design.md, "How to add an architecture")."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .layers import Transformer

# llama.cpp's tensor names for the dense decoder -> ours (a regex and its replacement each)
GGUF_DENSE_NAMES: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
)


@dataclass(frozen=True)
class Architecture:
    """One `model_type`. `config` reads config.json (`from_hf`) and writes the export (`to_hf_dict`);
    `model` is the network, whose `sanitize` maps checkpoint tensor names to ours."""

    config: type[ModelConfig]
    model: type[Transformer]
    aliases: tuple[str, ...] = ()  # other config.json model_types that are this architecture
    # GGUF: llama.cpp's `general.architecture` (None: not read from GGUF), its tensor names, and whether
    # llama.cpp's converter permuted the q/k rows (its Llama converter does, for its rotary layout)
    gguf_arch: str | None = None
    gguf_names: tuple[tuple[str, str], ...] = GGUF_DENSE_NAMES
    gguf_permute_qk: bool = False
    # chat: the system prompt of the built-in template when the checkpoint has none; the tool-call
    # format without a tools-aware template ("hermes" or "react", chat/tools.py) and the Hermes system
    # prompt (None: chat/tools.py's default); vLLM's --reasoning-parser for it
    default_system: str | None = None
    tool_format: str = "hermes"
    tool_system: str | None = None
    reasoning_parser: str | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Called once by each module of qianwen/models named after its model_type."""
    REGISTRY[arch.model_type] = arch
    return arch
