"""Prometheus metrics, one registry per application (so tests and several apps never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("localai_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("localai_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.loaded_models = Gauge("localai_loaded_models", "Models loaded now", registry=self.registry)
        self.model_loads = Histogram("localai_model_load_duration_seconds", "Model load time per model",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("localai_inference_duration_seconds", "Inference time per model and task",
                                   ["model", "task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("localai_generated_tokens", "Tokens generated per model", ["model"],
                              registry=self.registry)

        self.tts_sentences = Counter("localai_tts_sentences", "Sentences synthesized and sent, per model", ["model"],
                                     registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
