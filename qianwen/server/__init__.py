"""The OpenAI-compatible HTTP server (`qianwen serve`) and its web chat page."""

from .app import create_app
from .serving import ServerConfig

__all__ = ["ServerConfig", "create_app"]
