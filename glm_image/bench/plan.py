"""`glm-image bench plan`: how many AR and DiT replicas to deploy, from a `bench speed` report.

A replica of a stage makes ``batch`` images per call, so per replica (from the report's medians
of our engine, ``ours``):

    AR:  ar_rate  = batch / (ar_prefill_s + ar_decode_s)   images/s
    DiT: dit_rate = batch / (dit_s + vae_s)                 images/s (the VAE runs on the DiT replica)

``a`` AR replicas of ``ar_gpus`` accelerators and ``d`` DiT replicas of ``dit_gpus`` on ``gpus``
accelerators (``a * ar_gpus + d * dit_gpus <= gpus``) make ``min(a * ar_rate, d * dit_rate)``
images/s; the plan is the ``(a, d)`` that makes the most (the fewest accelerators on a tie). The
baseline is monolithic replicas on the same accelerators, each running both stages in turn
(``1 / seconds_per_image`` each). Not modelled: transfers between replicas (a few KB of token
ids per image), batching across requests beyond the report's ``batch``, and the overlap of the
two stages on one device.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import GlmImageError
from .report import build_report, markdown_table

__all__ = ["best_split", "format_plan", "plan_from_speed", "stage_rates"]


def stage_rates(ours: dict[str, Any], batch: int) -> dict[str, float]:
    """Images per second of one AR replica, one DiT replica and one monolithic replica."""
    ar = ours["ar_prefill_s"] + ours["ar_decode_s"]
    dit = ours["dit_s"] + ours["vae_s"]
    if ar <= 0 or dit <= 0 or ours["seconds_per_image"] <= 0:
        raise GlmImageError(
            "bench plan: the speed report has a stage time of 0 s; measure with --repeats >= 1"
        )
    rates = {"ar": batch / ar, "dit": batch / dit, "monolithic": 1 / ours["seconds_per_image"]}
    if not all(math.isfinite(rate) for rate in rates.values()):  # times of 1e-320 s: not a measurement
        raise GlmImageError("bench plan: the speed report's stage times are too small to be measurements")
    return rates


def best_split(
    ar_rate: float, dit_rate: float, gpus: int, ar_gpus: int = 1, dit_gpus: int = 1
) -> tuple[int, int]:
    """``(AR replicas, DiT replicas)``, at least one each, that make the most images per second
    on ``gpus`` accelerators (on a tie: the fewest accelerators, then the fewest AR replicas)."""
    if ar_gpus + dit_gpus > gpus:
        raise GlmImageError(
            f"--gpus {gpus}: one AR replica ({ar_gpus}) and one DiT replica ({dit_gpus}) need {ar_gpus + dit_gpus}"
        )
    best, key = (1, 1), None
    for a in range(1, (gpus - dit_gpus) // ar_gpus + 1):
        d = (gpus - a * ar_gpus) // dit_gpus
        # the fewest DiT replicas that keep the same rate: the rest of the accelerators stay free
        rate = min(a * ar_rate, d * dit_rate)
        d = min(d, max(1, math.ceil(rate / dit_rate - 1e-9)))
        candidate = (round(rate, 9), -(a * ar_gpus + d * dit_gpus), -a)
        if key is None or candidate > key:
            best, key = (a, d), candidate
    return best


def plan_from_speed(report: dict[str, Any], gpus: int, ar_gpus: int = 1, dit_gpus: int = 1) -> dict[str, Any]:
    """One plan per case of a ``bench speed`` report, in the shared report layout."""
    if report.get("benchmark") != "speed" or not report.get("results"):
        raise GlmImageError(
            f"bench plan: expected a `glm-image bench speed --out` report with results; got benchmark "
            f"{report.get('benchmark')!r}"
        )
    if gpus < 2:
        raise GlmImageError(f"--gpus {gpus}; allowed: an integer >= 2 (one AR and one DiT replica)")
    for flag, value in (("--ar-gpus", ar_gpus), ("--dit-gpus", dit_gpus)):
        if value < 1:
            raise GlmImageError(f"{flag} {value}; allowed: an integer >= 1")
    results = []
    for case in report["results"]:
        rates = stage_rates(case["ours"], case["batch"])
        a, d = best_split(rates["ar"], rates["dit"], gpus, ar_gpus, dit_gpus)
        split = min(a * rates["ar"], d * rates["dit"])
        monolithic = (gpus // max(ar_gpus, dit_gpus)) * rates["monolithic"]
        results.append(
            {
                "size": case["size"],
                "batch": case["batch"],
                "steps": case.get("steps"),
                "ar_images_per_s_per_replica": round(rates["ar"], 6),
                "dit_images_per_s_per_replica": round(rates["dit"], 6),
                "dit_replicas_per_ar_replica": round(rates["ar"] / rates["dit"], 3),
                "ar_replicas": a,
                "dit_replicas": d,
                "gpus_used": a * ar_gpus + d * dit_gpus,
                "images_per_s": round(split, 6),
                "monolithic_images_per_s": round(monolithic, 6),
                "speedup_vs_monolithic": round(split / monolithic, 3) if monolithic > 0 else None,
                "bottleneck": "ar" if a * rates["ar"] <= d * rates["dit"] else "dit",
            }
        )
    config = {
        "gpus": gpus,
        "ar_gpus_per_replica": ar_gpus,
        "dit_gpus_per_replica": dit_gpus,
        "speed_report": {k: report.get(k) for k in ("created", "machine", "config")},
    }
    notes = [
        "images/s = min(AR replicas x AR rate, DiT replicas x DiT rate); rates from the speed report's "
        "medians of ours; the VAE counts toward the DiT",
        "monolithic: every replica runs both stages in turn on max(ar_gpus, dit_gpus) accelerators",
    ]
    return build_report("plan", results, config=config, notes=notes, device="cpu")


MAX_REPORT_BYTES = 16 * 2**20  # a speed report is a few KB; more is not one
MAX_BATCH, MAX_SECONDS = 10**6, 1e9  # beyond these a report is not a measurement; the maths would overflow
STAGE_FIELDS = ("ar_prefill_s", "ar_decode_s", "dit_s", "vae_s", "seconds_per_image")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_speed_report(path: str | Path) -> dict[str, Any]:
    """A ``bench speed --out`` report, checked field by field: every flaw is one line naming the
    file and the field, never a traceback. Reads regular files only (a FIFO or ``/dev/zero`` would
    block or never end) and at most ``MAX_REPORT_BYTES``."""
    where = f"bench plan: {path}"
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise GlmImageError(f"{where}: not a regular file; allowed: a JSON report file")
        with open(fd, "rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
    except OSError as e:
        raise GlmImageError(f"{where}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_REPORT_BYTES:
        raise GlmImageError(f"{where}: larger than {MAX_REPORT_BYTES // 2**20} MiB; not a speed report")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GlmImageError(
            f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        report = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise GlmImageError(f"{where}: not JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise GlmImageError(f"{where}: JSON nested too deeply; not a speed report") from None
    except ValueError as e:  # NaN/Infinity, or an integer of thousands of digits
        raise GlmImageError(f"{where}: not valid JSON ({e})") from None
    problem = _report_problem(report)
    if problem is not None:
        raise GlmImageError(f"{where}: {problem}; expected a `glm-image bench speed --out` report")
    return report


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _report_problem(report: Any) -> str | None:
    """What makes ``report`` unusable for a plan, naming the field; None when it is usable."""
    if not isinstance(report, dict):
        return f"the top level is {_shown(report)}, not an object"
    if report.get("benchmark") != "speed":
        return f'benchmark = {_shown(report.get("benchmark"))}, not "speed"'
    results = report.get("results")
    if not isinstance(results, list) or not results:
        return f"results = {_shown(results)}; expected a non-empty list of cases"
    for i, case in enumerate(results):
        at = f"results[{i}]"
        if not isinstance(case, dict):
            return f"{at} = {_shown(case)}; expected an object"
        if not isinstance(case.get("size"), str):
            return f'{at}.size = {_shown(case.get("size"))}; expected a string such as "1024x1024"'
        batch = case.get("batch")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            return f"{at}.batch = {_shown(batch)}; expected an integer in 1..{MAX_BATCH}"
        steps = case.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            return f"{at}.steps = {_shown(steps)}; expected an integer >= 1"
        ours = case.get("ours")
        if not isinstance(ours, dict):
            return f"{at}.ours = {_shown(ours)}; expected an object of our engine's medians"
        for name in STAGE_FIELDS:
            value = ours.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return f"{at}.ours.{name} = {_shown(value)}; expected a number of seconds"
            if not 0 <= value <= MAX_SECONDS:
                return f"{at}.ours.{name} = {_shown(value)}; expected seconds in 0..{MAX_SECONDS:g}"
    return None


def format_plan(plan: dict[str, Any]) -> str:
    config = plan["config"]
    rows = [
        [
            r["size"],
            r["batch"],
            f"{r['ar_images_per_s_per_replica']:.4g}",
            f"{r['dit_images_per_s_per_replica']:.4g}",
            f"{r['ar_replicas']}:{r['dit_replicas']}",
            f"{r['images_per_s']:.4g}",
            f"{r['monolithic_images_per_s']:.4g}",
            r["speedup_vs_monolithic"],
            r["bottleneck"],
        ]
        for r in plan["results"]
    ]
    headers = [
        "size",
        "batch",
        "AR img/s/replica",
        "DiT img/s/replica",
        "AR:DiT",
        "img/s",
        "monolithic img/s",
    ]
    table = markdown_table([*headers, "x", "bound by"], rows)
    first = plan["results"][0]
    yaml = (
        f"\nFor {first['size']} on {config['gpus']} accelerators, in deploy/glm-image-ray.yaml (args):\n"
        f"  ar_replicas: {first['ar_replicas']}\n  dit_replicas: {first['dit_replicas']}\n"
        f"  ar_gpus: {config['ar_gpus_per_replica']}\n  dit_gpus: {config['dit_gpus_per_replica']}\n"
        f"or: glm-image serve --ray --ar-replicas {first['ar_replicas']} --dit-replicas {first['dit_replicas']}"
    )
    return table + "\n" + yaml
