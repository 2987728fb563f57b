"""``gpu_run.sh``'s stages for issue 24's fast paths, dry-run on the CPU (the script and the
benchmarks' code, not their numbers): ``gemv`` (the decode GEMM against dense bf16, with the
share of the card's bandwidth), ``w8a8`` (the DiT's linears under W8A8 against bf16), ``window``
(Jacobi window attention against decode attention) and ``graphs`` (a kept graph bucket: the
second call at a shape captures nothing). A GPU minute is never lost to a typo in them."""

from __future__ import annotations

import json


def test_the_fast_path_stages_dry_run(tmp_path, gpu_run):
    done = gpu_run(
        tmp_path,
        "gemv,w8a8,window,graphs",
        GPU_RUN_MODEL="tiny",
        GPU_RUN_SIZE="64x64",
        GPU_RUN_DTYPE="float32",
    )
    assert done.returncode == 0 and "rc=0" in done.stdout, done.stdout[-3000:]
    assert "rc=1" not in done.stdout and "stopped at its cap" not in done.stdout, done.stdout[-3000:]
    report = {
        name: json.loads((tmp_path / f"bench_{name}.json").read_text())
        for name in ("gemv", "w8a8", "window", "graph_reuse")
    }
    assert [r["benchmark"] for r in report.values()] == [
        "quant_gemv_gpu",
        "w8a8_dit",
        "window",
        "ar_graph_reuse",
    ]

    gemv = report["gemv"]["results"]
    kernel = [r for r in gemv if r["path"] == "triton" and r["linear"] != "layer"]
    assert {r["format"] for r in kernel} == {"int8", "int4"}
    assert all(r["us"] > 0 and r["max_rel_error"] < 2e-2 for r in kernel)  # the kernel against its twin

    w8a8 = report["w8a8"]["results"]
    assert any(r["case"] == "bf16 F.linear" and r["vs_bf16"] == 1.0 for r in w8a8)
    assert all(r["ms"] > 0 for r in w8a8 if "ms" in r)

    window = report["window"]["results"]
    assert {r["what"] for r in window if r["part"] == "kernel"} >= {"decode_attention"}
    assert all(r["ratio"] > 0 for r in window)

    calls = report["graph_reuse"]["results"]
    assert {r["decoding"] for r in calls} == {"sequential", "jacobi"}
    assert all(r["graph_captures"] == 0 for r in calls)  # a CPU has no graph API: eager
