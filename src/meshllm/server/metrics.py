"""Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from meshllm.server.console.stats import RecentStats

# Seconds: from a loopback millisecond to a slow remote prefill.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    """What /metrics shows: requests, tokens, latencies, per-stage step times, live and waiting sequences;
    and, per second over the last minutes, what the console plots (`recent`)."""

    def __init__(
        self,
        live_sequences: Callable[[], int] | None = None,
        waiting_sequences: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.recent = RecentStats()
        registry = self.registry
        self.requests = Counter(
            "meshllm_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "meshllm_prompt_tokens", "Prompt tokens of admitted requests", registry=registry
        )
        self.generation_tokens = Counter("meshllm_generation_tokens", "Tokens generated", registry=registry)
        self.finished = Counter(
            "meshllm_request_finished", "Generations by how they ended", ["finish_reason"], registry=registry
        )
        self.time_to_first_token = Histogram(
            "meshllm_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "meshllm_time_per_output_token_seconds",
            "Between two consecutive generated tokens of one sequence",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_latency = Histogram(
            "meshllm_e2e_request_latency_seconds",
            "From the request's arrival to its last token",
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.stage_step = Histogram(
            "meshllm_stage_step_seconds",
            "Time of one pipeline step on each stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.live_sequences = Gauge(
            "meshllm_live_sequences", "Sequences being generated now", registry=registry
        )
        if live_sequences is not None:
            self.live_sequences.set_function(live_sequences)
        self.waiting_sequences = Gauge(
            "meshllm_waiting_sequences",
            "Sequences admitted but not started: no room yet in the stages' KV memory",
            registry=registry,
        )
        if waiting_sequences is not None:
            self.waiting_sequences.set_function(waiting_sequences)

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_step(self, stage_name: str, seconds: float) -> None:
        """A step listener for the coordinator: called after every step of every stage."""
        self.stage_step.labels(stage=stage_name).observe(seconds)
        self.recent.observe_step(stage_name, seconds)

    def observe_prompt(self, n_tokens: int) -> None:
        self.prompt_tokens.inc(n_tokens)

    def observe_first_token(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.time_to_first_token.observe(seconds)
        self.recent.observe_tokens()
        self.recent.observe_first_token(seconds)

    def observe_next_token(self, seconds: float) -> None:
        self.generation_tokens.inc()
        self.time_per_output_token.observe(seconds)
        self.recent.observe_tokens()

    def observe_finished(self, finish_reason: str, seconds: float) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        self.request_latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
