"""`glm-image bench plan`: AR:DiT replica counts from a `bench speed` report (issue 17)."""

from __future__ import annotations

import json

import pytest

from glm_image.bench.plan import best_split, plan_from_speed
from glm_image.errors import GlmImageError


def speed_report(*cases) -> dict:
    """A `bench speed` report with our engine's medians: (size, batch, ar_s, dit_s) per case."""
    results = []
    for size, batch, ar, dit in cases:
        ours = {"ar_prefill_s": 0.1 * ar, "ar_decode_s": 0.9 * ar, "dit_s": 0.8 * dit, "vae_s": 0.2 * dit}
        ours["seconds_per_image"] = (ar + dit) / batch
        results.append({"size": size, "batch": batch, "steps": 50, "ours": ours})
    return {"benchmark": "speed", "created": "2026-01-01T00:00:00", "config": {}, "results": results}


def brute_force(ar_rate, dit_rate, gpus, ar_gpus, dit_gpus) -> float:
    """The best rate over every split: an independent count of what best_split maximizes."""
    return max(
        min(a * ar_rate, d * dit_rate)
        for a in range(1, gpus + 1)
        for d in range(1, gpus + 1)
        if a * ar_gpus + d * dit_gpus <= gpus
    )


def test_a_dit_three_times_slower_gets_three_dit_replicas_per_ar_replica():
    plan = plan_from_speed(speed_report(("1024x1024", 1, 1.0, 3.0)), gpus=8)
    [row] = plan["results"]
    assert (row["ar_replicas"], row["dit_replicas"]) == (2, 6) and row["gpus_used"] == 8
    assert row["dit_replicas_per_ar_replica"] == 3.0
    assert row["images_per_s"] == pytest.approx(2.0) and row["monolithic_images_per_s"] == pytest.approx(2.0)
    assert plan["benchmark"] == "plan" and plan["config"]["gpus"] == 8


def test_a_batched_ar_needs_fewer_ar_replicas_and_beats_monolithic():
    # four images per AR call in the time of one (decode is bandwidth bound), the DiT four times the work
    plan = plan_from_speed(speed_report(("1024x1024", 4, 1.0, 12.0)), gpus=8)
    [row] = plan["results"]
    assert (row["ar_replicas"], row["dit_replicas"]) == (1, 7)
    assert row["images_per_s"] == pytest.approx(7 / 3) and row["bottleneck"] == "dit"
    assert row["speedup_vs_monolithic"] == pytest.approx((7 / 3) / (8 * 4 / 13), abs=1e-3)


@pytest.mark.parametrize(
    ("ar_rate", "dit_rate", "gpus", "ar_gpus", "dit_gpus"),
    [
        (1.0, 0.3, 8, 1, 1),
        (0.5, 0.4, 16, 2, 1),
        (2.0, 0.1, 8, 1, 1),
        (0.2, 1.0, 6, 1, 2),
        (1.0, 1.0, 2, 1, 1),
    ],
)
def test_best_split_is_the_best_rate_on_the_fewest_accelerators(ar_rate, dit_rate, gpus, ar_gpus, dit_gpus):
    a, d = best_split(ar_rate, dit_rate, gpus, ar_gpus, dit_gpus)
    assert a * ar_gpus + d * dit_gpus <= gpus
    best = brute_force(ar_rate, dit_rate, gpus, ar_gpus, dit_gpus)
    assert min(a * ar_rate, d * dit_rate) == pytest.approx(best)
    for fewer_dit in range(1, d):  # no DiT replica is idle
        assert min(a * ar_rate, fewer_dit * dit_rate) < best - 1e-9


def test_bad_reports_and_budgets_are_clear_errors():
    with pytest.raises(GlmImageError, match="expected a `glm-image bench speed --out` report"):
        plan_from_speed({"benchmark": "quality", "results": [{}]}, gpus=8)
    with pytest.raises(GlmImageError, match="--gpus 1; allowed: an integer >= 2"):
        plan_from_speed(speed_report(("512x512", 1, 1.0, 1.0)), gpus=1)
    with pytest.raises(GlmImageError, match="one AR replica \\(4\\) and one DiT replica \\(1\\) need 5"):
        plan_from_speed(speed_report(("512x512", 1, 1.0, 1.0)), gpus=4, ar_gpus=4)


def test_the_command_prints_the_split_and_writes_the_report(cli, tmp_path):
    source = tmp_path / "speed.json"
    source.write_text(json.dumps(speed_report(("1024x1024", 1, 1.0, 3.0), ("512x512", 1, 1.0, 1.0))))
    result = cli("bench", "plan", str(source), "--gpus", "8", "--out", str(tmp_path / "plan.json"))
    assert result.returncode == 0, result.stderr
    assert "| 1024x1024 | 1 |" in result.stdout and "| 2:6 |" in result.stdout and "| 4:4 |" in result.stdout
    assert "--ar-replicas 2 --dit-replicas 6" in result.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert [(r["ar_replicas"], r["dit_replicas"]) for r in saved["results"]] == [(2, 6), (4, 4)]
    missing = cli("bench", "plan", str(tmp_path / "nope.json"))
    assert missing.returncode != 0 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
