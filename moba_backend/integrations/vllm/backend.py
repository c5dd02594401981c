"""MoBA as a vLLM attention backend: Backend / MetadataBuilder / Impl in one file.

- `MobaMetadataBuilder.build` turns vLLM's `CommonAttentionMetadata` (mixed decodes, chunked
  prefills and prefills) into one `MobaPlan` per step, shared by every layer.
- `MobaAttentionImpl.do_kv_cache_update` scatters the step's K/V into the paged cache;
  `forward` runs `MobaAttention.forward` (block summaries, selection, sparse attention).

KV cache page (one vLLM block of P tokens, per layer), logical `[B, HK, P, 2 * D]` as vLLM views
it, K in `[..., :D]` and V in `[..., D:]`; MoBA reads it as `k_cache, v_cache: [B, P, HK, D]`.
The block summaries `[SLOTS, S, HK, D]` float32 of a page live in the same allocation, right
after its K/V bytes: the spec's `page_size_padded` grows each page by the summary size, so
vLLM counts the summary memory in its KV budget and a freed page takes its summary with it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheLayout

from moba_backend.attention import MobaAttention, write_kv
from moba_backend.config import MobaConfig, MobaConfigError, parse_moba_config
from moba_backend.ops.common import slots_per_page, summary_slots
from moba_backend.ops.select.fast import selection_mask
from moba_backend.plan import MobaPlan, build_plan

# Keys of `vllm_config.additional_config` that carry the MoBA config (dict or JSON string).
CONFIG_KEYS = ("moba_attention_config", "plas_attention_config")
# Environment variable read when no engine config is at hand (e.g. spec sizing outside a config
# context); moba-serve sets it too.
CONFIG_ENV = "MOBA_ATTENTION_CONFIG"
# When set, every layer's forward appends one JSON line of selection counts to this file.
STATS_ENV = "MOBA_STATS_FILE"

SUMMARY_DTYPE = torch.float32
_PAGE_ALIGN = 64  # bytes: keeps each page's summary float32-aligned and on its own cache line

_active_cfg: MobaConfig | None = None


def moba_config_from_vllm(vllm_config: VllmConfig | None) -> MobaConfig:
    """The MoBA config of an engine: `additional_config["moba_attention_config"]`, else the
    `MOBA_ATTENTION_CONFIG` environment variable, else the defaults. Remembered for the process
    (vLLM sizes KV pages in places without a config context)."""
    global _active_cfg
    raw: Any = None
    extra = getattr(vllm_config, "additional_config", None) if vllm_config is not None else None
    if isinstance(extra, dict):
        found = [k for k in CONFIG_KEYS if k in extra]
        if len(found) > 1:
            raise MobaConfigError(f"additional_config has both {found[0]!r} and {found[1]!r}; give one")
        if found:
            raw = extra[found[0]]
    if raw is None:
        if vllm_config is None and _active_cfg is not None:
            return _active_cfg
        raw = os.environ.get(CONFIG_ENV)
    cfg = parse_moba_config(raw)
    _active_cfg = cfg
    return cfg


def _current_config() -> MobaConfig:
    return moba_config_from_vllm(get_current_vllm_config_or_none())


def summary_bytes_per_page(cfg: MobaConfig, page_size: int, num_kv_heads: int, head_size: int) -> int:
    return (slots_per_page(cfg.moba_block_size, page_size) * summary_slots(cfg.moba_gate)
            * num_kv_heads * head_size * SUMMARY_DTYPE.itemsize)


def layer_index(layer_name: str) -> int:
    """`model.layers.7.self_attn.attn` -> 7 (the first number after `layers.`, else the first
    number in the name, else 0)."""
    m = re.search(r"layers?\.(\d+)", layer_name) or re.search(r"\.(\d+)\.", layer_name)
    return int(m.group(1)) if m else 0


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's `[B, HK, P, 2 * D]` page view -> (k_cache, v_cache) `[B, P, HK, D]` strided views."""
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_size], kv[..., head_size:]


def summary_view(kv_cache: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The summary cache `shape = [B, SLOTS, S, HK, D]` float32 living in each page's padding.

    A page is one contiguous run `[HK, P, 2 * D]` of `kv_cache.stride(0)` elements (block-compact
    layouts only, see `supported_kv_cache_layouts`); its summary starts right after the K/V bytes.
    """
    num_pages, hk, p, c = kv_cache.shape
    elt = kv_cache.element_size()
    kv_bytes = hk * p * c * elt
    page_bytes = kv_cache.stride(0) * elt
    need = math.prod(shape[1:]) * SUMMARY_DTYPE.itemsize
    start = kv_cache.storage_offset() * elt + kv_bytes
    if page_bytes < kv_bytes + need or page_bytes % SUMMARY_DTYPE.itemsize or start % SUMMARY_DTYPE.itemsize:
        raise RuntimeError(
            f"MoBA: the KV page has {page_bytes - kv_bytes} spare bytes (page stride {page_bytes}), "
            f"the block summaries need {need}: the KV cache spec was sized for another MoBA config "
            f"(moba_block_size / moba_gate must be the same in every process)")
    f = SUMMARY_DTYPE.itemsize
    inner = shape[1:]
    strides = [page_bytes // f] + [math.prod(inner[i + 1:]) for i in range(len(inner))]
    return torch.empty(0, dtype=SUMMARY_DTYPE, device=kv_cache.device).set_(
        kv_cache.untyped_storage(), start // f, shape, strides)


class MobaAttentionBackend(AttentionBackend):
    """MoBA sparse attention over the paged KV cache (registered as `CUSTOM` on accelerators)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # The kernels read K/V in the activation dtype; summaries are float32 in the page padding.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 128, 192, 256]  # what the Triton kernels compile for

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # NOTE: block-compact layouts only: each page must be one contiguous run so its padding
        # (the summary) sits right after its K/V. Token-major first: [P, HK, D] is MoBA's order.
        return (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, KVCacheLayout.BLNHC, KVCacheLayout.BLHNC)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # connectors move K/V pages without the summaries in their padding

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Grow each page by the MoBA block summaries it stores (memory counted by vLLM)."""
        if type(spec) is not FullAttentionSpec or spec.state_content_bytes is not None:
            return spec
        cfg = _current_config()
        extra = summary_bytes_per_page(cfg, spec.block_size, spec.num_kv_heads, spec.head_size)
        want = -(-(spec.unpadded_page_size_bytes + extra) // _PAGE_ALIGN) * _PAGE_ALIGN
        return replace(spec, page_size_padded=max(want, spec.page_size_padded or 0))

    @staticmethod
    def get_impl_cls() -> type["MobaAttentionImpl"]:
        return MobaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["MobaMetadataBuilder"]:
        return MobaMetadataBuilder


class MobaCPUAttentionBackend(MobaAttentionBackend):
    """The same backend installed over `CPU_ATTN` (the CPU platform always resolves that name)."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"


@dataclass
class MobaMetadata:
    plan: MobaPlan
    num_actual_tokens: int
    num_decodes: int
    num_prefills: int
    max_query_len: int


class MobaMetadataBuilder(AttentionMetadataBuilder[MobaMetadata]):
    """Plans a step once for all MoBA layers of a KV cache group."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = 1

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cfg = moba_config_from_vllm(vllm_config)
        self._init_reorder_batch_threshold(1)
        self.page_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        model_config = vllm_config.model_config
        self.num_heads = (get_num_attention_heads_from_layers(vllm_config, layer_names)
                          or model_config.get_num_attention_heads(vllm_config.parallel_config))
        cap = self.cfg.moba_max_seq_length
        if cap is not None and model_config.max_model_len > cap:
            raise MobaConfigError(
                f"moba_max_seq_length={cap} is below the engine's max_model_len="
                f"{model_config.max_model_len}: start the engine with --max-model-len {cap}")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MobaMetadata:
        cm = common_attn_metadata
        R = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: R + 1]
        q_lens = qsl[1:] - qsl[:-1]
        # A decode is one new token of a request whose prompt is done; a one-token last chunk of a
        # prompt stays a prefill tile (encoder window), as SPEC.md's token-mode invariance asks.
        is_decode = q_lens == 1
        if cm.is_prefilling is not None:
            is_decode &= ~cm.is_prefilling[:R].cpu()
        T = int(qsl[-1] - qsl[0])
        plan = build_plan(self.cfg, qsl, cm.seq_lens[:R], cm.block_table_tensor[:R],
                          cm.slot_mapping[:T], is_decode, self.page_size, self.num_heads,
                          self.num_kv_heads, device=self.device)
        n_dec = int(is_decode.sum())
        return MobaMetadata(plan=plan, num_actual_tokens=T, num_decodes=n_dec,
                            num_prefills=R - n_dec, max_query_len=cm.max_query_len)


class MobaAttentionImpl(AttentionImpl[MobaMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        num_kv_heads = num_kv_heads or num_heads
        # NOTE: the CPU platform never runs vLLM's backend validation, so check here too.
        reasons = []
        if head_size not in MobaAttentionBackend.get_supported_head_sizes():
            reasons.append(f"head_size {head_size} not in {MobaAttentionBackend.get_supported_head_sizes()}")
        if attn_type != AttentionType.DECODER:
            reasons.append(f"attention type {attn_type} (decoder only)")
        if alibi_slopes is not None:
            reasons.append("ALiBi")
        if sliding_window is not None:
            reasons.append("sliding window layers")
        if sinks is not None:
            reasons.append("attention sinks")
        if kv_cache_dtype not in MobaAttentionBackend.supported_kv_cache_dtypes:
            reasons.append(f"kv_cache_dtype {kv_cache_dtype!r} (only 'auto')")
        if kwargs:
            reasons.append(f"options {sorted(kwargs)}")
        if reasons:
            raise NotImplementedError("MoBA attention does not support: " + "; ".join(reasons))
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        vllm_config = get_current_vllm_config_or_none()
        self.cfg = moba_config_from_vllm(vllm_config)
        model_config = getattr(vllm_config, "model_config", None)
        self._model_dir = getattr(model_config, "model", None)
        if self.cfg.moba_gate == "learned":  # fail at engine start, not at the first request
            _gate_weights(self.cfg.moba_gate_weights, self._model_dir, num_kv_heads,
                          self.cfg.moba_block_size, head_size)
        self._moba: MobaAttention | None = None

    def _layer(self, layer: AttentionLayer, device: torch.device) -> MobaAttention:
        if self._moba is None:
            idx = layer_index(getattr(layer, "layer_name", ""))
            weight = None
            if self.cfg.moba_gate == "learned":
                weight = _gate_weights(self.cfg.moba_gate_weights, self._model_dir, self.num_kv_heads,
                                       self.cfg.moba_block_size, self.head_size)[idx].to(device)
            self._moba = MobaAttention(self.cfg, self.num_heads, self.num_kv_heads, self.head_size,
                                       scale=self.scale, layer_idx=idx, softcap=self.logits_soft_cap,
                                       gate_weight=weight)
        return self._moba

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        write_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: MobaMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query: [T, H, D]; key, value: [T, HK, D] (already in the cache); output: [T, H, D]."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("MoBA attention does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output
        moba = self._layer(layer, query.device)
        plan = attn_metadata.plan
        T = plan.num_tokens
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        summaries = summary_view(kv_cache, moba.summary_shape(kv_cache.shape[0], kv_cache.shape[2]))
        sel = [] if _stats.enabled else None
        moba.forward(query[:T], None, None, k_cache, v_cache, summaries, plan, out=output[:T],
                     selection_out=sel)
        if sel:
            _stats.record(moba, plan, sel[0])
        return output


@functools.lru_cache(maxsize=4)
def _gate_weights(gate_weights: str | None, model_dir: str | None, num_kv_heads: int, block_size: int,
                  head_dim: int) -> list[torch.Tensor]:
    """Learned gate weights [HK, B, D] per layer, loaded once per process (every layer's impl
    asks)."""
    from moba_backend.gate import load_gate_weights, resolve_gate_path

    local_dir = model_dir if model_dir and os.path.isdir(model_dir) else None
    path = resolve_gate_path(gate_weights, local_dir)
    if path is None:
        raise MobaConfigError(
            "moba_gate 'learned' needs gate weights: set moba_gate_weights to a safetensors file "
            f"(none at {model_dir}/moba_mlp_weight.safetensors)")
    return load_gate_weights(path, num_kv_heads=num_kv_heads, block_size=block_size,
                             head_dim=head_dim, dtype=torch.float32)


class _SelectionStats:
    """Selected vs causally visible MoBA blocks per layer call, appended as JSON lines to
    `$MOBA_STATS_FILE` (tests and benchmarks read them; off unless the variable is set)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    @property
    def path(self) -> str | None:
        return os.environ.get(STATS_ENV) or None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, moba: MobaAttention, plan: MobaPlan, sel) -> None:
        mask = selection_mask(sel, plan, moba.num_heads)                        # [T, H, NBV]
        own = (plan.token_pos.long() // plan.block_size)                        # [T]
        causal = torch.arange(mask.shape[-1], device=mask.device)[None, :] <= own[:, None]
        picked = (mask & causal[:, None, :]).sum(dim=(1, 2))                    # [T]
        visible = (own + 1) * moba.num_heads                                    # [T]
        dec = plan.token_decode
        row = {
            "layer": moba.layer_idx, "pid": os.getpid(), "tokens": plan.num_tokens,
            "max_pos": int(plan.token_pos.max()) if plan.num_tokens else -1,
            "prefill_selected": int(picked[~dec].sum()), "prefill_visible": int(visible[~dec].sum()),
            "decode_selected": int(picked[dec].sum()), "decode_visible": int(visible[dec].sum()),
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


_stats = _SelectionStats()
