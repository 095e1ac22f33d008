"""Prometheus metrics of the server, named like vLLM's (``vllm:`` -> ``epmoe:``).

Two sources:

* the HTTP front observes each request: time to first token, end-to-end
  latency, prompt and generated tokens, finished requests by reason, rejected
  requests by reason (:class:`ServeMetrics` methods, called by :mod:`.api`);
* the engine's :class:`~epmoe.serve.client.EngineStats` snapshot, read when
  ``/metrics`` is scraped (a custom collector, so nothing runs between
  scrapes): running and waiting requests and KV blocks per rank, engine
  steps, and per MoE layer the tokens each expert received, the balancedness
  and the bytes moved by dispatch and combine.

Each app has a registry of its own (not prometheus_client's global one), so
that several apps in one process (the tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .client import EngineClient

__all__ = ["ServeMetrics"]

# vLLM's buckets, seconds: TTFT from 1 ms (a decode step) to minutes (a long queue).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Reads ``client.stats`` at scrape time (one attribute read: the engine thread
    replaces the frozen snapshot whole, so a scrape never sees half a step)."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        s = self.client.stats
        per_rank = [
            ("epmoe:num_requests_running", "Requests in the running batch of each rank.",
             s.running),
            ("epmoe:num_requests_waiting", "Requests admitted to a rank, not yet running.",
             s.waiting),
            ("epmoe:kv_cache_blocks_used", "KV-cache blocks in use on each rank.",
             s.kv_blocks_used),
        ]
        for name, doc, values in per_rank:
            g = GaugeMetricFamily(name, doc, labels=["rank"])
            for rank, v in enumerate(values):
                g.add_metric([str(rank)], v)
            yield g
        g = GaugeMetricFamily("epmoe:kv_cache_usage_perc",
                              "Fraction of each rank's KV-cache blocks in use (0 to 1).",
                              labels=["rank"])
        for rank, used in enumerate(s.kv_blocks_used):
            g.add_metric([str(rank)], used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield g
        yield GaugeMetricFamily("epmoe:num_requests_in_flight",
                                "Requests the front has handed to the engine and not finished.",
                                value=self.client.in_flight)
        yield CounterMetricFamily("epmoe:engine_steps", "Engine steps (forwards of the group).",
                                  value=s.steps)
        c = CounterMetricFamily("epmoe:moe_expert_tokens",
                                "Tokens routed to each expert of each MoE layer, group-wide.",
                                labels=["layer", "expert"])
        for layer, counts in enumerate(s.tokens_per_expert):
            for expert, n in enumerate(counts):
                c.add_metric([str(layer), str(expert)], n)
        yield c
        g = GaugeMetricFamily("epmoe:moe_balancedness",
                              "Mean over max of the per-rank expert load of each MoE layer "
                              "(1 = perfectly balanced).", labels=["layer"])
        for layer, b in enumerate(s.balancedness):
            g.add_metric([str(layer)], b)
        yield g
        yield CounterMetricFamily("epmoe:moe_dispatch_bytes",
                                  "Bytes all ranks sent in MoE dispatch and combine.",
                                  value=s.dispatch_bytes)


class ServeMetrics:
    """The server's metrics on a registry of its own; :meth:`render` is ``/metrics``."""

    def __init__(self, client: EngineClient) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("epmoe:time_to_first_token_seconds",
                              "From the request's arrival to its first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.e2e = Histogram("epmoe:e2e_request_latency_seconds",
                             "From the request's arrival to its last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("epmoe:prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("epmoe:generation_tokens", "Tokens generated.",
                                         registry=r)
        # label name as vLLM's vllm:request_success_total{finished_reason=...}
        self.request_success = Counter("epmoe:request_success", "Finished requests, by why "
                                       "they finished.", ["finished_reason"], registry=r)
        self.request_rejected = Counter("epmoe:request_rejected", "Requests answered with an "
                                        "error status, by status code.", ["code"], registry=r)
        r.register(_EngineCollector(client))

    def finished(self, reason: str, prompt_tokens: int, generated_tokens: int,
                 seconds: float) -> None:
        """One request ended (any reason, a disconnected client's ``abort`` included)."""
        self.request_success.labels(finished_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.e2e.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(the text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
