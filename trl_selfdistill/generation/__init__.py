"""Generation engines behind the SDFT rewrite and the evaluation probes: in process, or on a server."""

from .base import Completion, GenerationEngine, Prompt, RewriteEngine
from .local import TransformersEngine
from .server import ServerEngine, ServerError

__all__ = [
    "Completion",
    "GenerationEngine",
    "Prompt",
    "RewriteEngine",
    "ServerEngine",
    "ServerError",
    "TransformersEngine",
]
