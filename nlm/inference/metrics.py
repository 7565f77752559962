"""Prometheus metrics of one server, in their own registry (several apps in one test process stay apart)."""

from __future__ import annotations

from typing import Any

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
        # Speculative decoding (`--draft`): counters, and the two ratios over everything served so far.
        self.draft_verify_steps = Counter("nlm_draft_verify_steps", "Forward passes of the served model that "
                                          "verified draft tokens", registry=self.registry)
        self.draft_proposed = Counter("nlm_draft_proposed_tokens", "Tokens the draft proposed", registry=self.registry)
        self.draft_accepted = Counter("nlm_draft_accepted_tokens", "Draft tokens the served model accepted",
                                      registry=self.registry)
        self.draft_acceptance_rate = Gauge("nlm_draft_acceptance_rate", "Accepted / proposed draft tokens, since start",
                                           registry=self.registry)
        self.draft_accepted_per_step = Gauge("nlm_draft_accepted_tokens_per_verify_step", "Accepted draft tokens "
                                             "per verify step, since start", registry=self.registry)
        self._draft_totals: Any = None

    def observe_draft(self, counts: Any) -> None:
        """Add one drafting stretch's `DraftCounts` (called from the generation worker)."""
        from nlm.models.speculative import DraftCounts

        if self._draft_totals is None:
            self._draft_totals = DraftCounts()
        self._draft_totals.add(counts)
        self.draft_verify_steps.inc(counts.target_forwards)
        self.draft_proposed.inc(counts.drafted)
        self.draft_accepted.inc(counts.accepted)
        self.draft_acceptance_rate.set(self._draft_totals.acceptance_rate)
        self.draft_accepted_per_step.set(self._draft_totals.accepted_per_target_forward)
