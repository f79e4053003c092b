"""Prometheus text exposition (format 0.0.4) of the server's state: waiting queue, live slots,
token counters, recent output tokens per second and a time-to-first-token histogram."""
from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self, slots: int):
        self.slots = slots
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = collections.Counter()   # finish_reason -> requests
        self.rejected = collections.Counter()   # reason -> requests
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.recent = collections.deque()       # (time, tokens) over the last window

    def tokens(self, n: int):
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += n
            self.recent.append((now, n))

    def first_token(self, seconds: float):
        with self.lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            self.ttft_sum += seconds

    def finish(self, reason: str, prompt_tokens: int):
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt_tokens

    def reject(self, reason: str):
        with self.lock:
            self.rejected[reason] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def render(self, waiting: int, running: int) -> str:
        tps = self.tokens_per_second()
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value}")

        with self.lock:
            metric("owl_requests_waiting", "gauge", "Requests in the queue, not yet in a slot.",
                   [("", waiting)])
            metric("owl_requests_running", "gauge", "Decode slots holding a request.",
                   [("", running)])
            metric("owl_slots", "gauge", "Decode slots.", [("", self.slots)])
            metric("owl_generation_tokens_per_second", "gauge",
                   f"Output tokens per second over the last {RATE_WINDOW_S:g} s.",
                   [("", f"{tps:.3f}")])
            metric("owl_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [("", self.prompt_tokens)])
            metric("owl_generation_tokens_total", "counter", "Output tokens.",
                   [("", self.generation_tokens)])
            metric("owl_request_success_total", "counter", "Finished requests by reason.",
                   [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(self.finished.items())])
            metric("owl_requests_rejected_total", "counter", "Requests refused by reason.",
                   [(f'{{reason="{k}"}}', v) for k, v in sorted(self.rejected.items())])
            cum, samples = 0, []
            for le, c in zip(TTFT_BUCKETS + ("+Inf",), self.ttft_counts):
                cum += c
                samples.append((f'_bucket{{le="{le}"}}', cum))
            samples += [("_sum", f"{self.ttft_sum:.6f}"), ("_count", cum)]
            metric("owl_time_to_first_token_seconds", "histogram",
                   "Seconds from a request's arrival to its first output token.", samples)
        return "\n".join(out) + "\n"
