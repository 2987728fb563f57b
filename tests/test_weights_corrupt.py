"""Every broken-checkpoint case gives its own clear error naming the file. Nothing is unpickled."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from glm_image.errors import CheckpointError, CorruptCheckpointError
from glm_image.synthetic.reference import build_reference
from glm_image.weights import WeightIndex, load_weights, read_safetensors_header

VLE = "vision_language_encoder"


def _index(folder: Path) -> tuple[Path, dict]:
    path = next(folder.glob("*.safetensors.index.json"))
    return path, json.loads(path.read_text())


def _load(root: Path, component: str = VLE):
    return load_weights(build_reference(root, component, meta=True), root / component)


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_truncated_shard(tiny_copy):
    shard = sorted((tiny_copy / VLE).glob("*-of-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError) as err:
        _load(tiny_copy)
    assert str(shard) in str(err.value) and "truncated" in str(err.value)


def test_truncated_inside_the_header(tiny_copy):
    path = tiny_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        CorruptCheckpointError, match=r"header claims .* truncated, or not a safetensors file"
    ):
        _load(tiny_copy, "vae")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too short to be a safetensors file"),
        (b"\x00" * 5, "too short to be a safetensors file"),
        (b"PK\x03\x04" + b"\x00" * 60, "header claims"),  # a zip (torch.save) file renamed
        (struct.pack("<Q", 7) + b"{nope!}", "header is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    ],
)
def test_not_a_safetensors_file(tiny_copy, content, message):
    path = tiny_copy / "text_encoder" / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as err:
        _load(tiny_copy, "text_encoder")
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}, "dtype 'F33'"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "spans 8 bytes but F32 [3] needs 12"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}, "spans 80 bytes"),
        ({"dtype": "F32", "shape": [20], "data_offsets": [0, 80]}, "truncated: tensor 'w' ends at byte 80"),
        ({"dtype": "F32", "shape": [2]}, "header entry for tensor 'w' is malformed"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape or offsets"),
    ],
)
def test_bad_header_entries(tmp_path, entry, message):
    path = _raw_file(tmp_path / "bad.safetensors", {"w": entry}, b"\x00" * 8)
    with pytest.raises(CorruptCheckpointError) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_overlapping_tensors_are_caught_when_opened(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    folder = tmp_path / "c"
    folder.mkdir()
    path = _raw_file(folder / "model.safetensors", header, b"\x00" * 12)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.empty(2))
            self.b = torch.nn.Parameter(torch.empty(2))

    with pytest.raises(CorruptCheckpointError) as err:
        load_weights(Two(), folder)
    assert str(path) in str(err.value)


def test_missing_shard_names_the_shard_and_the_index(tiny_copy):
    folder = tiny_copy / VLE
    index_path, _ = _index(folder)
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        _load(tiny_copy)
    message = str(err.value)
    assert f"shard '{shard.name}'" in message and str(index_path) in message and "is missing" in message


def test_index_pointing_at_a_missing_file(tiny_copy):
    folder = tiny_copy / "transformer"
    index_path, index = _index(folder)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "diffusion_pytorch_model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"shard 'diffusion_pytorch_model-00009-of-00009.safetensors' \(holding 1 tensors",
    ):
        _load(tiny_copy, "transformer")


@pytest.mark.parametrize("target", ["../vae/diffusion_pytorch_model.safetensors", "/etc/passwd", "..", ""])
def test_index_cannot_point_outside_its_folder(tiny_copy, target):
    folder = tiny_copy / "transformer"
    index_path, index = _index(folder)
    index["weight_map"][next(iter(index["weight_map"]))] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="not a file name in this folder"):
        WeightIndex.from_folder(folder)


def test_index_that_lies_about_a_shard(tiny_copy):
    folder = tiny_copy / "transformer"
    index_path, index = _index(folder)
    shards = sorted(set(index["weight_map"].values()), key=list(index["weight_map"].values()).count)
    shard_b, shard_a = shards[0], shards[-1]  # move a tensor out of the fullest shard
    moved = next(n for n, s in index["weight_map"].items() if s == shard_a)
    index["weight_map"][moved] = shard_b
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=f"lists 1 tensor\\(s\\): '{moved}' in '{shard_b}'"):
        WeightIndex.from_folder(folder)

    del index["weight_map"][moved]
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CorruptCheckpointError, match=f"holds 1 tensor\\(s\\): '{moved}' that .* does not list"
    ):
        WeightIndex.from_folder(folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "no 'weight_map' object"),
        ('{"weight_map": {}}', "non-empty"),
    ],
)
def test_broken_index_file(tiny_copy, text, message):
    index_path, _ = _index(tiny_copy / VLE)
    index_path.write_text(text)
    with pytest.raises(CorruptCheckpointError) as err:
        _load(tiny_copy)
    assert str(index_path) in str(err.value) and message in str(err.value)


def test_folder_without_weights_or_with_only_pickles(tmp_path):
    folder = tmp_path / "component"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        WeightIndex.from_folder(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(
        CheckpointError, match=r"only pickle weights found \(pytorch_model.bin\).*safetensors only"
    ):
        WeightIndex.from_folder(folder)
    with pytest.raises(CheckpointError, match="component folder not found"):
        WeightIndex.from_folder(tmp_path / "nope")


def test_several_single_files_without_an_index(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / name))
    with pytest.raises(
        CheckpointError, match=r"several \.safetensors files \(a.safetensors, b.safetensors\)"
    ):
        WeightIndex.from_folder(tmp_path)


def test_nothing_is_ever_unpickled(tiny_checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for component in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        _load(tiny_checkpoint, component)
