"""The server's Prometheus metrics, in a registry of its own (two servers in one process never share one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("atb_requests_running", "Requests in the running batch", registry=r)
        self.requests_waiting = Gauge("atb_requests_waiting", "Requests waiting for a batch slot", registry=r)
        self.kv_blocks_used = Gauge("atb_kv_cache_blocks_used", "KV-cache blocks held by requests", registry=r)
        self.kv_blocks_total = Gauge("atb_kv_cache_blocks_total", "KV-cache blocks of the engine", registry=r)
        self.time_to_first_token = Histogram(
            "atb_time_to_first_token_seconds", "From a request's arrival to its first token",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "atb_time_per_output_token_seconds", "Mean time between a request's tokens after the first",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("atb_prompt_tokens", "Prompt tokens of accepted requests, visual tokens "
                                                          "included", registry=r)
        self.generation_tokens = Counter("atb_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter("atb_spec_decode_draft_tokens", "Tokens guessed by speculative decoding",
                                    registry=r)
        self.accepted_tokens = Counter("atb_spec_decode_accepted_tokens", "Guessed tokens the model agreed with",
                                       registry=r)
        self.requests_finished = Counter("atb_requests_finished", "Requests that ended, by finish reason",
                                         ["finish_reason"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
