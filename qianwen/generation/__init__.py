from .generate import TokenStep, stream_tokens
from .params import SamplingParams, defaults_from_generation_config, make_params

__all__ = ["SamplingParams", "TokenStep", "defaults_from_generation_config", "make_params", "stream_tokens"]
