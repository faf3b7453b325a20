"""Client-side counters: plain integers on the hot path, readable as a dict, exportable to Prometheus."""

from __future__ import annotations

import threading
from collections import Counter


class ClientCounters:
    """put_<status>, lookup_keys, lookup_hits, get_hits, get_misses, corrupt_blocks, lease_expired,
    unavailable, error_<kind>, wc_<status>, bytes_written, bytes_read."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def __getitem__(self, name: str) -> int:
        return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def register(self, registry) -> None:
        """Expose as `rdmapool_client_events{event=...}` in a prometheus_client registry."""
        from prometheus_client.core import CounterMetricFamily

        counters = self

        class _Collector:
            def collect(self):
                family = CounterMetricFamily("rdmapool_client_events", "Client events", labels=["event"])
                for name, value in sorted(counters.snapshot().items()):
                    family.add_metric([name], value)
                yield family

        registry.register(_Collector())
