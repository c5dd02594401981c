"""Learned gate weights: file round trip, every validation error, and the summary they define."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moba_backend.gate import (GateWeightError, apply_gate, default_gate_path, load_gate_weights,
                               mean_gate, resolve_gate_path, save_gate_weights)
from moba_backend.ops.pooling.naive import pool_block
from tests.helpers import assert_close

L, HK, B, D = 3, 2, 16, 8


def _weights():
    return [torch.randn(HK, B, D) for _ in range(L)]


def test_round_trip(tmp_path):
    w = _weights()
    path = save_gate_weights(tmp_path / "g.safetensors", w, metadata={"note": "x"})
    got = load_gate_weights(path, L, HK, B, D)
    assert len(got) == L
    for a, b in zip(w, got):
        assert torch.equal(a, b)
    assert load_gate_weights(path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_default_location(tmp_path):
    assert resolve_gate_path(None, tmp_path) is None
    save_gate_weights(default_gate_path(tmp_path), _weights())
    assert resolve_gate_path(None, tmp_path) == tmp_path / "moba_mlp_weight.safetensors"
    assert resolve_gate_path("other.safetensors", tmp_path).name == "other.safetensors"


@pytest.mark.parametrize("kw, match", [
    (dict(num_layers=4), "has 3 layers, the model 4"),
    (dict(num_kv_heads=3), r"dim 0 \(num_kv_heads\) is 2, the model/config needs 3"),
    (dict(block_size=32), r"dim 1 \(block_size\) is 16, the model/config needs 32"),
    (dict(head_dim=16), r"dim 2 \(head_dim\) is 8, the model/config needs 16"),
], ids=["layers", "kv_heads", "block_size", "head_dim"])
def test_shape_mismatch(tmp_path, kw, match):
    path = save_gate_weights(tmp_path / "g.safetensors", _weights())
    with pytest.raises(GateWeightError, match=match):
        load_gate_weights(path, **kw)


@pytest.mark.parametrize("tensors, match", [
    ({"layers.0.attn_gate.weight": torch.zeros(HK, B, D, dtype=torch.int32)}, "expected a float dtype"),
    ({"layers.0.attn_gate.weight": torch.zeros(B, D)}, r"expected \[HK, B, D\]"),
    ({"layers.0.attn_gate.weight": torch.zeros(HK, B, D),
      "layers.2.attn_gate.weight": torch.zeros(HK, B, D)}, r"layers \[1\] missing"),
    ({"layers.0.gate": torch.zeros(HK, B, D)}, "unexpected key"),
    ({"layers.0.attn_gate.weight": torch.zeros(HK, B, D),
      "layers.1.attn_gate.weight": torch.zeros(HK, B, 2 * D)}, "differs from layer 0"),
], ids=["dtype", "rank", "missing_layer", "bad_key", "ragged"])
def test_bad_file(tmp_path, tensors, match):
    path = tmp_path / "g.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(GateWeightError, match=match):
        load_gate_weights(path)


def test_missing_file(tmp_path):
    with pytest.raises(GateWeightError, match="not found"):
        load_gate_weights(tmp_path / "none.safetensors")


def test_apply_matches_pooling_and_mean():
    keys = torch.randn(3 * B + 5, HK, D)          # three complete blocks and a partial one
    w = torch.randn(HK, B, D)
    got = apply_gate(w, keys)
    ref = torch.stack([pool_block(keys[j * B:(j + 1) * B], "learned", w)[0] for j in range(3)])
    assert_close(got, ref, 1e-5, "apply_gate vs pool_block")
    mean = apply_gate(mean_gate(1, HK, B, D)[0], keys)
    assert_close(mean, keys[: 3 * B].view(3, B, HK, D).mean(1), 1e-5, "W = 1/B is the mean gate")
