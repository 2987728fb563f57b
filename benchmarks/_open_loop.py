"""``load_server.py --rate`` / ``--load``: open-loop Poisson arrivals against continuous and
static batching, in the same run, on the same loaded model.

Requests arrive at exponential gaps (a seeded Poisson process at ``--rate`` requests/s; or
``--load`` F: F times the capacity measured here first, one request at a time, each size once),
each on its own thread whether or not the earlier ones are answered (open loop: a slow server
meets the same arrivals, so its queue grows, as in production). Sizes cycle through ``--sizes``.
Per ``--batching`` mode: throughput (answered requests over the time from the first arrival to
the last answer), latency p50/p90/p99 (arrival to answer), and for continuous the AR's slot
occupancy (rows run per iteration over ``--max-rows``) and mean running rows from ``/metrics``.
``continuous-batched`` forces the scheduler's batched rows (one forward per iteration over all
rows: an accelerator's default; on a CPU not bit-exact) to show what batching the forward adds.
``continuous-stages`` and ``static-stages`` serve with the AR and the DiT in two worker processes
(``--stages separate``; the continuous scheduler then lives in the AR worker, driven by ticks),
each compared with ``static-stages``; the others with ``static``.
Every request must get status 200 and one PNG of its size; the run fails (exit 1) otherwise.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from _report import parse_size, write_report

PATH = "/v1/images/generations"
MODES = ("continuous", "static", "continuous-batched", "continuous-stages", "static-stages")


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _body(args, index: int) -> dict:
    width, height = parse_size(args.sizes[index % len(args.sizes)])
    return {
        "prompt": f"A storefront sign that says 'OPEN {index}'",
        "size": f"{width}x{height}",
        "seed": args.seed + 1000 * (index + 1),
        "steps": args.steps,
        "response_format": "b64_json",
    }


def _one(url: str, body: dict, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        r = requests.post(url + PATH, json=body, timeout=timeout)
        ok = r.status_code == 200 and len(r.json().get("data", [])) == 1
        status = r.status_code
    except requests.RequestException as e:
        ok, status = False, type(e).__name__
    end = time.perf_counter()
    return {
        "start": start,
        "end": end,
        "latency": end - start,
        "ok": ok,
        "status": status,
        "size": body["size"],
    }


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4)


def _serve(pipe, args, batching: str, out_dir: Path):
    from glm_image.server.app import create_app
    from glm_image.server.continuous import executor_for
    from glm_image.server.runner import ServerThread
    from glm_image.server.settings import ServerSettings

    settings = ServerSettings(
        output_dir=out_dir,
        max_queue=max(args.requests, 1),
        max_batch=args.max_batch,
        timeout=args.timeout,
        steps=args.steps,
    )
    if batching.endswith("-stages"):  # the AR and the DiT in two worker processes: --stages separate
        from glm_image.hub import resolve_checkpoint
        from glm_image.server.executors import ModelFront
        from glm_image.server.workers import staged_processes

        front = ModelFront.from_checkpoint(args.model)
        executor = staged_processes(
            front,
            str(resolve_checkpoint(args.model)),
            device=args.device,
            threads=args.threads,
            batching=batching.removesuffix("-stages"),
            max_rows=args.max_rows,
        )
        return ServerThread(create_app(front, settings, executor), startup_timeout=600)
    if batching == "continuous-batched":  # the accelerator's batched rows, forced (not exact on a CPU)
        from glm_image.server.continuous import ContinuousExecutor

        executor = ContinuousExecutor(pipe, max_rows=args.max_rows, mode="batched")
    else:
        executor = executor_for(pipe, batching, args.max_rows)
    return ServerThread(create_app(pipe, settings, executor), startup_timeout=600)


def _capacity(pipe, args) -> float:
    """Requests/s of one request at a time (each size once, after a warm-up): what --load scales."""
    from glm_image.request import GenerationRequest

    def one(size: str, seed: int) -> float:
        width, height = parse_size(size)
        start = time.perf_counter()
        pipe.run(GenerationRequest("capacity", width=width, height=height, steps=args.steps, seed=seed))
        return time.perf_counter() - start

    one(args.sizes[0], 0)  # warm-up
    seconds = [one(size, i) for i, size in enumerate(args.sizes)]
    return len(seconds) / sum(seconds)


def _load(url: str, args, arrivals: list[float]) -> dict:
    results: list[dict | None] = [None] * len(arrivals)
    threads = []
    before = _metrics(url)
    origin = time.perf_counter()
    for index, at in enumerate(arrivals):
        delay = origin + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

        def run(i=index) -> None:
            results[i] = _one(url, _body(args, i), args.timeout)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(args.timeout + 5)
    after = _metrics(url)
    done = [r for r in results if r is not None]
    ok = [r for r in done if r["ok"]]
    span = max((r["end"] for r in done), default=origin) - origin
    latencies = [r["latency"] for r in ok]
    report = {
        "requests": len(arrivals),
        "answered_200": len(ok),
        "statuses": sorted({str(r["status"]) for r in done if not r["ok"]}),
        "seconds": round(span, 3),
        "requests_per_s": round(len(ok) / span, 4) if span > 0 else None,
        "latency_s": {
            "p50": _percentile(latencies, 0.5),
            "p90": _percentile(latencies, 0.9),
            "p99": _percentile(latencies, 0.99),
            "mean": round(sum(latencies) / len(latencies), 4) if latencies else None,
        },
    }
    iterations = after.get("glm_image_ar_iterations_total", 0) - before.get(
        "glm_image_ar_iterations_total", 0
    )
    if iterations:
        rows = after["glm_image_ar_row_iterations_total"] - before.get("glm_image_ar_row_iterations_total", 0)
        busy = after["glm_image_ar_busy_seconds_total"] - before.get("glm_image_ar_busy_seconds_total", 0)
        report["ar"] = {
            "iterations": int(iterations),
            "mean_running_rows": round(rows / iterations, 3),
            "slot_occupancy": round(rows / iterations / after["glm_image_ar_max_rows"], 4),
            "busy_fraction": round(busy / span, 4) if span > 0 else None,
        }
    report["ok"] = len(ok) == len(arrivals)
    return report


def _free_memory() -> None:
    """Give back what objects let go of held, device memory too."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_open_loop(args) -> int:
    """The open-loop comparison; returns the exit status."""
    import torch

    from glm_image import GlmImage

    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    modes = [m.strip() for m in args.batching.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--batching {args.batching!r}; allowed: a comma list of {', '.join(MODES)}")
    # the modes in the server process first: the pipeline is let go before the stage workers load
    # theirs (on a GPU the released model would otherwise be on it three times)
    modes.sort(key=lambda m: m.endswith("-stages"))
    in_process = any(not m.endswith("-stages") for m in modes)
    pipe = GlmImage.from_pretrained(args.model, device=args.device) if in_process or args.load else None
    capacity = _capacity(pipe, args) if args.load is not None else None
    rate = args.rate if args.rate is not None else args.load * capacity
    rng = random.Random(args.seed)
    arrivals, at = [], 0.0
    for _ in range(args.requests):
        at += rng.expovariate(rate)
        arrivals.append(at)
    results = []
    for mode in modes:
        if mode.endswith("-stages") and pipe is not None:
            pipe.close()
            pipe = None
            _free_memory()
        with (
            tempfile.TemporaryDirectory(prefix="glm-image-open-loop-") as out,
            _serve(pipe, args, mode, Path(out)) as url,
        ):
            _one(url, _body(args, 0), args.timeout)  # warm-up, not timed
            results.append(
                {
                    "batching": mode,
                    "max_rows": args.max_rows,
                    "max_batch": args.max_batch,
                    **_load(url, args, arrivals),
                }
            )
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # each mode as it ends: long runs
    for result in results:
        # each against static batching where the stages run alike: in the server process, or in
        # worker processes (the "-stages" modes)
        alike = "static-stages" if result["batching"].endswith("-stages") else "static"
        static = next((r for r in results if r["batching"] == alike), None)
        if (
            static is not None
            and result is not static
            and static["requests_per_s"]
            and result["requests_per_s"]
        ):
            result["throughput_vs_static"] = round(result["requests_per_s"] / static["requests_per_s"], 3)
            result["p99_vs_static"] = round(result["latency_s"]["p99"] / static["latency_s"]["p99"], 3)
    config = {
        "model": args.model,
        "sizes": args.sizes,
        "steps": args.steps,
        "rate_per_s": round(rate, 4),
        "load": args.load,
        "capacity_per_s": round(capacity, 4) if capacity else None,
        "requests": args.requests,
        "threads": args.threads,
        "arrival_seed": args.seed,
    }
    write_report("server_open_loop", results, args.out, config=config)
    return 0 if all(r["ok"] for r in results) else 1
