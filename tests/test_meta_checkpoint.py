"""Meta-training checkpoints: every byte of the file is covered by its integrity check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from learned_opt.meta.checkpoint import CheckpointError, decode, encode, load_checkpoint, save_checkpoint


def _payload() -> dict:
    """A small checkpoint-like payload: RNG states, a step, counters, tensors in a tree."""
    rng = np.random.default_rng([3, 1])
    rng.integers(0, 10, size=5)
    return {
        "config": {"unroll": 5, "meta_lr": 1e-3, "horizon": [10, 100], "suite": "tasks/x.toml"},
        "step": 12,
        "torch_rng": torch.Generator().manual_seed(7).get_state(),
        "theta": {"w": torch.randn(3, 2), "b": torch.zeros(2, dtype=torch.float64)},
        "slots": [{"index": 0, "rng": rng.bit_generator.state, "run": None, "pair": (1, 2.5)}],
        "counters": {"skipped": 1, "inner_steps": 240, "elapsed_s": 3.25, "best_val": -0.5, "best_step": 10},
    }


def _header_span(data: bytes) -> range:
    return range(8, 8 + int.from_bytes(data[:8], "little"))


def test_round_trip_keeps_every_value() -> None:
    payload = _payload()
    back = decode(encode(payload))
    assert back["step"] == 12 and back["counters"] == payload["counters"]
    assert back["slots"][0]["rng"] == payload["slots"][0]["rng"] and back["slots"][0]["pair"] == (1, 2.5)
    assert torch.equal(back["torch_rng"], payload["torch_rng"]) and torch.equal(back["theta"]["w"], payload["theta"]["w"])


def test_every_bit_flip_in_the_json_header_is_refused() -> None:
    data = encode(_payload())
    rng = random.Random(0)
    for pos in _header_span(data):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CheckpointError, match=r"^ckpt\.safetensors: "):
            decode(bytes(flipped), "ckpt.safetensors")


def test_edited_metadata_with_valid_structure_is_refused(tmp_path: Path) -> None:
    """An edit that keeps the file well-formed (RNG state, step) fails the checksum, naming the file."""
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", _payload())
    data = path.read_bytes()
    header = json.loads(data[_header_span(data).start:_header_span(data).stop])
    meta = header["__metadata__"]
    tree = json.loads(meta["tree"])
    tree["step"] = 13
    tree["slots"][0]["rng"]["state"]["state"] += 1
    path.write_bytes(st_save(st_load(data), metadata={**meta, "tree": json.dumps(tree)}))
    with pytest.raises(CheckpointError, match=f"{path}: checkpoint checksum mismatch"):
        load_checkpoint(path)
    extra = {**meta, "note": "added"}
    path.write_bytes(st_save(st_load(data), metadata=extra))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
