"""Prometheus metrics of one server, in their own registry (several apps in one test process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("nlm_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "nlm_request_latency_seconds", "Request latency by route", ["route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.generated_tokens = Counter("nlm_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("nlm_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.queue_depth = Gauge("nlm_queue_depth", "Requests waiting for the generation worker", registry=self.registry)
        self.in_flight = Gauge("nlm_requests_in_flight", "Generation requests admitted and not finished", registry=self.registry)
        self.batch_size = Histogram(
            "nlm_batch_size", "Sequences sharing one decode step (continuous batching)", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
