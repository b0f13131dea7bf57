"""The Tinker training API (Thinking Machines' SDK >= 0.38) on lorakit's server: ``lorakit serve --tinker``.

``service`` holds the routes and sessions, ``training`` the training clients (ordered requests,
mixed-adapter forward/backward steps), ``sampling`` the sampling clients, ``futures`` the
request ids and their results, ``checkpoints`` the ``tinker://`` paths, ``codec`` the wire formats.
"""

from .service import TinkerConfig, TinkerService

__all__ = ["TinkerConfig", "TinkerService"]
