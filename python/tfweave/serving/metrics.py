"""Prometheus text exposition at TF Serving's ``/monitoring/prometheus/metrics``.

Names follow TF Serving's exporter (``/tensorflow/serving/request_count`` is exported as
``:tensorflow:serving:request_count``); what only tfweave has (batch sizes of merged runs, how
many members shared a run, queue depth) lives under ``:tfweave:serving:``.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
from collections import defaultdict

LATENCY_BUCKETS_US = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                      500000, 1000000, 2500000, 5000000]
# TF Serving's warmup latency buckets: 10 us x 1.8^i, up to about 20 minutes.
WARMUP_BUCKETS_US = [round(10 * 1.8 ** i) for i in range(33)]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# The model_name label of requests for a name no model has (see Metrics.is_model)
NOT_SERVED = "(not served)"


class _Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


def _labels(pairs) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._requests = defaultdict(int)            # (model, api, entrypoint, status) -> n
        self._latency = {}                           # (model, api, entrypoint) -> histogram
        self._batch = {}                             # model -> histogram of requests per run
        self._members = {}                           # model -> histogram of members per run
        self._runs = defaultdict(int)
        self._run_seconds = defaultdict(float)      # model -> time spent running batches
        self.queue_depths = lambda: {}
        # Whether a name is a configured model: requests naming anything else are counted
        # under NOT_SERVED, one series, so that clients sending made-up names cannot grow
        # the metrics (and this page) without bound.
        self.is_model = lambda name: True
        self._warmups: dict[tuple[str, str], _Histogram] = {}   # (model_path, status)
        self._gc_pauses: dict[int, _Histogram] | None = None   # generation -> pause (us)
        self._gc_started = 0.0

    def watch_collector(self) -> None:
        """Export the garbage collector's pauses (``:tfweave:serving:gc_pause_us`` by
        generation) and how many objects ``gc.freeze()`` took out of its view: a full
        collection stops every request in flight, so its pauses belong beside the latency.
        For the process that owns the server (``tfweave serve``): the hook is process-wide."""
        if self._gc_pauses is not None:
            return
        self._gc_pauses = {}
        gc.callbacks.append(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        # Runs inside the collector, on whichever thread triggered it: no allocation-heavy
        # work and no lock another collection could be waiting on (the GIL serialises these).
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        pause_us = (time.perf_counter() - self._gc_started) * 1e6
        histogram = self._gc_pauses.get(info["generation"])
        if histogram is None:
            histogram = self._gc_pauses[info["generation"]] = _Histogram(LATENCY_BUCKETS_US)
        histogram.observe(pause_us)

    def observe_request(self, model: str, api: str, entrypoint: str, status: str,
                        seconds: float) -> None:
        if not self.is_model(model):
            model = NOT_SERVED
        with self._lock:
            self._requests[(model, api, entrypoint, status)] += 1
            key = (model, api, entrypoint)
            histogram = self._latency.get(key)
            if histogram is None:
                histogram = self._latency[key] = _Histogram(LATENCY_BUCKETS_US)
            histogram.observe(seconds * 1e6)

    def observe_batch(self, model: str, requests: int, members: int,
                      seconds: float = 0.0) -> None:
        with self._lock:
            self._runs[model] += 1
            self._run_seconds[model] += seconds
            for table, value in ((self._batch, requests), (self._members, members)):
                histogram = table.get(model)
                if histogram is None:
                    histogram = table[model] = _Histogram(BATCH_BUCKETS)
                histogram.observe(value)

    def observe_warmup(self, model_path: str, status: str, seconds: float) -> None:
        with self._lock:
            histogram = self._warmups.get((model_path, status))
            if histogram is None:
                histogram = self._warmups[(model_path, status)] = _Histogram(WARMUP_BUCKETS_US)
            histogram.observe(seconds * 1e6)

    def batch_summary(self) -> dict[str, dict]:
        """Runs and mean requests per run per model (the demo and benchmark print these)."""
        with self._lock:
            return {m: {"runs": h.count, "mean_requests": h.total / max(h.count, 1)}
                    for m, h in self._batch.items()}

    def render(self) -> str:
        lines = []
        with self._lock:
            lines += ["# TYPE :tensorflow:serving:request_count counter"]
            for (model, api, entry, status), n in sorted(self._requests.items()):
                lines.append(":tensorflow:serving:request_count" + _labels(
                    [("model_name", model), ("API", api), ("entrypoint", entry),
                     ("status", status)]) + f" {n}")
            lines += ["# TYPE :tensorflow:serving:request_latency histogram"]
            for (model, api, entry), h in sorted(self._latency.items()):
                self._histogram(lines, ":tensorflow:serving:request_latency", h,
                                [("model_name", model), ("API", api), ("entrypoint", entry)])
            lines += ["# TYPE :tfweave:serving:batch_size histogram"]
            for model, h in sorted(self._batch.items()):
                self._histogram(lines, ":tfweave:serving:batch_size", h, [("model_name", model)])
            # Busy time of the model: its share of wall time says whether a server is bound
            # by the model runs or by what happens around them (decoding, gRPC, waiting).
            lines += ["# TYPE :tfweave:serving:batch_run_seconds counter"]
            for model, seconds in sorted(self._run_seconds.items()):
                lines.append(":tfweave:serving:batch_run_seconds" +
                             _labels([("model_name", model)]) + f" {seconds:.6f}")
            lines += ["# TYPE :tfweave:serving:members_per_run histogram"]
            for model, h in sorted(self._members.items()):
                self._histogram(lines, ":tfweave:serving:members_per_run", h,
                                [("model_name", model)])
            lines += ["# TYPE :tensorflow:serving:model_warmup_latency histogram"]
            for (path, status), h in sorted(self._warmups.items()):
                self._histogram(lines, ":tensorflow:serving:model_warmup_latency", h,
                                [("model_path", path), ("status", status)])
        if self._gc_pauses is not None:
            lines += ["# TYPE :tfweave:serving:gc_pause_us histogram"]
            for generation, h in sorted(dict(self._gc_pauses).items()):
                self._histogram(lines, ":tfweave:serving:gc_pause_us", h,
                                [("generation", generation)])
            lines += ["# TYPE :tfweave:serving:gc_frozen_objects gauge",
                      f":tfweave:serving:gc_frozen_objects {gc.get_freeze_count()}"]
        lines += ["# TYPE :tfweave:serving:queue_depth gauge"]
        for model, depth in sorted(self.queue_depths().items()):
            lines.append(":tfweave:serving:queue_depth" + _labels([("model_name", model)])
                         + f" {depth}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _histogram(lines, name, h, labels):
        cumulative = 0
        for bound, count in zip(h.bounds + ["+Inf"], h.counts):
            cumulative += count
            lines.append(f"{name}_bucket" + _labels(labels + [("le", bound)]) + f" {cumulative}")
        lines.append(f"{name}_sum" + _labels(labels) + f" {h.total:g}")
        lines.append(f"{name}_count" + _labels(labels) + f" {h.count}")
