"""The framework-free MoBA attention layer over a paged KV cache.

Per step the engine builds one `MobaPlan` (`build_plan`, shared by every layer); per layer it
calls `MobaAttention.forward`, which writes the new K/V into the cache, writes the summaries of
the blocks this step completes, selects blocks for every query head and attends. One entry point
for mixed batches of prefills, chunked prefills and decodes.

Caches (allocated by the engine, indexed by physical page):
- `k_cache`, `v_cache`: [num_pages, P, HK, D]
- `summary_cache`: [num_pages, SLOTS, S, HK, D] (`MobaAttention.summary_shape`)
"""

from __future__ import annotations

from collections.abc import Callable
import math
import os

import torch
import torch.nn.functional as F

from moba_backend.config import IMPL_ENV, MobaConfig
from moba_backend.ops.cache import naive as cache_naive
from moba_backend.ops.common import check, check_cache, slots_per_page, summary_slots
from moba_backend.ops.pooling import naive as pooling_naive
from moba_backend.ops.prefill import torch_impl as attn_torch
from moba_backend.ops.select.fast import Selection, select
from moba_backend.ops.select.naive import SelectParams
from moba_backend.plan import DecodePlanBuffers, MobaPlan, build_plan
from moba_backend.workspace import step_workspace_bytes

IMPLS = ("auto", "torch", "triton", "cuda")
# What `auto` runs on the CUDA kernels (the rest on Triton): the prefill at head dims 64 and 128
# where its Hopper kernel (wgmma + TMA) takes the call, on SM90 devices with an installed build of
# the extension (`auto` never compiles it). H100, attention alone, `shared`, page 16 unless
# named, Triton / CUDA medians of three alternating rounds (README, "CUDA kernels"): 32 / 8
# heads, head dim 128: 8K 1.39 / 1.27 ms, 32K 8.12 / 7.67, 128K 35.7 / 34.6, 128K page 64
# 35.0 / 31.5, vLLM's page layout at 128K 35.5 / 34.6; head dim 64 (9 / 3 and 16 / 2 heads):
# 1.06-1.09x. Not head dim 256 (its 2 stages of 64 keys: 0.79-0.82x Triton at 32K-128K), nor the
# decode (1.01-1.04x at head dim 128, 0.87x at 64; 10% slower on another H100 earlier), nor
# pooling (161 against 115 us), nor the SM80 `mma.sync` prefill (about 3x slower).
AUTO_HEAD_DIMS = (64, 128)


def auto_cuda_ops(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> frozenset:
    """The ops of this call that `moba_impl: auto` runs on the CUDA kernels."""
    if not q.is_cuda or q.shape[-1] not in AUTO_HEAD_DIMS:
        return frozenset()
    from moba_backend.ops import cuda_ext
    if not cuda_ext.available_without_build() or not cuda_ext.hopper_prefill(q, k_cache, v_cache):
        return frozenset()
    return frozenset({"prefill"})


# A step of fresh prompts that runs dense (`MobaPlan.fresh_dense`) goes to torch's SDPA (cuDNN /
# FlashAttention on a GPU) over its own new keys and values, one call per request, when it has
# at most this many requests; more stay on the kernels, which take the whole step at once.
# H100, Llama-3-8B attention, one layer (benchmarks/bench_dense_route.py), SDPA against the
# kernels (every block selected, no gate): 1 x 1024 tokens 0.09 / 0.35 ms, 1 x 4096 0.31 / 0.51,
# 2 x 4096 0.60 / 0.87, 4 x 1024 0.58 / 0.37, 8 x 1024 0.45 / 0.37.
DENSE_ROUTE_MAX_REQS = 2


def resolve_impl(impl: str, cfg: MobaConfig) -> str:
    """The implementation asked for: the argument, else `moba_impl`, else $MOBA_IMPL, else auto."""
    if impl == "auto":
        impl = cfg.moba_impl
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"
        check(impl in IMPLS, f"{IMPL_ENV}={impl!r}: expected one of {IMPLS}")
    return impl

__all__ = ["DecodePlanBuffers", "MobaAttention", "MobaPlan", "build_plan", "write_kv"]


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's K/V [T, HK, D] into the paged caches; slots < 0 are padding. On a GPU
    one Triton launch with no host synchronisation (CUDA-graph safe); elsewhere torch ops."""
    if k_cache.is_cuda:
        from moba_backend.ops.cache.triton_impl import write_kv_fwd
        write_kv_fwd(key, value, k_cache, v_cache, slot_mapping)
    else:
        cache_naive.write_kv(key, value, k_cache, v_cache, slot_mapping)


class MobaAttention:
    """MoBA attention for one layer.

    Args:
        cfg: the validated MoBA config.
        num_heads, num_kv_heads, head_dim: H, HK, D.
        scale: softmax scale (default 1/sqrt(D)).
        layer_idx: used for `moba_dense_layers`.
        softcap: attention logit soft cap (0: none). window: sliding window in tokens (-1: none).
        gate_weight: [HK, B, D] learned gate weights of this layer (gate `learned`).
        impl: `torch` (reference ops, any device), `triton` (Triton kernels), `cuda` (the csrc/
            kernels; an error if they cannot be loaded), `auto` (`moba_impl`, else $MOBA_IMPL, else
            the fastest available on the device: CUDA kernels, then Triton on a GPU; torch on CPU).
    """

    def __init__(self, cfg: MobaConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None, layer_idx: int = 0, softcap: float = 0.0,
                 window: int = -1, gate_weight: torch.Tensor | None = None, impl: str = "auto"):
        check(num_heads % num_kv_heads == 0,
              f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        check(impl in IMPLS, f"impl={impl!r}: expected one of {IMPLS}")
        impl = resolve_impl(impl, cfg)
        if impl == "cuda":
            from moba_backend.ops import cuda_ext
            cuda_ext.ops()  # raises, naming why, when the extension cannot be loaded
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.layer_idx = layer_idx
        self.softcap, self.window = softcap, window
        self.impl = impl
        if cfg.moba_gate == "learned":
            check(gate_weight is not None, f"layer {layer_idx}: moba_gate 'learned' needs gate weights")
            want = (num_kv_heads, cfg.moba_block_size, head_dim)
            check(tuple(gate_weight.shape) == want,
                  f"layer {layer_idx}: gate weight shape {tuple(gate_weight.shape)}, expected {want}")
        self.gate_weight = gate_weight
        self.params = SelectParams(
            block_size=cfg.moba_block_size, query_tile=cfg.moba_query_tile,
            mode=cfg.moba_tile_select, gate=cfg.moba_gate,
            sink_blocks=cfg.moba_sink_blocks, local_blocks=cfg.moba_local_blocks,
            enc_right=cfg.moba_encoder_top_k_right, dec_right=cfg.moba_decoder_top_k_right,
            enc_limit=cfg.encoder_seq_limit, dec_limit=cfg.decoder_seq_limit,
            scale=self.scale, dense=cfg.is_dense_layer(layer_idx))

    def summary_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        """Shape of this layer's summary cache for a KV cache of `num_pages` pages."""
        return (num_pages, slots_per_page(self.cfg.moba_block_size, page_size),
                summary_slots(self.cfg.moba_gate), self.num_kv_heads, self.head_dim)

    def workspace_bytes(self, num_tokens: int, max_seq_len: int, max_reqs: int, page_size: int,
                        dtype: torch.dtype) -> int:
        """Upper bound of the device bytes one `forward` step of this layer allocates and frees
        (the step's plan included; not `out`): any step of at most `num_tokens` query tokens over
        contexts of at most `max_seq_len` tokens, at most `max_reqs` requests, on the GPU
        kernels (`moba_backend.workspace`). An engine's memory profile must count it."""
        return step_workspace_bytes(self.cfg, num_tokens, max_seq_len, max_reqs, self.num_heads,
                                    self.num_kv_heads, self.head_dim, dtype, page_size,
                                    dense=self.params.dense, impl=self.impl)

    def _use_triton(self, device: torch.device) -> bool:
        """GPU kernels (Triton, with CUDA kernels where `_cuda_ops` says) rather than torch ops."""
        if self.impl == "auto":
            return device.type == "cuda"
        return self.impl in ("triton", "cuda")

    def _cuda_ops(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> frozenset:
        """The ops of this call that run on the CUDA kernels."""
        if self.impl not in ("auto", "cuda") or not q.is_cuda:
            return frozenset()
        ops = {"pool"}
        if self.cfg.moba_tile_select != "token":
            ops |= {"prefill", "decode"}
        if self.impl == "auto":
            return frozenset(ops) & auto_cuda_ops(q, k_cache, k_cache if v_cache is None else v_cache)
        from moba_backend.ops import cuda_ext
        if not cuda_ext.supports_attention(q, k_cache):
            ops -= {"prefill", "decode"}
        return frozenset(ops)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                k_cache: torch.Tensor, v_cache: torch.Tensor, summary_cache: torch.Tensor,
                plan: MobaPlan, out: torch.Tensor | None = None,
                selection_out: list | None = None, kv_in_cache: bool = False,
                dense_attend: Callable[[torch.Tensor, torch.Tensor], bool] | None = None) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, HK, D] new keys/values (None: already in the cache).

        Returns out [T, H, D]. `selection_out`, when a list, receives this layer's Selection.
        `kv_in_cache`: k and v are already written (an engine wrote them); they are read only by
        the dense route of fresh prompts (`DENSE_ROUTE_MAX_REQS`).
        `dense_attend(q, out)`: an engine's own dense attention over the same paged cache, run
        (after the blocks this step completes are pooled) instead of the kernels when this layer
        runs the whole step dense; it returns whether it wrote `out`.
        """
        T = plan.num_tokens
        check(q.dim() == 3 and q.shape[1:] == (self.num_heads, self.head_dim),
              f"q must be [T, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        check(q.shape[0] >= T, f"q has {q.shape[0]} rows, the plan {T} tokens")
        check_cache(k_cache, v_cache)
        check(k_cache.shape[2:] == (self.num_kv_heads, self.head_dim),
              f"k_cache must be [N, P, {self.num_kv_heads}, {self.head_dim}], got {tuple(k_cache.shape)}")
        want = self.summary_shape(k_cache.shape[0], k_cache.shape[1])
        check(tuple(summary_cache.shape) == want,
              f"summary_cache must be {want}, got {tuple(summary_cache.shape)}")
        check(plan.static or not (q.is_cuda and torch.cuda.is_current_stream_capturing()),
              "a CUDA graph can only capture steps planned by DecodePlanBuffers (static shapes); "
              "this plan came from build_plan")
        q = q[:T]
        if k is not None and not kv_in_cache:
            write_kv(k, v, k_cache, v_cache, plan.slot_mapping)
        if out is None:
            out = torch.empty_like(q)
        if T == 0:
            return out
        use_triton = self._use_triton(q.device)
        cuda_ops = self._cuda_ops(q, k_cache, v_cache) if use_triton else frozenset()
        cfg = self.cfg
        if use_triton:
            if "pool" in cuda_ops:
                from moba_backend.ops.pooling.cuda_impl import update_block_summaries_fwd
            else:
                from moba_backend.ops.pooling.triton_impl import update_block_summaries_fwd
            update_block_summaries_fwd(k_cache, summary_cache, plan, cfg.moba_gate, self.gate_weight)
        elif plan.pool_req.numel():     # (no block completes in most decode steps)
            ctx = plan.seq_lens - torch.bincount(plan.token_req.long(), minlength=plan.num_reqs).to(plan.seq_lens)
            pooling_naive.update_block_summaries(
                k_cache, summary_cache, plan.block_table, ctx, plan.seq_lens,
                cfg.moba_block_size, cfg.moba_gate, self.gate_weight)
        if dense_attend is not None and (self.params.dense or plan.all_dense) and dense_attend(q, out):
            return out
        if use_triton:
            if selection_out is None and self._dense_route(q, k, v, plan, out):
                return out
            sel = select(q, summary_cache, plan, self.params, backend="triton")
        else:
            sel = select(q, summary_cache, plan, self.params)
        if selection_out is not None:
            selection_out.append(sel)
        if use_triton:
            self._attend_triton(q, k_cache, v_cache, plan, sel, out, cuda_ops)
        else:
            attn_torch.sparse_attention_plan(q, k_cache, v_cache, plan, sel, out, cfg.moba_block_size,
                                             self.scale, self.softcap, self.window)
        return out

    def _dense_route(self, q, k, v, plan: MobaPlan, out) -> bool:
        """A step of fresh prompts whose every group (or this layer) runs dense is plain causal
        attention over the step's own keys and values: run it on torch's SDPA, request by
        request, when there are few requests (`DENSE_ROUTE_MAX_REQS`). Returns whether it
        ran. Not with a soft cap or a sliding window (SDPA has neither)."""
        # a dense layer runs every group dense, whatever the windows say
        spans = plan.fresh_prompts if self.params.dense else plan.fresh_dense
        if (spans is None or k is None or self.softcap > 0 or self.window > 0
                or len(spans) > DENSE_ROUTE_MAX_REQS):
            return False
        G = self.num_heads // self.num_kv_heads
        for q0, n in spans:
            rows = slice(q0, q0 + n)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None],
                is_causal=True, scale=self.scale, enable_gqa=G > 1)
            out[rows] = o[0].transpose(0, 1)
        return True

    def _attend_triton(self, q, k_cache, v_cache, plan: MobaPlan, sel: Selection, out,
                       cuda_ops: frozenset = frozenset()) -> None:
        """Attention on the GPU kernels: Triton, or CUDA for the ops named in `cuda_ops`."""
        common = dict(block_size=self.cfg.moba_block_size, scale=self.scale, softcap=self.softcap,
                      window=self.window)
        cuda_ok = sel.member_blocks is None
        if plan.prefill.num:
            if "prefill" in cuda_ops and cuda_ok:
                from moba_backend.ops.prefill.cuda_impl import sparse_prefill_fwd as prefill_cuda
                prefill_cuda(q, k_cache, v_cache, plan.block_table, plan.prefill, sel, out,
                             tokens_per_tile=plan.tokens_per_tile, **common)
            elif sel.member_blocks is not None:
                from moba_backend.ops.prefill.triton_impl import token_prefill_fwd
                token_prefill_fwd(q, k_cache, v_cache, plan.block_table, plan.token_pos, plan.prefill, sel, out,
                                  num_visible_blocks=plan.num_visible_blocks, **common)
            else:
                from moba_backend.ops.prefill.triton_impl import sparse_prefill_fwd
                sparse_prefill_fwd(q, k_cache, v_cache, plan.block_table, plan.prefill, sel, out,
                                   tokens_per_tile=plan.tokens_per_tile, block_m=plan.block_m, **common)
        if plan.decode.num:
            if "decode" in cuda_ops and cuda_ok:
                from moba_backend.ops.decode.cuda_impl import sparse_decode_fwd as decode_cuda
                decode_cuda(q, k_cache, v_cache, plan.block_table, plan.decode, sel, out, **common)
            else:
                from moba_backend.ops.decode.triton_impl import sparse_decode_fwd
                sparse_decode_fwd(q, k_cache, v_cache, plan.block_table, plan.decode, sel, out, **common)
