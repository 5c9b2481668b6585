"""Prometheus text-format metrics without a client library: counters, gauges and histograms."""

from __future__ import annotations

import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help, self.kind = name, help, "counter"
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        if not self.values:
            return [f"{self.name} 0"]
        return [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in sorted(self.values.items())]


class Gauge:
    def __init__(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.name, self.help, self.kind, self.fn = name, help, "gauge", fn

    def samples(self) -> list[str]:
        return [f"{self.name} {self.fn():g}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.kind = name, help, "histogram"
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1
                    break
            else:
                self.counts[-1] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def samples(self) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {self.sum:g}")
        out.append(f"{self.name}_count {self.count}")
        return out

PREFIX_CACHE_GAUGES = {
    "queried_tokens": "Prompt tokens looked up in the prefix cache, since start.",
    "hit_tokens": "Prompt tokens whose K/V came from the prefix cache, since start.",
    "hit_rate": "hit_tokens / queried_tokens.",
    "cached_tokens": "Tokens the cached prefix blocks hold now (part of the KV cache budget).",
}


class Metrics:
    """The server's metrics. Gauges read the engine when scraped."""

    def __init__(self, queue_length: Callable[[], float], running: Callable[[], float],
                 kv_used: Callable[[], float], kv_capacity: Callable[[], float],
                 prefix_cache: Callable[[], dict[str, float]] | None = None) -> None:
        p = "qianwen_"
        self.requests = Counter(p + "requests_total", "HTTP requests by route and status code.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.aborted = Counter(p + "requests_aborted_total", "Sequences cancelled before they finished (client gone).")
        self.finished = Counter(p + "sequences_finished_total", "Sequences finished, by finish reason.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request arrival to its first token.",
                              TTFT_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                             ITL_BUCKETS)
        self.all = [
            self.requests, self.prompt_tokens, self.generation_tokens, self.aborted, self.finished,
            Gauge(p + "queue_length", "Sequences waiting for a slot.", queue_length),
            Gauge(p + "running_sequences", "Sequences in the running batch.", running),
            Gauge(p + "kv_cache_used_tokens", "KV cache capacity allocated, in tokens.", kv_used),
            Gauge(p + "kv_cache_capacity_tokens", "KV cache budget, in tokens.", kv_capacity),
            self.ttft, self.itl,
        ]
        if prefix_cache is not None:  # the engine's prefix_cache_stats()
            self.all += [Gauge(p + "prefix_cache_" + key, text, lambda key=key: prefix_cache()[key])
                         for key, text in PREFIX_CACHE_GAUGES.items()]

    def render(self) -> str:
        lines = []
        for m in self.all:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.samples())
        return "\n".join(lines) + "\n"
