"""The server's Prometheus metrics (``GET /metrics``), one registry per server."""

from __future__ import annotations

from typing import Callable

from ..extras import require

require("prometheus_client", "serve", "lorakit serve")
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402

# Seconds; fine at the low end, where a loaded CPU server's first tokens land.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """Counters, gauges and histograms of one server, in Prometheus' text format via ``render``.

    Args:
        running: how many requests are in the batch now (read at scrape time).
        waiting: how many wait for a slot now.
    """

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("lorakit_num_requests_running", "Requests in the running batch (prefilling or decoding).",
              registry=r).set_function(running)
        Gauge("lorakit_num_requests_waiting", "Requests waiting for a slot in the batch.", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("lorakit_request_success", "Requests finished, by finish reason.", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("lorakit_request_rejected", "Requests refused because the waiting queue was full.",
                                registry=r)
        self.cancelled = Counter("lorakit_request_cancelled", "Requests whose client went away before the end.",
                                 registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Seconds from arrival to the first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("lorakit_e2e_request_latency_seconds", "Seconds from arrival to the last token.",
                                 buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
