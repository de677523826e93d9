"""Custom metrics (Ray's Prometheus endpoint, prefix ``ray_``; reserved tags added by Serve).

Router: requests / tokens / latency / errors per tenant and model. Replica: expert cache
hits and misses, resident experts, bank version, rows per decode step of the running batch.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        tags = ("tenant", "model", "endpoint")
        self.requests = Counter("atelier_requests", description="requests by tenant/model/status",
                                tag_keys=(*tags, "status"))
        self.tokens = Counter("atelier_completion_tokens", description="generated tokens", tag_keys=tags)
        self.prompt_tokens = Counter("atelier_prompt_tokens", description="prompt tokens", tag_keys=tags)
        self.errors = Counter("atelier_errors", description="error responses", tag_keys=(*tags, "status"))
        self.latency = Histogram("atelier_request_latency_s", description="end-to-end request latency",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60], tag_keys=tags)


class ReplicaMetrics:
    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.expert_hits = Counter("atelier_expert_cache_hits", description="expert requests whose expert was "
                                   "resident", tag_keys=("pool",))
        self.expert_misses = Counter("atelier_expert_cache_misses", description="expert requests that waited "
                                     "for a load", tag_keys=("pool",))
        self.experts_resident = Gauge("atelier_experts_resident", description="experts in the replica's LRU",
                                      tag_keys=("pool",))
        self.bank_version = Gauge("atelier_bank_version", description="adapter bank version served",
                                  tag_keys=("pool",))
        self.batch_rows = Histogram("atelier_batch_rows", description="rows in each decode step of the running "
                                    "batch", boundaries=[1, 2, 4, 8, 16, 32], tag_keys=("pool",))

    @property
    def tags(self) -> dict[str, str]:
        return {"pool": self.pool}
