"""Generation engines behind the SDFT rewrite and the evaluation probes: in process, or on a server."""

from .base import Completion, GenerationEngine, Prompt, RewriteEngine, ScoringEngine, ScoringRow
from .local import TransformersEngine
from .server import ServerEngine, ServerError

__all__ = [
    "Completion",
    "GenerationEngine",
    "Prompt",
    "RewriteEngine",
    "ScoringEngine",
    "ScoringRow",
    "ServerEngine",
    "ServerError",
    "TransformersEngine",
]
