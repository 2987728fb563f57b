"""Block offload (``engine.offload``) and every residency the planner can choose, run end to end.

On a CPU the offloaded path runs synchronously (device = cpu): each block's weights are copied
from their host tensors before it runs and dropped after, so these tests exercise the code that
streams on a GPU and compare its images with the resident ones bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from glm_image.engine.offload import BlockStream
from glm_image.errors import GlmImageError
from glm_image.residency import RESIDENCIES, STREAMED, plan_memory


class _Net(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, skip_after: int | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if skip_after is not None and i > skip_after:  # as the step cache skips blocks 1..
                break
            x = torch.tanh(block(x))
        return self.head(x)


def test_a_streamed_block_runs_on_its_copy_and_rests_in_host_memory():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 8)
    expected = net(x)
    hosts = [block.weight.data_ptr() for block in net.blocks]
    seen = []
    for block in net.blocks:  # registered before the stream's hooks: sees the weight in use
        block.register_forward_hook(lambda m, a, o: seen.append(m.weight.data_ptr()))
    stream = BlockStream([[b] for b in net.blocks], "cpu", ahead=1)
    got = net(x)
    assert torch.equal(got, expected)
    # each block ran on a copy (not its host tensor), and is its host tensor again after
    assert all(p != h for p, h in zip(seen, hosts, strict=True))
    assert [b.weight.data_ptr() for b in net.blocks] == hosts
    # 4 blocks, and block 0 prefetched (wrapping around) for the next forward
    assert stream.copies == 5 and set(stream._loaded) == {0}
    net(x, skip_after=0)  # blocks 1.. skipped: block 1 was prefetched, then dropped by the window
    assert set(stream._loaded) <= {0, 1} and len(stream._loaded) <= stream.ahead + 1
    stream.close()
    assert torch.equal(net(x), expected)


def test_parked_blocks_stay_in_host_memory_while_the_rest_moves():
    net = _Net()
    stream = BlockStream([[b] for b in net.blocks], "cpu")
    with stream.parked():
        assert all(b.weight.numel() == 0 for b in net.blocks)
        net.to(torch.float64)  # what a stage's .to(device) does to every tensor it holds
    assert net.head.weight.dtype == torch.float64
    assert all(b.weight.dtype == torch.float32 and b.weight.numel() == 64 for b in net.blocks)


def test_quantized_blocks_stream_quantized(tiny_checkpoint):
    """The DiT loaded int8: its streamed units hold the int8 data (1 byte per weight) and the
    denoised latents equal the resident int8 DiT's bit for bit."""
    from glm_image.engine import DitEngine
    from glm_image.engine.offload import dit_units

    dit = DitEngine.from_pretrained(tiny_checkpoint, quantize="int8")
    prior = torch.randint(0, 16384, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        resident = dit.denoise(prior, "a red car", 64, 64, num_inference_steps=2, seeds=0)
        stream = BlockStream(dit_units(dit.model), "cpu")
        streamed = dit.denoise(prior, "a red car", 64, 64, num_inference_steps=2, seeds=0)
    assert torch.equal(resident, streamed) and stream.copies > 0
    dtypes = {h.dtype for u in stream.units for h in u.host}
    assert torch.int8 in dtypes
    weights = {h.numel() for u in stream.units for h in u.host if h.dtype == torch.int8}
    assert weights and all(n >= 64 for n in weights)
    stream.close()


def test_the_planner_names_only_what_the_pipeline_applies():
    from glm_image.pipeline import GlmImage

    assert set(STREAMED) == set(RESIDENCIES)
    assert {s for stages in STREAMED.values() for s in stages} <= {"ar", "dit"}
    assert hasattr(GlmImage, "_stream_blocks")


@pytest.fixture(scope="module")
def resident_image(tiny_checkpoint):
    from glm_image import GlmImage

    pipe = GlmImage.from_pretrained(tiny_checkpoint, residency="resident")
    return np.asarray(pipe.generate("a red car", 64, 64, num_inference_steps=2, seed=3).images[0])


@pytest.mark.parametrize("residency", [r for r in RESIDENCIES if r != "resident"])
def test_every_residency_gives_the_resident_image(tiny_checkpoint, resident_image, residency):
    """Each residency the planner can choose, forced through ``residency=``, runs end to end on
    the CPU (stages swapped to host and back, blocks streamed) and gives the resident image."""
    from glm_image import GlmImage

    pipe = GlmImage.from_pretrained(tiny_checkpoint, residency=residency)
    assert pipe.residency == residency and set(pipe.streams) == set(STREAMED[residency])
    image = np.asarray(pipe.generate("a red car", 64, 64, num_inference_steps=2, seed=3).images[0])
    assert np.array_equal(image, resident_image)
    assert all(stream.copies > 0 for stream in pipe.streams.values())
    pipe.close()


def test_an_unknown_residency_names_the_allowed_ones(tiny_checkpoint):
    from glm_image import GlmImage

    allowed = "allowed: resident, swap, dit_offload, offload"
    with pytest.raises(GlmImageError, match=rf"residency = 'layers'; {allowed}"):
        GlmImage.from_pretrained(tiny_checkpoint, residency="layers")
    with pytest.raises(GlmImageError, match=rf"residency = 'layers'; {allowed}"):
        plan_memory(tiny_checkpoint, "meta", torch.float32, residency="layers")


def test_the_residency_flag_on_every_command(cli, tmp_path):
    serve = ["serve", "--output-dir", str(tmp_path / "files")]
    for command in (["generate", "--model", "tiny", "x"], ["info", "--model", "tiny"], serve):
        out = cli(*command, "--residency", "layers")
        assert out.returncode != 0
        assert "--residency 'layers'; allowed: resident, swap, dit_offload, offload" in out.stderr
        assert "Traceback" not in out.stderr
    out = cli("bench", "speed", "--help")
    assert "--residency" in out.stdout


def test_the_gpu_run_offload_stage_dry_run(tmp_path, gpu_run):
    """``gpu_run.sh OUT offload`` on the CPU (tiny, 64x64, one step, block offload only: the
    script, not the numbers): the plans of the released preset are written, and the residency's
    measured peak and estimate."""
    import json

    done = gpu_run(
        tmp_path,
        "offload",
        timeout=1200,
        GPU_RUN_MODEL="tiny",
        GPU_RUN_SIZE="64x64",
        GPU_RUN_OFFLOAD_STEPS="1",
        GPU_RUN_OFFLOAD_RESIDENCIES="dit_offload",
    )
    assert done.returncode == 0, done.stdout[-3000:]
    plan = json.loads((tmp_path / "plan_12GB.json").read_text())["plan"]
    assert plan["budget_bytes"] == 12 * 10**9 and set(plan["estimate"]["peak_bytes"]) == set(RESIDENCIES)
    rows = json.loads((tmp_path / "bench_offload.json").read_text())["results"]
    assert [r["residency"] for r in rows] == ["dit_offload"]
    for row in rows:
        assert "error" not in row and row["measured_peak_bytes"] > 0
        assert row["estimate_over_measured"] == row["estimated_peak_bytes"] / row["measured_peak_bytes"]
    assert rows[0]["copies"]["dit"] > 0 and rows[0]["dit_seconds"] > 0
