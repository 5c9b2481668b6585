"""Continuous batching: sequences join and leave the running batch at token granularity.

`sequence` (a request's state), `scheduler` (who runs this step), `cache_manager` (KV budget and the
batched cache the model attends through), `model_runner` (forwards and sampling), `llm_engine` (the
loop and the offline `LLM` API), `async_engine` (the loop on a thread, for the server).
"""

from .llm_engine import LLM, Completion, EngineConfig, LLMEngine

__all__ = ["LLM", "Completion", "EngineConfig", "LLMEngine"]
