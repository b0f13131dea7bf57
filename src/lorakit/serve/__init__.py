"""Serving: one base model, many LoRA adapters, behind an OpenAI-compatible HTTP API."""

from .app import ApiError, LoraServer, ServerConfig, make_http_server, serve_in_thread
from .scheduler import Scheduler

__all__ = ["ApiError", "LoraServer", "ServerConfig", "make_http_server", "serve_in_thread", "Scheduler"]
