"""Prometheus metrics, one registry per application (so tests and several apps never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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

    def watch_engines(self, reports: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        """Report the engines' own state (slots, queue, token rates), read at each scrape."""
        self.registry.register(_EngineCollector(reports))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    GAUGES = {
        "busy": ("localai_model_slots_busy", "Requests a loaded model is running now"),
        "queued": ("localai_model_queue_length", "Requests waiting for a loaded model"),
        "slots": ("localai_model_slots", "Requests a loaded model can run at once"),
        "prompt_cache_bytes": ("localai_prompt_cache_bytes", "Host memory holding finished requests' caches"),
        "prompt_tokens_per_second": ("localai_prompt_tokens_per_second",
                                     "Prompt tokens computed per second, over the last 10 s"),
        "generated_tokens_per_second": ("localai_generation_tokens_per_second",
                                        "Tokens generated per second, over the last 10 s"),
        "cpu_share": ("localai_model_cpu_share", "The model's part of the core time all engines used, over the "
                      "last 10 s"),
    }
    COUNTERS = {
        "prompt_tokens": ("localai_prompt_tokens_computed", "Prompt tokens computed (not taken from the cache)"),
        "cached_tokens": ("localai_prompt_tokens_cached", "Prompt tokens reused from the prompt cache"),
        "cpu_busy_seconds": ("localai_model_cpu_busy_seconds", "Core-seconds of compute the model ran (its "
                             "pieces' time times their threads)"),
        "cpu_wait_seconds": ("localai_model_cpu_wait_seconds", "Seconds the model's pieces of compute waited for "
                             "free cores"),
    }

    def __init__(self, reports: Callable[[], Mapping[str, Mapping[str, float]]]):
        self.reports = reports

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        reports = self.reports()
        for kinds, make in ((self.GAUGES, GaugeMetricFamily), (self.COUNTERS, CounterMetricFamily)):
            for key, (name, doc) in kinds.items():
                family = make(name, doc, labels=["model"])
                for model, report in reports.items():
                    if key in report:
                        family.add_metric([model], report[key])
                yield family
