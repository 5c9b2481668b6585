"""The public Python API: `qianwen.load()` returns a Model, made of the parts `loading` reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .chat.reasoning import template_thinks, thinking_allowed
from .chat.template import ChatTemplate
from .config import ModelConfig
from .fast.cache import kv_cache_dtype
from .generation.constrain import CONSTRAINT_OPTIONS, grammar_from_request, make_processor
from .generation.generate import stream_tokens
from .generation.params import SamplingParams, defaults_from_generation_config, make_params
from .generation.sampling import LogitsProcessor
from .generation.step import TokenStep
from .loading import load_checkpoint
from .models.layers import Transformer

# control tokens that end a chat turn in ChatML-style models (docs/qwen-facts.md §3)
CHAT_STOP_STRINGS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def stop_token_ids(config: ModelConfig, generation_config: dict[str, Any], tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the config's and generation_config's eos, the tokenizer's, ChatML's."""
    ids = set(config.eos_token_id)
    gen_eos = generation_config.get("eos_token_id")
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    for s in CHAT_STOP_STRINGS:
        if (i := tokenizer.token_to_id(s)) is not None:
            ids.add(i)
    return ids


class Model:
    def __init__(self, name: str, path: Path, config: ModelConfig, net: Transformer, tokenizer,
                 chat_template: ChatTemplate, generation_config: dict[str, Any]) -> None:
        self.name, self.path, self.config, self.net = name, path, config, net
        self.tokenizer, self.chat_template, self.generation_config = tokenizer, chat_template, generation_config
        self.sampling_defaults = defaults_from_generation_config(generation_config)
        self.stop_token_ids = self._stop_ids()
        self.kv_cache_dtype = "auto"  # stream_tokens' KV cache: auto (the model's dtype), bfloat16, float32, int8

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.model.norm.weight.dtype  # embed_tokens may be quantized

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def _stop_ids(self) -> set[int]:
        return stop_token_ids(self.config, self.generation_config, self.tokenizer)

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 from one full forward without cache."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.net(x)[0].float()

    def params(self, **options: Any) -> SamplingParams:
        return make_params(self.sampling_defaults, self.stop_token_ids, **options)

    def stream_tokens(self, prompt_ids: list[int], params: SamplingParams | None = None,
                      logits_processors: list[LogitsProcessor] | None = None) -> Iterator[TokenStep]:
        """One TokenStep per new token. `logits_processors`: fn(prompt_ids, output_ids, logits[V] float32)
        -> logits, run in order after the penalties, before sampling."""
        return stream_tokens(self.net, self.tokenizer, prompt_ids, params or self.params(), self.context_length,
                             logits_processors or (), kv_cache_dtype(self.kv_cache_dtype, self.dtype))

    def constraint(self, think: bool = False, **spec: Any) -> list[Any]:
        """Logits processors enforcing `response_format`, `json_schema`, `regex`, `choice` or `grammar`
        (see generation/constrain.py); [] when none is given. Raises GrammarError for what can't be enforced.
        `think`: a Qwen3 think block may precede the constrained answer."""
        grammar = grammar_from_request(**{k: spec.get(k) for k in CONSTRAINT_OPTIONS}, think=think)
        if grammar is None:
            return []
        return [make_processor(self.tokenizer, self.stop_token_ids, grammar, self.config.vocab_size)]

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation; `template_kwargs` reach the template (e.g. enable_thinking=False)."""
        return self.chat_template.encode(self.tokenizer, messages, add_generation_prompt, tools, **template_kwargs)

    @property
    def thinks(self) -> bool:
        """Whether the chat template writes Qwen3 `<think>` blocks (chat/reasoning.py)."""
        return template_thinks(None if self.chat_template.builtin else self.chat_template.source)

    def generate(self, prompt: str | list[str], stream: bool = False, **options: Any) -> Any:
        """Complete `prompt` (raw text, no template). A list of prompts gives a list of completions.
        `options`: any sampling option of SamplingParams, and `logits_processors=[fn, ...]`;
        `json_schema=`, `response_format=`, `regex=`, `choice=` or `grammar=` constrain the output."""
        if isinstance(prompt, list):
            if stream:
                raise ValueError("stream=True takes a single prompt")
            return [self.generate(p, **options) for p in prompt]
        ids = self.tokenizer.encode(prompt)
        if getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id, *ids]
        return self._run(ids, stream, options)

    def chat(self, messages: list[dict[str, Any]], stream: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None, **options: Any) -> Any:
        """Answer an OpenAI-style conversation through the model's chat template. The text includes a
        Qwen3 `<think>` block if the model writes one (chat.reasoning.split_reasoning separates it)."""
        kwargs = chat_template_kwargs or {}
        think = (self.thinks and any(k in options for k in CONSTRAINT_OPTIONS)
                 and thinking_allowed(self.chat_template.render(messages, True, None, **kwargs)))
        return self._run(self.encode_chat(messages, **kwargs), stream, options, think)

    def _run(self, ids: list[int], stream: bool, options: dict[str, Any], think: bool = False) -> Any:
        spec = {k: options.pop(k) for k in CONSTRAINT_OPTIONS if k in options}
        processors = list(options.pop("logits_processors", None) or []) + self.constraint(think=think, **spec)
        steps = self.stream_tokens(ids, self.params(**options), processors)
        if stream:
            return (s.text for s in steps if s.text)
        return "".join(s.text for s in steps)


def load(model: str | Path | None = None, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, quantized: bool | None = None, fast: bool = True) -> Model:
    """A Model of a Hugging Face folder, a .gguf file, a name (`qianwen list`, a hub id), or None for the default
    model. `quantized` keeps GGUF block weights quantized (default: on for bfloat16 on the CPU); `fast=False`
    skips the fast path, keeping the checkpoint's modules and parameter names (see `loading.load_checkpoint`)."""
    c = load_checkpoint(model, dtype=dtype, device=device, quantized=quantized, fast=fast)
    return Model(name=c.name, path=c.path, config=c.config, net=c.net, tokenizer=c.tokenizer,
                 chat_template=c.chat_template, generation_config=c.generation_config)
