"""MoBA as a vLLM attention backend: Backend / MetadataBuilder / Impl in one file.

- `MobaMetadataBuilder.build` turns vLLM's `CommonAttentionMetadata` (mixed decodes, chunked
  prefills and prefills) into one `MobaPlan` per step, shared by every layer. On a GPU a step of
  one query token per request (decodes, one-token prompt chunks) is planned into persistent
  buffers (`DecodePlanBuffers`) with shapes fixed by the batch size, so vLLM captures and replays
  it in a full CUDA graph (`UNIFORM_SINGLE_TOKEN_DECODE`: vLLM replays those graphs for every
  such batch); other steps run eagerly between the model's piecewise graphs.
- `MobaAttentionImpl.do_kv_cache_update` scatters the step's K/V into the paged cache;
  `forward` runs `MobaAttention.forward` (block summaries, selection, sparse attention). In
  vLLM's profiling forward (no metadata) on a GPU it allocates and frees, once per process, the
  bound of a real step's workspace (`moba_backend/workspace.py`), so the memory profile that
  sizes the KV cache counts it.
- On a GPU, a step MoBA runs dense (a layer in `moba_dense_layers`, or every request of the
  step below the seq limits), when vLLM runs it eagerly (not a decode graph), goes to vLLM's own
  FlashAttention (`vllm.vllm_flash_attn`, the version vLLM picks for the GPU) over MoBA's paged
  K/V views, after the blocks it completes are pooled; checked once per process against plain
  attention on a small paged batch laid out like the real cache, and left off (one warning) if
  it cannot run or disagrees.
- On CPU, a step MoBA runs dense (a layer in `moba_dense_layers`, or every request of the step
  below the seq limits) goes to vLLM's own CPU attention (`CPU_ATTN`'s builder and impl), which
  is several times faster than the torch path; mixed steps with sparse rows stay on MoBA's path.
  NOTE: vLLM's CPU kernel reads its own page layout (per KV head: K transposed `[D, P]`, then V
  `[P, D]`), MoBA's ops read keys head-dim-contiguous `[P, HK, D]`; so the dense requests' pages
  are staged into vLLM's layout, layer by layer, in a buffer planned once per step.

KV cache page (one vLLM block of P tokens, per layer), logical `[B, HK, P, 2 * D]` as vLLM views
it, K in `[..., :D]` and V in `[..., D:]`; MoBA reads it as `k_cache, v_cache: [B, P, HK, D]`.
The block summaries `[SLOTS, S, HK, D]` float32 of a page live in the same allocation, right
after its K/V bytes: the spec's `page_size_padded` grows each page by the summary size, so
vLLM counts the summary memory in its KV budget and a freed page takes its summary with it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.platforms import current_platform
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

from moba_backend.attention import MobaAttention, resolve_impl, write_kv
from moba_backend.config import MobaConfig, MobaConfigError, parse_moba_config
from moba_backend.ops.common import slots_per_page, summary_slots
from moba_backend.ops.pooling import naive as pooling_naive
from moba_backend.ops.prefill import naive as attn_naive
from moba_backend.ops.select.fast import selection_mask
from moba_backend.plan import DecodePlanBuffers, MobaPlan, build_plan
from moba_backend.workspace import decode_plan_buffers_bytes, step_workspace_bytes

# Keys of `vllm_config.additional_config` that carry the MoBA config (dict or JSON string).
CONFIG_KEYS = ("moba_attention_config", "plas_attention_config")
# Environment variable read when no engine config is at hand (e.g. spec sizing outside a config
# context); moba-serve sets it too.
CONFIG_ENV = "MOBA_ATTENTION_CONFIG"
# When set, every layer's forward appends one JSON line of selection counts to this file.
STATS_ENV = "MOBA_STATS_FILE"
# Set to 0 to keep dense steps on MoBA's torch path on CPU instead of vLLM's CPU attention.
CPU_DENSE_ENV = "MOBA_CPU_DENSE_ATTN"
# Set to 0 to keep dense steps on MoBA's kernels on GPUs instead of vLLM's FlashAttention.
FLASH_ENV = "MOBA_VLLM_FLASH_ATTN"
# Largest staging buffer for vLLM's CPU attention; a dense step needing more stays on MoBA's path.
# A decode-only step stages its whole context for one token per request, which pays only for
# small copies: one layer at 3072 tokens, 1 thread (tests/integrations/bench_cpu_dense.py), one
# decode 1.89 ms routed (4.5 MiB staged) against 2.26 ms on MoBA's path, four 8.04 against 7.10.
STAGING_CAP_BYTES = 256 << 20
DECODE_STAGING_CAP_BYTES = 8 << 20

SUMMARY_DTYPE = torch.float32
_PAGE_ALIGN = 64  # bytes: keeps each page's summary float32-aligned and on its own cache line

log = logging.getLogger(__name__)

_active_cfg: MobaConfig | None = None
# Set once this process has shown vLLM's memory profile MoBA's step workspace (see
# `MobaAttentionImpl._reserve_workspace`).
_workspace_reserved = False


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
class CpuDenseStep:
    """A step that MoBA runs dense, prepared for vLLM's CPU attention.

    `staging` `[S, HK, P, 2 * D]` holds copies of the step's pages `src_pages` `[S]` in vLLM's
    CPU page layout (filled layer by layer); `metadata` is `CPU_ATTN`'s own metadata for the step
    with its block table pointing into `staging`.
    """

    metadata: Any
    src_pages: torch.Tensor
    staging: torch.Tensor
    isa: str


@dataclass
class MobaMetadata:
    plan: MobaPlan
    num_actual_tokens: int
    num_decodes: int
    num_prefills: int
    max_query_len: int
    all_dense: bool = False                  # every query of the step selects every block
    cpu_dense: CpuDenseStep | None = None    # set on CPU when some layer runs dense this step
    flash: FlashStep | None = None           # set on GPUs when some layer may run dense on vLLM's FA


class MobaMetadataBuilder(AttentionMetadataBuilder[MobaMetadata]):
    """Plans a step once for all MoBA layers of a KV cache group."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: Any) -> AttentionCGSupport:
        """Full CUDA graphs for steps of one query token per request on a GPU (their plans are
        static, `DecodePlanBuffers`); nothing on CPU, where vLLM captures no graphs, nor with the
        torch ops."""
        kind = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
        on_gpu = kind == "cuda" or (kind is None and current_platform.is_cuda_alike())
        # the torch ops (MOBA_IMPL=torch) read shapes back from the device: not capturable
        if on_gpu and resolve_impl("auto", moba_config_from_vllm(vllm_config)) != "torch":
            return cls._cudagraph_support
        return AttentionCGSupport.NEVER

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
        self._cpu_builder = None
        self._staging: torch.Tensor | None = None
        self._decode_buffers: DecodePlanBuffers | None = None
        # vLLM's host copy of seq_lens is exact without speculative decoding (CommonAttentionMetadata)
        self._exact_host_seq_lens = getattr(vllm_config, "speculative_config", None) is None
        graphs = self.get_cudagraph_support(vllm_config, kv_cache_spec) != AttentionCGSupport.NEVER
        if torch.device(device).type == "cuda" and graphs:
            self._decode_buffers = DecodePlanBuffers(
                self.cfg, vllm_config.scheduler_config.max_num_seqs, model_config.max_model_len,
                self.page_size, self.num_heads, self.num_kv_heads, device,
                head_dim=kv_cache_spec.head_size)
        if cpu_dense_enabled(device):
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

            self._cpu_builder = CPUAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)

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
        n_dec = int(is_decode.sum())
        n_tok = int((q_lens == 1).sum())
        if self._static_step(cm, q_lens, n_tok):
            # pads (graph batches) have no query token and sequence length 0; one-token prompt
            # chunks keep the encoder window
            plan = self._decode_buffers.plan(cm.seq_lens[:R], cm.block_table_tensor[:R],
                                             cm.slot_mapping[:R], prefill=(q_lens == 1) & ~is_decode)
            return MobaMetadata(plan=plan, num_actual_tokens=R, num_decodes=n_dec,
                                num_prefills=n_tok - n_dec, max_query_len=1)
        plan = build_plan(self.cfg, qsl, self._host_seq_lens(cm), cm.block_table_tensor[:R],
                          cm.slot_mapping[:T], is_decode, self.page_size, self.num_heads,
                          self.num_kv_heads, device=self.device, head_dim=self.kv_cache_spec.head_size)
        all_dense = T > 0 and plan.all_dense
        cpu_dense = None
        if self._cpu_builder is not None and T > 0 and (all_dense or self.cfg.moba_dense_layers):
            cap = DECODE_STAGING_CAP_BYTES if n_dec == R else STAGING_CAP_BYTES
            cpu_dense = self._stage_for_cpu_attention(common_prefix_len, cm, T, cap)
        flash = None
        if (cpu_dense is None and T > 0 and (all_dense or self.cfg.moba_dense_layers)
                and _flash.available(self.device)):
            flash = FlashStep(cu_seqlens_q=cm.query_start_loc[: R + 1], seqused_k=cm.seq_lens[:R],
                              block_table=cm.block_table_tensor[:R], max_query_len=int(cm.max_query_len),
                              max_seq_len=int(cm.max_seq_len))
        return MobaMetadata(plan=plan, num_actual_tokens=T, num_decodes=n_dec,
                            num_prefills=R - n_dec, max_query_len=cm.max_query_len,
                            all_dense=all_dense, cpu_dense=cpu_dense, flash=flash)

    def _host_seq_lens(self, cm: CommonAttentionMetadata) -> torch.Tensor:
        """The step's sequence lengths on the host: vLLM's CPU copy, exact unless speculative
        decoding makes it an upper bound; else read back from the device (a sync)."""
        R = cm.num_reqs
        host = cm.seq_lens_cpu_upper_bound
        if host is not None and self._exact_host_seq_lens:
            return host[:R]
        return cm.seq_lens[:R].cpu()

    def _static_step(self, cm: CommonAttentionMetadata, q_lens: torch.Tensor, n_tok: int) -> bool:
        """A step `DecodePlanBuffers` plans: on a GPU, one query token per request (decodes and
        one-token prompt chunks alike: vLLM replays its decode graphs for every batch of
        one-token requests, whatever they are), padding requests (no query token) only after
        them, one row of q per request."""
        R = cm.num_reqs
        if self._decode_buffers is None or R == 0 or R > self._decode_buffers.max_reqs:
            return False
        if cm.num_actual_tokens != R or n_tok == 0 or not bool((q_lens[:n_tok] == 1).all()):
            return False
        return bool((q_lens[n_tok:] == 0).all())

    def _stage_for_cpu_attention(self, common_prefix_len: int, cm: CommonAttentionMetadata,
                                 T: int, cap: int) -> CpuDenseStep | None:
        """vLLM's CPU attention metadata for this step, over a staging copy of its pages (None
        when the copy would pass `cap` bytes)."""
        R, P = cm.num_reqs, self.page_size
        n_pages = (cm.seq_lens[:R].cpu().long() + P - 1) // P                # [R]
        S = int(n_pages.sum())
        spec = self.kv_cache_spec
        shape = (S, spec.num_kv_heads, P, 2 * spec.head_size)
        if math.prod(shape) * spec.dtype.itemsize > cap:
            return None
        table = cm.block_table_tensor[:R].cpu()
        src = torch.cat([table[r, :n].long() for r, n in enumerate(n_pages.tolist())])
        first = torch.cumsum(n_pages, 0) - n_pages
        staged = first[:, None] + torch.arange(int(n_pages.max()))[None, :]   # [R, max pages]
        staged = torch.minimum(staged, torch.tensor(max(S - 1, 0))).to(torch.int32)
        if self._staging is None or self._staging.numel() < math.prod(shape):
            self._staging = torch.empty(math.prod(shape), dtype=spec.dtype, device=self.device)
        md = self._cpu_builder.build(common_prefix_len, cm)
        md = replace(md, num_actual_tokens=T, block_table=staged.to(self.device))
        return CpuDenseStep(metadata=md, src_pages=src.to(self.device),
                            staging=self._staging[: math.prod(shape)].view(shape),
                            isa=self._cpu_builder.isa)


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
        # (max_model_len, max_num_seqs, page size): what a real step can reach, for the workspace
        # shown to vLLM's memory profile
        self._engine_limits = engine_limits(vllm_config)
        # the builder's persistent decode-graph plan buffers, made after the profile
        self._graph_plans = (vllm_config is not None and MobaMetadataBuilder.get_cudagraph_support(
            vllm_config, None) != AttentionCGSupport.NEVER)
        # vLLM's CPU attention for dense steps (its constructor reads the current engine config)
        self._cpu_impl = None
        if vllm_config is not None and cpu_dense_enabled(vllm_config=vllm_config):
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

            self._cpu_impl = CPUAttentionBackendImpl(
                num_heads, head_size, scale, num_kv_heads, None, None, kv_cache_dtype,
                logits_soft_cap, attn_type, kv_sharing_target_layer_name)

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
        if attn_metadata is None:  # vLLM's profiling run (a dummy forward), or a warm-up
            if query.is_cuda:
                self._reserve_workspace(layer, query)
            return output
        moba = self._layer(layer, query.device)
        plan = attn_metadata.plan
        T = plan.num_tokens
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        summaries = summary_view(kv_cache, moba.summary_shape(kv_cache.shape[0], kv_cache.shape[2]))
        staged = attn_metadata.cpu_dense
        if (staged is not None and self._cpu_impl is not None
                and (moba.params.dense or attn_metadata.all_dense)):
            if not moba.params.dense:  # later sparse steps read the blocks this step completes
                update_summaries(moba, k_cache, summaries, plan)
            stage_pages(k_cache, v_cache, staged)
            self._cpu_impl.forward(layer, query, key, value, staged.staging, staged.metadata, output)
            if _stats.enabled:
                _stats.record(moba, plan, None, route="vllm_cpu")
            return output
        sel = [] if _stats.enabled else None
        dense_attend, ran = None, []
        step = attn_metadata.flash
        if step is not None and _flash.usable(query, kv_cache, self.num_kv_heads, self.head_size,
                                              self.scale, self.logits_soft_cap):
            def dense_attend(q: torch.Tensor, out: torch.Tensor) -> bool:
                _flash.attend(q, k_cache, v_cache, out, step, self.scale, self.logits_soft_cap)
                ran.append(True)
                return True
        # the step's keys and values are in the cache already; a step of fresh dense prompts
        # reads them from here (`MobaAttention._dense_route`)
        new_k, new_v = (key[:T], value[:T]) if key is not None and value is not None else (None, None)
        moba.forward(query[:T], new_k, new_v, k_cache, v_cache, summaries, plan, out=output[:T],
                     selection_out=sel, kv_in_cache=True, dense_attend=dense_attend)
        if ran and _stats.enabled:
            _stats.record(moba, plan, None, route="vllm_flash")
        elif sel:
            _stats.record(moba, plan, sel[0])
        return output

    def _reserve_workspace(self, layer: AttentionLayer, query: torch.Tensor) -> None:
        """Allocate and free the device workspace a real step of `query.shape[0]` tokens may
        take (`MobaAttention.workspace_bytes`, contexts up to max_model_len, max_num_seqs
        requests), once per process: vLLM sizes the KV cache from the peak of torch's allocated
        bytes during its profiling forward, which reaches attention with no metadata, so MoBA's
        score chunks, lists and partials would otherwise be missing from it. The largest
        reservation is the peak that counts, so the first layer's call is enough; a dense layer
        and a sparse one both count when `moba_dense_layers` mixes them."""
        global _workspace_reserved
        # NOTE: never under graph capture (the buffer would land in the graph's pool)
        if _workspace_reserved or self._engine_limits is None or torch.cuda.is_current_stream_capturing():
            return
        _workspace_reserved = True
        moba = self._layer(layer, query.device)
        max_len, max_reqs, page_size = self._engine_limits
        kinds = (False, True) if self.cfg.moba_dense_layers else (moba.params.dense,)
        nbytes = max(step_workspace_bytes(
            self.cfg, query.shape[0], max_len, max_reqs, self.num_heads, self.num_kv_heads,
            self.head_size, query.dtype, page_size, dense=dense, impl=moba.impl) for dense in kinds)
        plans = decode_plan_buffers_bytes(max_reqs, max_len, page_size) if self._graph_plans else 0
        nbytes += plans
        log.info("MoBA: %.1f MiB of step workspace and decode-graph plan buffers (%.1f MiB) counted in "
                 "the memory profile (%d tokens, max_model_len %d, max_num_seqs %d)", nbytes / 2**20,
                 plans / 2**20, query.shape[0], max_len, max_reqs)
        try:
            workspace = torch.empty(nbytes, dtype=torch.uint8, device=query.device)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"MoBA: a step of {query.shape[0]} tokens over contexts of up to {max_len} tokens may "
                f"need {nbytes / 2**30:.2f} GiB of workspace, which this GPU does not have after the "
                f"model: lower --max-num-batched-tokens or --max-model-len") from e
        del workspace


def engine_limits(vllm_config: Any) -> tuple[int, int, int] | None:
    """(max_model_len, max_num_seqs, KV page size) of an engine config; None without one. The
    page size is the cache block size (16 when not set yet)."""
    model = getattr(vllm_config, "model_config", None)
    sched = getattr(vllm_config, "scheduler_config", None)
    max_len = getattr(model, "max_model_len", None)
    max_reqs = getattr(sched, "max_num_seqs", None)
    if not max_len or not max_reqs:
        return None
    page = getattr(getattr(vllm_config, "cache_config", None), "block_size", None) or 16
    return int(max_len), int(max_reqs), int(page)


def cpu_dense_enabled(device: torch.device | None = None, vllm_config: Any = None) -> bool:
    """Whether dense steps go to vLLM's CPU attention: the engine runs on CPU (`device`, else the
    config's device type, else the platform) and the route is not switched off."""
    if os.environ.get(CPU_DENSE_ENV, "1") == "0":
        return False
    if device is None:
        kind = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
        device = torch.device(kind) if isinstance(kind, str) and kind else None
    return (device is None or device.type == "cpu") and current_platform.is_cpu()


def update_summaries(moba: MobaAttention, k_cache: torch.Tensor, summaries: torch.Tensor,
                     plan: MobaPlan) -> None:
    """Pool the blocks this step completes (what `MobaAttention.forward` does first, torch path)."""
    if plan.pool_req.numel() == 0:
        return
    ctx = plan.seq_lens - torch.bincount(plan.token_req.long(), minlength=plan.num_reqs).to(plan.seq_lens)
    pooling_naive.update_block_summaries(k_cache, summaries, plan.block_table, ctx, plan.seq_lens,
                                         moba.cfg.moba_block_size, moba.cfg.moba_gate, moba.gate_weight)


def stage_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, step: CpuDenseStep) -> None:
    """Copy the step's pages (MoBA's `[N, P, HK, D]` views) into `step.staging`, vLLM's CPU page
    layout `[S, HK, P, 2 * D]`: directly where that layout is K^T then V per head (checked once
    against vLLM's writer), else through vLLM's writer (e.g. AMX packs keys its own way)."""
    S, HK, P, _ = step.staging.shape
    D = k_cache.shape[-1]
    k = k_cache.index_select(0, step.src_pages)                            # [S, P, HK, D]
    v = v_cache.index_select(0, step.src_pages)
    if _vllm_cpu_layout_is_plain(step.isa, step.staging.dtype, P, D):
        halves = step.staging.view(S, HK, 2, P * D)
        halves[:, :, 0].view(S, HK, D, P).copy_(k.permute(0, 2, 3, 1))
        halves[:, :, 1].view(S, HK, P, D).copy_(v.permute(0, 2, 1, 3))
        return
    from vllm import _custom_ops as ops

    kc, vc = step.staging.view(S, HK, 2 * P, D).chunk(2, dim=2)
    slots = torch.arange(S * P, device=k.device)
    ops.cpu_attn_reshape_and_cache(k.view(S * P, HK, D), v.view(S * P, HK, D), kc, vc, slots, step.isa)


@functools.lru_cache(maxsize=16)
def _vllm_cpu_layout_is_plain(isa: str, dtype: torch.dtype, page_size: int, head_size: int) -> bool:
    """Does vLLM's CPU writer lay a page's head out as K^T `[D, P]` followed by V `[P, D]`?"""
    from vllm import _custom_ops as ops

    k = torch.randn(page_size, 1, head_size).to(dtype)
    v = torch.randn(page_size, 1, head_size).to(dtype)
    page = torch.zeros(1, 1, page_size, 2 * head_size, dtype=dtype)
    kc, vc = page.view(1, 1, 2 * page_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(page_size), isa)
    return torch.equal(page.flatten(), torch.cat([k[:, 0].T.flatten(), v[:, 0].flatten()]))


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


@dataclass
class FlashStep:
    """A step's arguments for vLLM's FlashAttention (device tensors of vLLM's own metadata)."""

    cu_seqlens_q: torch.Tensor     # [R + 1] int32
    seqused_k: torch.Tensor        # [R] int32
    block_table: torch.Tensor      # [R, max pages] int32
    max_query_len: int
    max_seq_len: int


class VllmFlash:
    """vLLM's FlashAttention (`flash_attn_varlen_func`) over MoBA's paged K/V views, for the
    steps and layers MoBA runs dense on a GPU. vLLM's kernel reads pages `[N, P, HK, D]` with any
    strides but the last, so it reads MoBA's views (K and V interleaved per row, the summaries
    in the page padding) in place.

    Resolved once per process (vLLM on CUDA, the FlashAttention version vLLM picks); each new
    (dtype, shape, layout, soft cap) is first checked on the device against plain attention on a
    small paged batch laid out like the real cache (a chunk over a cached prefix, a fresh prompt,
    a decode). If the kernel is missing, raises, or disagrees, the route stays off for that key
    and MoBA's kernels run the dense steps; the reason is logged once.
    """

    CHECK_TOL = 2e-2            # relative error of the check (16-bit inputs)

    def __init__(self, fn: Any = None, version: int | None = None) -> None:
        self._fn, self._version = fn, version
        self._given = self._resolved = fn is not None     # a kernel handed in (tests) runs anywhere
        self._ok: dict[tuple, bool] = {}

    def _resolve(self) -> None:
        if self._resolved:
            return
        self._resolved = True
        if os.environ.get(FLASH_ENV, "1") == "0" or not current_platform.is_cuda():
            return
        try:
            from vllm.v1.attention.backends import fa_utils

            fn, version = fa_utils.flash_attn_varlen_func, fa_utils.get_flash_attn_version()
        except Exception as e:  # noqa: BLE001 - any failure means: no route
            log.warning("MoBA: vLLM's FlashAttention is not available (%s); dense steps run on "
                        "MoBA's kernels", e)
            return
        if fn is None or version is None:
            return
        self._fn, self._version = fn, version

    def available(self, device: torch.device | str) -> bool:
        """Whether dense steps on `device` may go to vLLM's FlashAttention (before the check)."""
        self._resolve()
        return self._fn is not None and (torch.device(device).type == "cuda" or self._given)

    def usable(self, query: torch.Tensor, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int,
               scale: float, softcap: float) -> bool:
        """The route for this layer's inputs: available, 16-bit, and checked on this layout."""
        if not self.available(query.device) or query.dtype not in (torch.float16, torch.bfloat16):
            return False
        key = (query.dtype, query.shape[1], num_kv_heads, head_size, tuple(kv_cache.shape[1:]),
               tuple(kv_cache.stride()), softcap > 0, str(query.device))
        if key not in self._ok:
            self._ok[key] = self._check(query, kv_cache, num_kv_heads, head_size, scale, softcap)
        return self._ok[key]

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
               step: FlashStep, scale: float, softcap: float) -> None:
        """Causal attention of the step's queries q [T, H, D] into out [T, H, D]."""
        self._fn(q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=step.cu_seqlens_q,
                 max_seqlen_q=step.max_query_len, seqused_k=step.seqused_k,
                 max_seqlen_k=step.max_seq_len, softmax_scale=scale, causal=True,
                 block_table=step.block_table, softcap=softcap, fa_version=self._version)

    def _check(self, query: torch.Tensor, kv_cache: torch.Tensor, HK: int, D: int, scale: float,
               softcap: float) -> bool:
        dev, dtype, H = query.device, query.dtype, query.shape[1]
        P = kv_cache.shape[2]
        g = torch.Generator(device="cpu").manual_seed(0)
        reqs = [(37, 21), (0, 45), (70, 1)]                      # (cached tokens, new tokens)
        pages = [-(-(c + n) // P) for c, n in reqs]
        N = sum(pages) + 1                                       # page 0 unused
        buf = torch.randn(N * kv_cache.stride(0), generator=g).to(dtype).to(dev)
        kv = buf.as_strided((N, *kv_cache.shape[1:]), kv_cache.stride())
        k_cache, v_cache = split_kv_cache(kv, D)
        perm = (torch.randperm(N - 1, generator=g) + 1).tolist()
        table = torch.zeros(len(reqs), max(pages), dtype=torch.int32)
        for r, n in enumerate(pages):
            table[r, :n] = torch.tensor(perm[:n])
            perm = perm[n:]
        T = sum(n for _, n in reqs)
        q = torch.randn(T, H, D, generator=g).to(dtype).to(dev)
        lens = [c + n for c, n in reqs]
        step = FlashStep(
            cu_seqlens_q=torch.tensor([0] + [n for _, n in reqs]).cumsum(0).to(dev, torch.int32),
            seqused_k=torch.tensor(lens, dtype=torch.int32, device=dev), block_table=table.to(dev),
            max_query_len=max(n for _, n in reqs), max_seq_len=max(lens))
        # the reference: MoBA's own (float32) with every block of a page's size selected
        token_req = torch.cat([torch.full((n,), r) for r, (_, n) in enumerate(reqs)])
        token_pos = torch.cat([torch.arange(c, c + n) for c, n in reqs])
        every = torch.ones(T, H, table.shape[1], dtype=torch.bool)
        why = None
        try:
            out = torch.zeros_like(q)
            self.attend(q, k_cache, v_cache, out, step, scale, softcap)
            ref = attn_naive.sparse_attention(q.float(), k_cache, v_cache, table, token_req, token_pos, every,
                                              P, scale, softcap)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not err <= self.CHECK_TOL:
                why = f"it differs from plain attention (relative error {err:.2e})"
        except Exception as e:  # noqa: BLE001 - any failure means: no route
            why = f"{type(e).__name__}: {e}"
        if why is not None:
            log.warning("MoBA: vLLM's FlashAttention (version %s) is not used for dense steps "
                        "(%s, %d heads of %d KV heads, head size %d, pages of %d): %s",
                        self._version, dtype, H, HK, D, P, why)
            return False
        log.info("MoBA: dense steps run on vLLM's FlashAttention (version %s)", self._version)
        return True


_flash = VllmFlash()


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

    def record(self, moba: MobaAttention, plan: MobaPlan, sel, route: str = "moba") -> None:
        """`sel`: the layer's Selection, or None when every block was attended (dense). Nothing
        is recorded while a CUDA graph is being captured (the counts read the device)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        own = (plan.token_pos.long() // plan.block_size)                        # [T]
        visible = (own + 1) * moba.num_heads                                    # [T]
        if sel is None:
            picked = visible
        else:
            mask = selection_mask(sel, plan, moba.num_heads)                    # [T, H, NBV]
            causal = torch.arange(mask.shape[-1], device=mask.device)[None, :] <= own[:, None]
            picked = (mask & causal[:, None, :]).sum(dim=(1, 2))                # [T]
        dec = plan.token_decode
        row = {
            "layer": moba.layer_idx, "pid": os.getpid(), "route": route, "tokens": plan.num_tokens,
            "max_pos": int(plan.token_pos.max()) if plan.num_tokens else -1,
            "prefill_selected": int(picked[~dec].sum()), "prefill_visible": int(visible[~dec].sum()),
            "decode_selected": int(picked[dec].sum()), "decode_visible": int(visible[dec].sum()),
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


_stats = _SelectionStats()
