from .template import QWEN_DEFAULT_SYSTEM, ChatTemplate

__all__ = ["QWEN_DEFAULT_SYSTEM", "ChatTemplate"]
