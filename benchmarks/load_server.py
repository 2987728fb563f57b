"""HTTP server under load: N concurrent clients, throughput, latency percentiles, and a check
that every request got exactly one distinct, valid image.

    python benchmarks/load_server.py --requests 16 --size 64x64 --steps 2 --out results/load_server.json
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --requests 8 --size 1024x1024
    python benchmarks/load_server.py --requests 16 --bad 8 --max-batch 4   # bad requests mixed in
    python benchmarks/load_server.py --server single,stages,ray --max-batch 4 --out results/load_servers.json
    python benchmarks/load_server.py --load 0.8 --requests 24 --sizes 64x64,96x64,64x128 --max-batch 4

``--rate`` or ``--load`` switches to open-loop Poisson arrivals against continuous and static
batching in the same run (``_open_loop.py``: throughput, p50/p99 latency, AR slot occupancy).

Without ``--url`` it starts the server itself on 127.0.0.1 and a free port, on ``--model``
(default tiny), once per ``--server`` and ``--max-batch`` value, so the executors and batching
are measured against each other in the same run (the ratio is the signal; absolute times on a
shared CPU are noise). ``--server``: ``single`` (one engine call at a time in the server
process; uvicorn in a thread), ``stages`` (the AR and the DiT in two worker processes,
overlapped: ``--stages separate``), ``ray`` (a local Ray instance with ``--ar-replicas`` and
``--dit-replicas``, its CPUs shared among them: ``--ray``). ``--url`` must be a loopback address. The run is bounded: every request has a timeout and
the whole load a deadline, after which unfinished requests count as failures. Exit status 1 when
any check fails.

Checks, after the timed part (so they cost no latency): status 200; exactly one image per
request; the seed echoed is the one sent; the image (downloaded URL or decoded base64) is a PNG of
the requested size; no two requests share a file id or image bytes.

``--bad K`` mixes K hostile requests evenly into the load, cycling through their kinds:
``special`` (a prompt full of the tokenizer's special-token strings: valid, so it must get its one
image like any other), ``invalid`` (a bad size, a lone surrogate, guidance 1e30, an unknown field:
each must be a 400) and, on a ``single`` server started here, ``fault`` (a prompt the engine fails on: a
wrapper makes the DiT return NaN for it, as a broken kernel would; it must be a 500, and the
valid requests batched with it must still get their images). The report counts each kind and
whether every valid request got exactly one valid image.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import ipaddress
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import parse_size, write_report

SERVERS = ("single", "stages", "ray")
PATHS = {"openai": "/v1/images/generations", "bigmodel": "/api/paas/v4/images/generations"}
PROMPT = "A storefront sign that says 'OPEN {}'"
FAULT = "FAULT-INJECTED"  # a prompt holding this makes the locally started engine return NaN
SPECIAL = "<|image|> <|dit_token_16384|> 'OPEN {}' <sop>1 1<eop> [gMASK] '</s>' <|endoftext|>"
INVALID = (  # (changes to a valid body, what the test wants): every one a 400
    {"size": "64 x 64"},
    {"prompt": "a\ud800b"},
    {"guidance": 1e30},
    {"style": "vivid"},
)


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scrape(url: str, headers: dict) -> dict[str, float]:
    """The server's engine counters (for the batch sizes it actually used)."""
    text = requests.get(url + "/metrics", headers=headers, timeout=10).text
    wanted = (
        "glm_image_engine_calls_total",
        "glm_image_batch_requests_sum",
        "glm_image_images_generated_total",
        "glm_image_engine_failures_total",
        "glm_image_engine_batches_split_total",
    )
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted or name.startswith(
            ("glm_image_stage_busy_seconds_total{", "glm_image_stage_overlap")
        ):
            values[name] = float(value)
    return values


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        value = values[0] if values else float("nan")
        return {"p50": value, "p90": value, "p99": value, "max": value, "mean": value}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(q[49], 4),
        "p90": round(q[89], 4),
        "p99": round(q[98], 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
    }


def request_body(args, index: int, kind: str = "valid", variant: int = 0) -> tuple[dict, int]:
    """The JSON body of request ``index`` of ``kind`` and the status it must get."""
    width, height = parse_size(args.size)
    body = {
        "prompt": PROMPT.format(index),
        "size": f"{width}x{height}",
        "seed": args.seed + 1000 * (index + 1),  # the warm-up (-1) uses --seed
        "steps": args.steps,
        "response_format": args.response_format,
    }
    if args.endpoint == "bigmodel":
        body["model"] = "glm-image"
    if kind == "special":
        body["prompt"] = SPECIAL.format(index)
    elif kind == "fault":
        body["prompt"] = f"{FAULT} {index}"
        return body, 500
    elif kind == "invalid":
        body.update(INVALID[variant % len(INVALID)])
        return body, 400
    return body, 200


def load_plan(args, fault: bool) -> list[tuple[int, str, int]]:
    """(index, kind, variant) of every request: ``--requests`` valid ones with ``--bad`` hostile
    ones spread evenly among them."""
    kinds = ["special", "invalid", "fault"] if fault else ["special", "invalid"]
    valid = [((i + 0.5) / args.requests, (i, "valid", 0)) for i in range(args.requests)]
    bad = [
        ((j + 0.5) / args.bad, (args.requests + j, kinds[j % len(kinds)], j // len(kinds)))
        for j in range(args.bad)
    ]
    return [item for _, item in sorted(valid + bad, key=lambda pair: pair[0])]


def one_request(url: str, args, index: int, headers: dict, kind: str = "valid", variant: int = 0) -> dict:
    body, expect = request_body(args, index, kind, variant)
    start = time.perf_counter()
    try:
        response = requests.post(url + PATHS[args.endpoint], json=body, headers=headers, timeout=args.timeout)
    except requests.RequestException as e:
        return {"index": index, "kind": kind, "expect": expect, "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - start
    result = {"index": index, "seed": body["seed"], "status": response.status_code, "seconds": seconds}
    result.update(kind=kind, expect=expect)
    try:
        result["data"] = response.json().get("data")
    except ValueError:
        result["error"] = f"not JSON: {response.text[:200]!r}"
    if response.status_code != 200:
        result["error"] = response.text[:300]
    return result


def check(results: list[dict], args, headers: dict) -> dict:
    """Every valid request: one image, its own seed, a PNG of the right size; no id or bytes
    shared. Every hostile one: the status it must get."""
    from PIL import Image

    width, height = parse_size(args.size)
    failures, digests, ids = [], {}, {}
    kinds: dict[str, dict[str, int]] = {}
    for result in results:
        where = f"request {result['index']} ({result.get('kind', 'valid')})"
        tally = kinds.setdefault(result.get("kind", "valid"), {"sent": 0, "as_expected": 0})
        tally["sent"] += 1
        if result.get("expect", 200) != 200:
            if result.get("status") == result["expect"]:
                tally["as_expected"] += 1
            else:
                failures.append(f"{where}: {result.get('status')}, expected {result['expect']}")
            continue
        if "error" in result or result.get("status") != 200:
            failures.append(f"{where}: {result.get('status')} {result.get('error', '')}")
            continue
        data = result.get("data") or []
        if len(data) != 1:
            failures.append(f"{where}: {len(data)} images, expected exactly 1")
            continue
        item = data[0]
        if item.get("seed") != result["seed"]:
            failures.append(f"{where}: seed {item.get('seed')}, sent {result['seed']}")
        if "url" in item:
            match = re.search(r"/files/([0-9a-f]{32})\.png$", item["url"])
            if match is None:
                failures.append(f"{where}: unexpected URL {item['url']!r}")
                continue
            if match.group(1) in ids:
                failures.append(f"{where}: file id shared with request {ids[match.group(1)]}")
            ids[match.group(1)] = result["index"]
            download = requests.get(item["url"], headers=headers, timeout=30)
            content = download.content if download.status_code == 200 else b""
        else:
            content = base64.b64decode(item.get("b64_json", ""))
        try:
            image = Image.open(io.BytesIO(content))
            image.load()
            if image.format != "PNG" or image.size != (width, height):
                failures.append(f"{where}: {image.format} {image.size}, expected PNG {(width, height)}")
        except OSError as e:
            failures.append(f"{where}: not an image ({e})")
            continue
        digest = hashlib.sha256(content).hexdigest()
        if digest in digests:
            failures.append(f"{where}: same image bytes as request {digests[digest]}")
            continue
        digests[digest] = result["index"]
        tally["as_expected"] += 1
    valid = [r for r in results if r.get("expect", 200) == 200]
    return {
        "ok": not failures,
        "distinct_images": len(digests),
        # the claim of the bad-request mode: each valid request, exactly one valid image of its own
        "valid_requests": len(valid),
        "valid_with_one_image": sum(kinds.get(k, {}).get("as_expected", 0) for k in ("valid", "special")),
        "by_kind": kinds,
        "failures": failures[:20],
    }


def run_load(url: str, args, headers: dict, fault: bool = False) -> dict:
    """One bounded load: a warm-up request, then ``--requests`` (and ``--bad``) over
    ``--concurrency`` threads."""
    warm = one_request(url, args, -1, headers)
    if warm.get("status") != 200:
        raise SystemExit(f"warm-up request failed: {warm.get('status')} {warm.get('error')}")
    before = scrape(url, headers)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        futures = [
            pool.submit(one_request, url, args, index, headers, kind, variant)
            for index, kind, variant in load_plan(args, fault)
        ]
        done, late = wait(futures, timeout=args.max_seconds)
        for future in late:
            future.cancel()
    wall = time.perf_counter() - start
    results = [f.result() for f in futures if f in done]
    results += [{"index": -2, "error": "past --max-seconds"} for _ in late]
    after = scrape(url, headers)
    calls = after.get("glm_image_engine_calls_total", 0) - before.get("glm_image_engine_calls_total", 0)
    batched = after.get("glm_image_batch_requests_sum", 0) - before.get("glm_image_batch_requests_sum", 0)
    ok = [r for r in results if r.get("status") == 200]
    counters = {
        name.removeprefix("glm_image_"): int(after.get(name, 0) - before.get(name, 0))
        for name in ("glm_image_engine_failures_total", "glm_image_engine_batches_split_total")
    }
    # seconds each executor stage worked during the load, and seconds two stages worked at once
    busy = {
        re.sub(r'.*stage="(\w+)".*', r"\1", name): round(value - before.get(name, 0), 3)
        for name, value in after.items()
        if name.startswith("glm_image_stage_busy_seconds_total{")
    }
    overlap = "glm_image_stage_overlap_seconds_total"
    counters["stage_busy_s"] = busy
    counters["stage_overlap_s"] = round(after.get(overlap, 0) - before.get(overlap, 0), 3)
    return {
        "requests": args.requests,
        "bad": args.bad,
        "concurrency": args.concurrency,
        "size": args.size,
        "steps": args.steps,
        "endpoint": args.endpoint,
        "response_format": args.response_format,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3),
        "latency_s": percentiles([r["seconds"] for r in ok]),
        "engine_calls": int(calls),
        "mean_requests_per_engine_call": round(batched / calls, 2) if calls else None,
        **counters,
        "checks": check(results, args, headers),
    }


def inject_faults(pipe) -> None:
    """The DiT returns NaN for every image whose prompt holds FAULT, as a broken kernel would: the
    pipeline's guard refuses the result and the server must fail that request alone."""
    import torch

    denoise = pipe.dit.denoise

    def faulty(prior, prompts, *rest, **options):
        latents = denoise(prior, prompts, *rest, **options)
        per = latents.shape[0] // len(prompts)
        bad = torch.tensor([FAULT in p for p in prompts], device=latents.device).repeat_interleave(per)
        return torch.where(bad.view(-1, *[1] * (latents.dim() - 1)), float("nan"), latents)

    pipe.dit.denoise = faulty


@contextlib.contextmanager
def serve_locally(args, kind: str, max_batch: int, pipe, out_dir: Path):
    """The server of ``kind`` on 127.0.0.1 and a free port; yields its URL."""
    from glm_image.server.app import create_app
    from glm_image.server.runner import ServerThread
    from glm_image.server.settings import ServerSettings

    settings = ServerSettings(
        output_dir=out_dir,
        max_queue=max(args.requests + args.bad, 1),
        max_batch=max_batch,
        timeout=args.timeout,
        steps=args.steps,
    )
    if kind == "ray":
        yield from serve_on_ray(args, settings)
        return
    if kind == "stages":
        from glm_image.hub import resolve_checkpoint
        from glm_image.server.executors import ModelFront
        from glm_image.server.workers import staged_processes

        front = ModelFront.from_checkpoint(args.model)
        executor = staged_processes(
            front, str(resolve_checkpoint(args.model)), device=args.device, threads=args.threads
        )
        app = create_app(front, settings, executor)
    else:
        app = create_app(pipe, settings)
    with ServerThread(app, startup_timeout=600) as url:
        yield url


def serve_on_ray(args, settings):
    """The Ray Serve application on the local Ray instance ``main`` started; removed after."""
    import socket

    from ray import serve

    from glm_image.server.ray_app import APP_NAME, build

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cpus = (os.cpu_count() or 2) / (args.ar_replicas + args.dit_replicas)
    flags = {
        "model": args.model,
        "output_dir": str(settings.output_dir),
        "max_queue": settings.max_queue,
        "max_batch": settings.max_batch,
        "timeout": settings.timeout,
        "steps": settings.steps,
        "ar_replicas": args.ar_replicas,
        "dit_replicas": args.dit_replicas,
        "ar_cpus": cpus,
        "dit_cpus": cpus,
    }
    if args.device:
        flags["device"] = args.device
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(flags), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on a loopback address (default: start one)")
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="bearer key for --url, read from environment variable VAR"
    )
    parser.add_argument("--model", default="tiny", help="model of the server started here (default tiny)")
    parser.add_argument("--device", help="device of the server started here (default: cuda when available)")
    parser.add_argument(
        "--max-batch", default="1,4", help="comma list, one run each (server started here only)"
    )
    parser.add_argument(
        "--server",
        default="single",
        help="comma list of servers to start here, one run each: single, stages, ray (default single)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads of the single server and of each stage worker (default: torch's, the "
        "stage workers splitting the cores; Ray replicas get their CPU share)",
    )
    parser.add_argument("--ar-replicas", type=int, default=1, help="--server ray: AR replicas (default 1)")
    parser.add_argument("--dit-replicas", type=int, default=1, help="--server ray: DiT replicas (default 1)")
    parser.add_argument("--requests", type=int, default=16, help="requests in the load (default 16)")
    parser.add_argument(
        "--bad", type=int, default=0, help="hostile requests mixed into the load (default 0; see above)"
    )
    parser.add_argument("--concurrency", type=int, help="client threads (default: --requests)")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    parser.add_argument("--endpoint", choices=sorted(PATHS), default="openai")
    parser.add_argument("--response-format", choices=("url", "b64_json"), default="url")
    parser.add_argument("--seed", type=int, default=0, help="request i (from 0) uses seed + 1000 * (i + 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="deadline of one load (default 600)")
    parser.add_argument("--out", help="also write the JSON report here")
    open_loop = parser.add_argument_group("open loop (continuous against static batching; see _open_loop.py)")
    open_loop.add_argument("--rate", type=float, help="Poisson arrivals per second (open loop)")
    open_loop.add_argument(
        "--load", type=float, help="arrivals as a fraction of the measured capacity (open loop)"
    )
    open_loop.add_argument("--sizes", default="64x64,96x64,64x128", help="sizes the arrivals cycle through")
    open_loop.add_argument(
        "--batching",
        default="continuous,static",
        help="comma list: continuous, static, continuous-batched, and continuous-stages / "
        "static-stages (the stages in two worker processes, --stages separate; each compared "
        "with static-stages) (default continuous,static)",
    )
    open_loop.add_argument(
        "--max-rows", type=int, default=16, help="continuous: AR rows at once (default 16)"
    )
    args = parser.parse_args(argv)
    if args.rate is not None or args.load is not None:
        if args.url or (args.rate is None) == (args.load is None) or (args.rate or args.load) <= 0:
            parser.error("open loop: give one of --rate or --load (> 0), without --url")
        from _open_loop import run_open_loop

        args.max_batch = int(args.max_batch.split(",")[-1])  # static: the largest of --max-batch
        return run_open_loop(args)
    args.concurrency = args.concurrency or args.requests
    if args.requests < 1 or args.concurrency < 1 or args.bad < 0:
        parser.error("--requests and --concurrency must be >= 1, --bad >= 0")
    headers = {}
    if args.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ.get(args.api_key_env, '')}"

    results = []
    if args.url:
        if not loopback(args.url):
            parser.error(f"--url {args.url}: only loopback addresses (127.0.0.1, ::1, localhost)")
        results.append({"server": args.url, **run_load(args.url.rstrip("/"), args, headers)})
    else:
        kinds = [k.strip() for k in args.server.split(",") if k.strip()]
        if not kinds or set(kinds) - set(SERVERS):
            parser.error(f"--server {args.server}: allowed: a comma list of {', '.join(SERVERS)}")
        pipe = None
        if "single" in kinds:
            import torch

            from glm_image import GlmImage

            if args.threads:
                torch.set_num_threads(args.threads)  # this benchmark process serves nothing else
            pipe = GlmImage.from_pretrained(args.model, device=args.device)
            if args.bad:
                inject_faults(pipe)
        if "ray" in kinds:
            import ray

            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for kind in kinds:
                for max_batch in (int(v) for v in args.max_batch.split(",")):
                    with (
                        tempfile.TemporaryDirectory(prefix="glm-image-load-") as out_dir,
                        serve_locally(args, kind, max_batch, pipe, Path(out_dir)) as url,
                    ):
                        result = run_load(url, args, headers, fault=bool(args.bad) and kind == "single")
                    results.append(
                        {
                            "model": args.model,
                            "server": kind,
                            "max_batch": max_batch,
                            "threads": args.threads,
                            **result,
                        }
                    )
        finally:
            if "ray" in kinds:
                ray.shutdown()
        for result in results:
            same_server = [r for r in results if r["server"] == result["server"]]
            base = next((r for r in same_server if r["max_batch"] == 1), None)
            if base is not None and result is not base and base["requests_per_s"]:
                result["throughput_vs_max_batch_1"] = round(
                    result["requests_per_s"] / base["requests_per_s"], 2
                )
            single = next(
                (r for r in results if r["server"] == "single" and r["max_batch"] == result["max_batch"]),
                None,
            )
            if single is not None and result is not single and single["requests_per_s"]:
                result["throughput_vs_single"] = round(result["requests_per_s"] / single["requests_per_s"], 2)
    write_report("server_load", results, args.out)
    return 0 if all(r["checks"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
