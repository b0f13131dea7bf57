"""Serving: one base model, many LoRA adapters, behind an OpenAI-compatible HTTP API."""

from .app import ApiError, LoraServer, ServerConfig
from .asgi import HttpServer, make_app, make_http_server, serve_in_thread
from .scheduler import QueueFull, Scheduler

__all__ = ["ApiError", "HttpServer", "LoraServer", "QueueFull", "ServerConfig", "make_app", "make_http_server",
           "serve_in_thread", "Scheduler"]
