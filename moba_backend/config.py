"""The one validated MoBA configuration, parsed once at the edge (CLI flag, env, engine config).

Keys and defaults follow SPEC.md. FastDeploy's later names are accepted as aliases:
`plas_*` keys for `moba_*`, `PLAS_ATTN` for `MOBA_ATTN`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

BACKEND_ENV = "FD_ATTENTION_BACKEND"
BACKEND_NAMES = ("MOBA_ATTN", "PLAS_ATTN")

GateKind = Literal["mean", "max", "minmax", "learned"]
TileSelect = Literal["token", "union", "shared"]
ImplKind = Literal["auto", "cuda", "triton", "torch"]
IMPL_ENV = "MOBA_IMPL"


class MobaConfigError(ValueError):
    """A MoBA configuration that cannot be used; the message names the key and what is allowed."""


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


class MobaConfig(BaseModel):
    """MoBA attention settings (SPEC.md, "Configuration")."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    moba_block_size: int = 128
    moba_encoder_top_k_left: int = 50
    moba_encoder_top_k_right: int = 60
    moba_decoder_top_k_left: int = 100
    moba_decoder_top_k_right: int = 120
    moba_use_encoder_seq_limit: int | None = None
    moba_use_decoder_seq_limit: int | None = None
    moba_max_seq_length: int | None = None
    # NOTE: gate and tile mode defaults weigh the quality harness against the GPU benchmark
    # (README, "Choosing the defaults").
    moba_gate: GateKind = "mean"
    moba_gate_weights: str | None = None
    moba_sink_blocks: int = 1
    moba_local_blocks: int = 1
    moba_query_tile: int = 128
    moba_tile_select: TileSelect = "shared"
    moba_dense_layers: tuple[int, ...] = ()
    # Kernels: `auto` (the fastest available on the device), `cuda`, `triton` or `torch`; the
    # MOBA_IMPL environment variable sets it when the key is absent.
    moba_impl: ImplKind = "auto"

    @field_validator("moba_dense_layers", mode="before")
    @classmethod
    def _layers_as_tuple(cls, v: Any) -> Any:
        if isinstance(v, list):
            return tuple(v)
        return v

    @model_validator(mode="after")
    def _check_ranges(self) -> "MobaConfig":
        b = self.moba_block_size
        if not (_is_pow2(b) and b >= 16):
            raise MobaConfigError(f"moba_block_size={b}: must be a power of two >= 16")
        t = self.moba_query_tile
        if not (_is_pow2(t) and t >= 16):
            raise MobaConfigError(f"moba_query_tile={t}: must be a power of two >= 16")
        if self.moba_sink_blocks < 0:
            raise MobaConfigError(f"moba_sink_blocks={self.moba_sink_blocks}: must be >= 0")
        if self.moba_local_blocks < 0:
            raise MobaConfigError(f"moba_local_blocks={self.moba_local_blocks}: must be >= 0")
        # The forced blocks of one selection must fit the window's right end.
        own_enc = (t + b - 1) // b + 1  # a tile of T tokens at any alignment spans this many blocks
        forced = {"encoder": self.moba_sink_blocks + self.moba_local_blocks + own_enc,
                  "decoder": self.moba_sink_blocks + self.moba_local_blocks + 1}
        for side in ("encoder", "decoder"):
            left = getattr(self, f"moba_{side}_top_k_left")
            right = getattr(self, f"moba_{side}_top_k_right")
            if left < 1:
                raise MobaConfigError(f"moba_{side}_top_k_left={left}: must be >= 1")
            if right < left:
                raise MobaConfigError(
                    f"moba_{side}_top_k_right={right}: must be >= moba_{side}_top_k_left={left}")
            if right < forced[side]:
                raise MobaConfigError(
                    f"moba_{side}_top_k_right={right}: must be >= {forced[side]}, the forced blocks "
                    f"(sink {self.moba_sink_blocks} + local {self.moba_local_blocks} + the tile's own)")
            limit = getattr(self, f"moba_use_{side}_seq_limit")
            if limit is not None and limit < left * b:
                raise MobaConfigError(
                    f"moba_use_{side}_seq_limit={limit}: must be >= moba_{side}_top_k_left x "
                    f"moba_block_size = {left * b}")
        if self.moba_max_seq_length is not None and self.moba_max_seq_length < 1:
            raise MobaConfigError(f"moba_max_seq_length={self.moba_max_seq_length}: must be >= 1")
        for i in self.moba_dense_layers:
            if i < 0:
                raise MobaConfigError(f"moba_dense_layers: layer index {i} must be >= 0")
        return self

    # Derived values: one place that applies the SPEC defaults.
    @property
    def encoder_seq_limit(self) -> int:
        if self.moba_use_encoder_seq_limit is not None:
            return self.moba_use_encoder_seq_limit
        return self.moba_encoder_top_k_left * self.moba_block_size

    @property
    def decoder_seq_limit(self) -> int:
        if self.moba_use_decoder_seq_limit is not None:
            return self.moba_use_decoder_seq_limit
        return self.moba_decoder_top_k_left * self.moba_block_size

    def is_dense_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moba_dense_layers

    def check_seq_len(self, seq_len: int) -> None:
        """Raise if a request is longer than the optional `moba_max_seq_length` cap."""
        cap = self.moba_max_seq_length
        if cap is not None and seq_len > cap:
            raise MobaConfigError(
                f"sequence of {seq_len} tokens exceeds moba_max_seq_length={cap}")


def _canonical_key(key: str) -> str:
    """The `moba_*` name of a key (`plas_*` aliases map to theirs)."""
    return "moba_" + key[len("plas_"):] if key.startswith("plas_") else key


def _normalize_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = MobaConfig.model_fields
    for key, value in raw.items():
        if not isinstance(key, str):
            raise MobaConfigError(f"config key {key!r}: keys must be strings")
        name = _canonical_key(key)
        if name not in fields:
            allowed = ", ".join(sorted(fields))
            raise MobaConfigError(f"unknown MoBA config key {key!r}; allowed keys: {allowed}")
        if name in out:
            raise MobaConfigError(f"config key {name!r} given twice (as {key!r} and its alias)")
        out[name] = value
    return out


def parse_moba_config(raw: str | Mapping[str, Any] | MobaConfig | None) -> MobaConfig:
    """Parse the `--moba-attention-config` JSON string (or a dict) into a validated config.

    Raises MobaConfigError naming the offending key and the allowed values.
    """
    if isinstance(raw, MobaConfig):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return MobaConfig()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MobaConfigError(f"--moba-attention-config is not valid JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise MobaConfigError("--moba-attention-config must be a JSON object")
    try:
        return MobaConfig(**_normalize_keys(raw))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        if err.get("type") == "value_error" and isinstance(err.get("ctx", {}).get("error"),
                                                           MobaConfigError):
            msg = str(err["ctx"]["error"])
        else:
            msg = f"{loc}={err.get('input')!r}: {err['msg']}"
        # name the keys as the user wrote them where an alias was used
        aliased = {_canonical_key(key): key for key in raw if _canonical_key(key) != key}
        given = [f"{name} (given as {key})" for name, key in aliased.items() if re.search(rf"\b{name}\b", msg)]
        if given:
            msg += f"; {', '.join(given)}"
        raise MobaConfigError(msg) from None


def attention_backend_from_env(env: Mapping[str, str] | None = None) -> bool:
    """True when `FD_ATTENTION_BACKEND` selects MoBA (`MOBA_ATTN`, alias `PLAS_ATTN`).

    Unset or empty means another backend is wanted; a misspelled MoBA-looking name is an error
    rather than a silent fallback to dense.
    """
    value = (env if env is not None else os.environ).get(BACKEND_ENV, "").strip()
    if not value:
        return False
    if value.upper() in BACKEND_NAMES:
        return True
    if "MOBA" in value.upper() or "PLAS" in value.upper():
        raise MobaConfigError(
            f"{BACKEND_ENV}={value!r}: use one of {', '.join(BACKEND_NAMES)}")
    return False
