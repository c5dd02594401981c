"""Learned (Lite MoBA) gate weights: load, save, apply.

One safetensors file per model, one tensor per layer:
`layers.{i}.attn_gate.weight: [HK, B, D]` (KV heads, MoBA block size, head dim). The summary of
block `j` for KV head `h` is `sum_t W[h, t, :] * k[j*B + t, h, :]` (SPEC.md "Block summary"), so
`W = 1/B` everywhere is exactly the `mean` gate: the distiller starts there.

Default location: `<model dir>/moba_mlp_weight.safetensors` (the config key `moba_gate_weights`
overrides it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

GATE_FILE = "moba_mlp_weight.safetensors"
KEY = "layers.{}.attn_gate.weight"
_KEY_RE = re.compile(r"^layers\.(\d+)\.attn_gate\.weight$")


class GateWeightError(ValueError):
    """A gate weight file that does not fit the model; the message names the mismatch."""


def default_gate_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / GATE_FILE


def resolve_gate_path(gate_weights: str | None, model_dir: str | os.PathLike | None) -> Path | None:
    """The config's `moba_gate_weights`, else `<model dir>/moba_mlp_weight.safetensors` if present."""
    if gate_weights:
        return Path(gate_weights)
    if model_dir is not None and default_gate_path(model_dir).is_file():
        return default_gate_path(model_dir)
    return None


def mean_gate(num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Weights that reproduce the `mean` gate: W = 1/B. [HK, B, D] per layer."""
    return [torch.full((num_kv_heads, block_size, head_dim), 1.0 / block_size, dtype=dtype)
            for _ in range(num_layers)]


def save_gate_weights(path: str | os.PathLike, weights: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write per-layer weights [HK, B, D] (a list indexed by layer, or {layer: tensor})."""
    from safetensors.torch import save_file

    items = dict(enumerate(weights)) if not isinstance(weights, Mapping) else dict(weights)
    if not items:
        raise GateWeightError("no gate weights to save")
    shape = None
    for i, w in items.items():
        if w.dim() != 3:
            raise GateWeightError(f"layer {i}: gate weight must be [HK, B, D], got {tuple(w.shape)}")
        if shape is not None and tuple(w.shape) != shape:
            raise GateWeightError(f"layer {i}: gate weight shape {tuple(w.shape)} differs from {shape}")
        shape = tuple(w.shape)
    tensors = {KEY.format(i): w.detach().to("cpu").contiguous() for i, w in items.items()}
    meta = {"format": "moba-gate", "num_layers": str(len(items)),
            "num_kv_heads": str(shape[0]), "block_size": str(shape[1]), "head_dim": str(shape[2])}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)   # atomic: a reader never sees half a file
    return path


def load_gate_weights(path: str | os.PathLike, num_layers: int | None = None,
                      num_kv_heads: int | None = None, block_size: int | None = None,
                      head_dim: int | None = None, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Load and validate per-layer weights; returns a list [num_layers] of [HK, B, D] tensors.

    Every expectation given (layer count, HK, B, D) is checked; a mismatch raises GateWeightError
    naming the layer, the key and what was expected. `dtype` casts after validation.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GateWeightError(f"gate weight file {path} not found (run moba-distill to make one, "
                              f"or set moba_gate_weights)")
    layers: dict[int, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY_RE.match(key)
            if m is None:
                raise GateWeightError(f"{path}: unexpected key {key!r}; expected 'layers.<i>.attn_gate.weight'")
            layers[int(m.group(1))] = f.get_tensor(key)
    if not layers:
        raise GateWeightError(f"{path}: holds no 'layers.<i>.attn_gate.weight' tensors")
    n = max(layers) + 1
    missing = sorted(set(range(n)) - set(layers))
    if missing:
        raise GateWeightError(f"{path}: layers {missing} missing (file has {len(layers)} of {n})")
    if num_layers is not None and n != num_layers:
        raise GateWeightError(f"{path}: has {n} layers, the model {num_layers}")
    want = (num_kv_heads, block_size, head_dim)
    names = ("num_kv_heads", "block_size", "head_dim")
    out = []
    for i in range(n):
        w = layers[i]
        if w.dim() != 3:
            raise GateWeightError(f"{path}: {KEY.format(i)} has shape {tuple(w.shape)}, expected [HK, B, D]")
        if not w.dtype.is_floating_point:
            raise GateWeightError(f"{path}: {KEY.format(i)} has dtype {w.dtype}, expected a float dtype")
        for axis, (got, exp, name) in enumerate(zip(w.shape, want, names)):
            if exp is not None and got != exp:
                raise GateWeightError(
                    f"{path}: {KEY.format(i)} has shape {tuple(w.shape)}: dim {axis} ({name}) is {got}, "
                    f"the model/config needs {exp}")
        if i and w.shape != out[0].shape:
            raise GateWeightError(f"{path}: {KEY.format(i)} shape {tuple(w.shape)} differs from layer 0 "
                                  f"{tuple(out[0].shape)}")
        out.append(w.to(device=device, dtype=dtype or w.dtype))
    return out


def apply_gate(weight: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Learned summaries of complete blocks.

    weight: [HK, B, D]; keys: [NB * B, HK, D] (post-RoPE, trailing partial block ignored).
    Returns [NB, HK, D] float32: `sum_t W[h, t, :] * k[j*B + t, h, :]`.
    """
    HK, B, D = weight.shape
    nb = keys.shape[0] // B
    k = keys[: nb * B].float().view(nb, B, HK, D)
    return torch.einsum("jthd,htd->jhd", k, weight.float())
