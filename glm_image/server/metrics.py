"""Prometheus text exposition, written by hand: a handful of series need no client library.

Every update happens on the event loop thread or under the lock, so a scrape never sees a
half-written histogram.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

__all__ = ["Metrics"]

# Seconds: from a 64x64 CPU test image (milliseconds) to a long queue wait on a busy GPU.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
# ar, dit, vae: once per engine call (a batch shares them); queue_wait, total: once per request.
STAGES = ("ar", "dit", "vae", "queue_wait", "total")
# Request counters are labelled by route, never by raw path, so a scan cannot grow the series.
ENDPOINTS = (
    "/api/paas/v4/images/generations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/health",
    "/metrics",
    "/",  # the page (``web``) and what it reads
    "/v1/web/config",
    "/v1/files",
)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    for prefix in ("/files/", "/web/", "/v1/progress/"):
        if path.startswith(prefix):
            return prefix.rstrip("/")
    return "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # not cumulative; summed when rendered
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.images_generated = 0
        self.engine_calls = 0
        self.engine_failures = 0
        self.engine_stopped = 0
        self.batches_split = 0  # calls of several requests that raised; each request ran again alone
        self.ar_graph_captures = 0  # AR decode graphs captured (a bucket's first call; engine.graphs)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)  # reason -> queued jobs removed before they ran
        self.stages = {stage: _Histogram() for stage in STAGES}
        self.batch_sizes = _Histogram((1, 2, 4, 8, 16, 32))  # requests per engine call
        # Stage occupancy: calls working in each stage now, seconds each stage was busy, and
        # seconds two or more stages were busy at once (the overlap a staged executor buys).
        self._in_stage: dict[str, int] = defaultdict(int)
        self.busy_seconds: dict[str, float] = defaultdict(float)
        self.overlap_seconds = 0.0
        self._since = time.perf_counter()

    def _advance(self, now: float) -> None:
        """Credit the time since the last change to the stages busy during it (under the lock)."""
        elapsed, busy = now - self._since, [stage for stage, n in self._in_stage.items() if n]
        for stage in busy:
            self.busy_seconds[stage] += elapsed
        if len(busy) >= 2:
            self.overlap_seconds += elapsed
        self._since = now

    def declare_stages(self, stages) -> None:
        """The executor's stage names, so every stage's series shows from the first scrape."""
        with self._lock:
            for stage in stages:
                self._in_stage[stage] += 0
                self.busy_seconds[stage] += 0.0

    def stage_busy(self, stage: str, busy: bool) -> None:
        """A call entered (``busy``) or left ``stage``."""
        with self._lock:
            self._advance(time.perf_counter())
            self._in_stage[stage] += 1 if busy else -1

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.stages[stage].observe(seconds)

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint_label(path), status)] += 1

    def count_engine_call(
        self, requests: int, timings: dict[str, float] | None, stopped: bool = False, graphs: int = 0
    ) -> None:
        """``timings`` None: the call raised; ``stopped``: on purpose, every request abandoned;
        ``graphs``: the AR decode graphs the call captured."""
        with self._lock:
            self.engine_calls += 1
            self.ar_graph_captures += graphs
            self.batch_sizes.observe(requests)
            if timings is None:
                if stopped:
                    self.engine_stopped += 1
                else:
                    self.engine_failures += 1
                return
            for stage in ("ar", "dit", "vae"):
                if stage in timings:
                    self.stages[stage].observe(timings[stage])

    def count_split(self) -> None:
        with self._lock:
            self.batches_split += 1

    def count_images(self, count: int) -> None:
        with self._lock:
            self.images_generated += count

    def count_dropped(self, reason: str) -> None:
        with self._lock:
            self.dropped[reason] += 1

    def render(self, queue_depth: int, queue_capacity: int, running: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        def histogram(name: str, label: str, hist: _Histogram) -> list[tuple[str, float]]:
            samples, running_total = [], 0
            prefix = f"{label}," if label else ""
            for bound, count in zip(hist.buckets, hist.counts, strict=True):
                running_total += count
                samples.append((f'_bucket{{{prefix}le="{bound}"}}', running_total))
            samples.append((f'_bucket{{{prefix}le="+Inf"}}', hist.count))
            wrapped = f"{{{label}}}" if label else ""
            samples += [(f"_sum{wrapped}", hist.sum), (f"_count{wrapped}", hist.count)]
            return [(f"{name}{suffix}", value) for suffix, value in samples]

        with self._lock:
            self._advance(time.perf_counter())
            metric("glm_image_queue_depth", "gauge", "Jobs waiting for the engine.", [("", queue_depth)])
            metric(
                "glm_image_queue_capacity",
                "gauge",
                "Jobs the queue holds before 429.",
                [("", queue_capacity)],
            )
            metric("glm_image_running_jobs", "gauge", "Jobs in the engine call now running.", [("", running)])
            metric(
                "glm_image_images_generated_total",
                "counter",
                "Images generated.",
                [("", self.images_generated)],
            )
            metric(
                "glm_image_engine_calls_total",
                "counter",
                "Engine calls (batches).",
                [("", self.engine_calls)],
            )
            metric(
                "glm_image_engine_failures_total",
                "counter",
                "Engine calls that raised (a call of several requests is then run again, one "
                "request at a time, and those calls are counted too).",
                [("", self.engine_failures)],
            )
            metric(
                "glm_image_engine_batches_split_total",
                "counter",
                "Engine calls of several requests that raised, whose requests then ran alone.",
                [("", self.batches_split)],
            )
            metric(
                "glm_image_engine_calls_stopped_total",
                "counter",
                "Engine calls stopped early because every request in them was abandoned.",
                [("", self.engine_stopped)],
            )
            metric(
                "glm_image_ar_graph_captures_total",
                "counter",
                "AR decode graphs captured: once per bucket (batch, KV capacity, sampling) kept by the "
                "engine; a request of a shape seen before replays its graph and adds nothing.",
                [("", self.ar_graph_captures)],
            )
            metric(
                "glm_image_requests_total",
                "counter",
                "HTTP requests by endpoint and status.",
                [
                    (f'{{endpoint="{_escape(endpoint)}",status="{status}"}}', count)
                    for (endpoint, status), count in sorted(self.requests.items())
                ],
            )
            metric(
                "glm_image_jobs_dropped_total",
                "counter",
                "Queued jobs removed before they ran (client gone, timed out).",
                [(f'{{reason="{_escape(reason)}"}}', n) for reason, n in sorted(self.dropped.items())],
            )
            metric(
                "glm_image_stage_calls",
                "gauge",
                "Engine calls working in each executor stage now.",
                [(f'{{stage="{_escape(stage)}"}}', n) for stage, n in sorted(self._in_stage.items())],
            )
            metric(
                "glm_image_stage_busy_seconds_total",
                "counter",
                "Seconds each executor stage (engine; or ar and dit) was working on a call.",
                [
                    (f'{{stage="{_escape(stage)}"}}', round(s, 6))
                    for stage, s in sorted(self.busy_seconds.items())
                ],
            )
            metric(
                "glm_image_stage_overlap_seconds_total",
                "counter",
                "Seconds two stages worked at once (one batch's AR beside another's DiT).",
                [("", round(self.overlap_seconds, 6))],
            )
            lines.append(
                "# HELP glm_image_stage_seconds Latency per stage: ar, dit, vae per engine call; "
                "queue_wait, total per request."
            )
            lines.append("# TYPE glm_image_stage_seconds histogram")
            for stage, hist in self.stages.items():
                for name, value in histogram("glm_image_stage_seconds", f'stage="{stage}"', hist):
                    lines.append(f"{name} {_number(value)}")
            lines.append("# HELP glm_image_batch_requests Requests per engine call.")
            lines.append("# TYPE glm_image_batch_requests histogram")
            for name, value in histogram("glm_image_batch_requests", "", self.batch_sizes):
                lines.append(f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"
