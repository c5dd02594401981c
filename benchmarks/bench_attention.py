"""MoBA attention speed against dense attention and FlexAttention, one layer at a time.

Rows (Llama-3-8B attention shapes by default: H=32, HK=8, D=128, bf16; MoBA block 128, SPEC
default windows, query tile 128):
- prefill of L tokens (one request, empty cache before the step): the full
  `MobaAttention.forward` (pooling + selection + attention; K/V already in the paged cache, so
  k = v = None), with pooling, selection ("gate share") and attention also timed alone; dense
  causal SDPA on contiguous [1, H, L, D] in the same process (cuDNN, else flash, else efficient);
  compiled FlexAttention holding the same selection: `shared` as a 128 x 128 BlockMask (full
  blocks + causal diagonal), `token` as a mask_mod over a per (head, token) block bitmap (only
  where the bitmap fits --flex-bitmap-gb). Each Flex output is compared with MoBA's.
- decode of one token per request at context L, batch b: MoBA forward against SDPA of a one-token
  query over the whole KV ([b, H, 1, D] x [b, HK, L, D], GQA).

Reported: ms (median), speedup over dense, the ideal speedup of the actual selection (dense
causal pairs / selected causal pairs for prefill; dense KV bytes / KV bytes read for decode),
TFLOP/s (4 * D * selected pairs) or GB/s (K+V bytes of the selected blocks).

Slow calls (seconds, at 512K) are timed by a few CUDA-event samples instead of do_bench.
A correctness spot check (Triton vs the torch reference in float32) runs before any timing.

GPU:  python -m benchmarks.bench_attention --out results.md
CPU smoke run (Triton interpreter, tiny shapes, same code paths):
      TRITON_INTERPRET=1 python -m benchmarks.bench_attention --device cpu --tiny
"""

from __future__ import annotations

import os
import sys


def _interpret_on_cpu() -> None:
    """NOTE: Triton reads TRITON_INTERPRET when it is imported, so a CPU run must set it first."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        dev = a.split("=", 1)[1] if a.startswith("--device=") else (
            argv[i + 1] if a == "--device" and i + 1 < len(argv) else None)
        if dev is not None and dev.startswith("cpu"):
            os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_on_cpu()

import argparse  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

try:
    import moba_backend  # noqa: F401
except ModuleNotFoundError:  # run as a file from a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moba_backend.attention import MobaAttention  # noqa: E402
from moba_backend.config import MobaConfig  # noqa: E402
from moba_backend.ops.common import SENTINEL, check  # noqa: E402
from moba_backend.ops.decode.triton_impl import sparse_decode_fwd  # noqa: E402
from moba_backend.ops.pooling import naive as pooling_naive  # noqa: E402
from moba_backend.ops.pooling.triton_impl import update_block_summaries_fwd  # noqa: E402
from moba_backend.ops.prefill import naive as attn_naive  # noqa: E402
from moba_backend.ops.prefill.triton_impl import sparse_prefill_fwd  # noqa: E402
from moba_backend.ops.select.fast import Selection, select, selection_mask  # noqa: E402
from moba_backend.plan import DecodePlanBuffers, MobaPlan, build_plan  # noqa: E402

OOM = torch.cuda.OutOfMemoryError
K = 1024


def layer_select(attn: MobaAttention, q, summary, plan) -> Selection:
    """The selection step of `MobaAttention.forward` on the Triton path, alone (both spellings
    of the fast select: `backend="triton"`, or an explicit Triton scorer)."""
    if "backend" in inspect.signature(select).parameters:
        return select(q, summary, plan, attn.params, backend="triton")
    from moba_backend.ops.select.triton_impl import triton_scorer
    return select(q, summary, plan, attn.params,
                  scorer=None if attn.params.dense else triton_scorer(attn.params.gate))


def impl_runs(args) -> list[tuple[str, str, str]]:
    """(implementation, mode, row label) of each MoBA row: `mode` on Triton, `cuda(mode)` on CUDA."""
    return [(impl, mode, mode if impl == "triton" else f"{impl}({mode})")
            for impl in args.impls for mode in args.modes]


def layer_pool(attn: MobaAttention, k_cache, summ, plan) -> None:
    """The pooling step of `MobaAttention.forward` on the GPU path, alone."""
    if attn.impl == "cuda":
        from moba_backend.ops.pooling.cuda_impl import update_block_summaries_fwd as pool_cuda
        pool_cuda(k_cache, summ, plan, attn.cfg.moba_gate)
    else:
        update_block_summaries_fwd(k_cache, summ, plan, attn.cfg.moba_gate)


def layer_attend(attn: MobaAttention, q, paged, plan, sel: Selection, out) -> None:
    """The attention step of `MobaAttention.forward` on the Triton path, alone."""
    if hasattr(attn, "_cuda_ops"):
        attn._attend_triton(q, paged.k_cache, paged.v_cache, plan, sel, out, attn._cuda_ops(q, paged.k_cache, paged.v_cache))
        return
    if hasattr(attn, "_attend_triton"):
        attn._attend_triton(q, paged.k_cache, paged.v_cache, plan, sel, out)
        return
    common = dict(block_size=attn.cfg.moba_block_size, scale=attn.scale)
    if plan.prefill.num:
        sparse_prefill_fwd(q, paged.k_cache, paged.v_cache, plan.block_table, plan.prefill, sel, out,
                           tokens_per_tile=plan.tokens_per_tile, block_m=plan.block_m, **common)
    if plan.decode.num:
        sparse_decode_fwd(q, paged.k_cache, paged.v_cache, plan.block_table, plan.decode, sel, out, **common)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
@dataclass
class Shapes:
    H: int
    HK: int
    D: int
    block: int
    query_tile: int
    prefill_lens: list[int]
    decode_lens: list[int]
    batches: list[int]
    check_len: int
    cfg: dict = field(default_factory=dict)        # config keys beside the SPEC defaults
    check_cfg: dict = field(default_factory=dict)  # windows small enough to be sparse at check_len


FULL = Shapes(H=32, HK=8, D=128, block=128, query_tile=128,
              prefill_lens=[8 * K, 32 * K, 128 * K, 512 * K], decode_lens=[32 * K, 128 * K],
              batches=[1, 16], check_len=4 * K,
              check_cfg=dict(moba_encoder_top_k_left=8, moba_encoder_top_k_right=12,
                             moba_decoder_top_k_left=8, moba_decoder_top_k_right=12))
# Same code paths at interpreter-friendly sizes; windows shrunk so that every row is sparse.
TINY_WINDOWS = dict(moba_encoder_top_k_left=6, moba_encoder_top_k_right=8,
                    moba_decoder_top_k_left=4, moba_decoder_top_k_right=6)
TINY = Shapes(H=4, HK=2, D=64, block=32, query_tile=64, prefill_lens=[512], decode_lens=[512],
              batches=[1, 2], check_len=512, cfg=dict(TINY_WINDOWS), check_cfg=dict(TINY_WINDOWS))


def moba_config(shapes: Shapes, mode: str, gate: str, extra: dict | None = None) -> MobaConfig:
    return MobaConfig(moba_block_size=shapes.block, moba_query_tile=shapes.query_tile,
                      moba_tile_select=mode, moba_gate=gate, **{**shapes.cfg, **(extra or {})})


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_once(fn, dev: torch.device) -> float:
    """Milliseconds of one call (CUDA events on the GPU)."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Timer:
    dev: torch.device
    slow_ms: float = 150.0     # above this, skip do_bench's estimate loop
    budget_ms: float = 2500.0  # samples of a slow call: about this much time in all
    rep_ms: float = 100.0      # do_bench: about this much time of timed calls

    def __call__(self, fn, warm: bool = True) -> float:
        """Median ms of `fn`. Fast calls: triton.testing.do_bench (median). Slow calls (the 512K
        rows take seconds each): median of a few CUDA-event samples, since do_bench would run
        at least eight calls."""
        if warm:
            fn()
            sync(self.dev)
        first = time_once(fn, self.dev)
        if self.dev.type != "cuda":
            return first  # the interpreter: one call says enough, and each takes seconds
        if first >= self.slow_ms:
            n = max(0, min(4, int(self.budget_ms / first) - 1))
            return statistics.median([first] + [time_once(fn, self.dev) for _ in range(n)])
        return float(triton.testing.do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median"))


# ----------------------------------------------------------------------------------------------
# Data: random normal, or keys/queries with locality (--structured)
# ----------------------------------------------------------------------------------------------
class DataGen:
    """q/k/v in the model's dtype. `structured`: each KV head has block centres c[j] that follow a
    smooth AR(1) walk over blocks; a key is its block's centre plus noise; a query is the mean of
    the centres of a few earlier "focus" blocks (shared by a 512-token segment and a GQA group)
    plus its own block's centre plus noise, so per-token top-k selections overlap as in a model."""

    SEGMENT = 512
    FOCUS = 4
    RHO = 0.9

    def __init__(self, shapes: Shapes, dtype: torch.dtype, dev: torch.device, structured: bool,
                 seed: int):
        self.s, self.dtype, self.dev, self.structured = shapes, dtype, dev, structured
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    def randn(self, *shape, dtype=None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.dev, dtype=dtype or self.dtype)

    def centres(self, L: int) -> torch.Tensor | None:
        """[HK, NB, D] float32 unit-variance AR(1) walk over blocks, or None (random data)."""
        if not self.structured:
            return None
        s = self.s
        nb = triton.cdiv(L, s.block)
        lags = 64
        noise = self.randn(s.HK, nb + lags, s.D, dtype=torch.float32)
        c = torch.zeros(s.HK, nb, s.D, device=self.dev)
        for lag in range(lags):
            c += self.RHO ** lag * noise[:, lags - lag: lags - lag + nb]
        return c * math.sqrt(1 - self.RHO ** 2)

    def keys_values(self, L: int, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [L, HK, D]."""
        s = self.s
        v = self.randn(L, s.HK, s.D)
        if c is None:
            return self.randn(L, s.HK, s.D), v
        k = torch.empty(L, s.HK, s.D, dtype=self.dtype, device=self.dev)
        step = 64 * K
        for lo in range(0, L, step):
            hi = min(L, lo + step)
            blk = torch.arange(lo, hi, device=self.dev) // s.block
            k[lo:hi] = (c[:, blk].transpose(0, 1) + self.randn(hi - lo, s.HK, s.D, dtype=torch.float32)).to(self.dtype)
        return k, v

    def queries(self, pos: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """q: [len(pos), H, D] for tokens at absolute positions `pos` (one request)."""
        s = self.s
        n = pos.numel()
        if c is None:
            return self.randn(n, s.H, s.D)
        G = s.H // s.HK
        n_seg = int(pos.max()) // self.SEGMENT + 1
        seg_start_blk = (torch.arange(n_seg, device=self.dev) * self.SEGMENT // s.block).clamp(min=1)
        u = torch.rand(n_seg, s.HK, self.FOCUS, generator=self.gen, device=self.dev)
        focus = (u * seg_start_blk[:, None, None]).long()                              # [NS, HK, F]
        hk = torch.arange(s.HK, device=self.dev)[None, :, None]
        signal = c[hk, focus].sum(2) / math.sqrt(self.FOCUS)                         # [NS, HK, D]
        q = torch.empty(n, s.H, s.D, dtype=self.dtype, device=self.dev)
        step = 32 * K
        for lo in range(0, n, step):
            p = pos[lo:lo + step].long()
            own = c[:, p // s.block].transpose(0, 1)                                  # [t, HK, D]
            b_q = signal[p // self.SEGMENT] + 0.5 * own                               # [t, HK, D]
            b_q = b_q.repeat_interleave(G, dim=1) + 0.7 * self.randn(p.numel(), s.H, s.D, dtype=torch.float32)
            q[lo:lo + step] = b_q.to(self.dtype)
        return q


@dataclass
class Paged:
    k_cache: torch.Tensor      # [N, P, HK, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [R, max_pages] int32, pages permuted, page 0 unused
    seq_lens: list[int]


def paged_cache(data: DataGen, seq_lens: list[int], P: int, kv_of) -> Paged:
    """A paged cache holding request r's keys/values `kv_of(r)` ([L_r, HK, D] each)."""
    s = data.s
    pages = [triton.cdiv(L, P) for L in seq_lens]
    N = sum(pages) + 1
    perm = torch.randperm(N - 1, generator=torch.Generator().manual_seed(len(seq_lens) * 7919 + P)) + 1
    bt = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    k_cache = data.randn(N, P, s.HK, s.D)  # never zeros: unused slots hold noise too
    v_cache = data.randn(N, P, s.HK, s.D)
    used = 0
    for r, (L, n) in enumerate(zip(seq_lens, pages)):
        bt[r, :n] = perm[used:used + n]
        used += n
        k, v = kv_of(r)
        slots = bt[r].to(data.dev).long()[torch.arange(L, device=data.dev) // P] * P + torch.arange(L, device=data.dev) % P
        k_cache.view(N * P, s.HK, s.D)[slots] = k
        v_cache.view(N * P, s.HK, s.D)[slots] = v
    return Paged(k_cache, v_cache, bt.to(data.dev), list(seq_lens))


def prefill_plan(cfg: MobaConfig, paged: Paged, H: int) -> MobaPlan:
    """Every request of the cache prefilled whole in one step, from an empty cache."""
    P = paged.k_cache.shape[1]
    bt = paged.block_table.cpu().long()
    slots = [bt[r, torch.arange(L) // P] * P + torch.arange(L) % P for r, L in enumerate(paged.seq_lens)]
    lens = torch.tensor(paged.seq_lens, dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0, dtype=torch.int32)])
    return build_plan(cfg, qsl, lens, paged.block_table, torch.cat(slots),
                      torch.zeros(len(lens), dtype=torch.bool), P, H, paged.k_cache.shape[2],
                      device=paged.k_cache.device, head_dim=paged.k_cache.shape[3])


def decode_plan(cfg: MobaConfig, paged: Paged, H: int) -> MobaPlan:
    """One decode token per request, at position L - 1 (its K/V already in the cache)."""
    R = len(paged.seq_lens)
    P = paged.k_cache.shape[1]
    last = torch.tensor(paged.seq_lens) - 1
    slots = paged.block_table.cpu().long()[torch.arange(R), last // P] * P + last % P
    return build_plan(cfg, torch.arange(R + 1, dtype=torch.int32), torch.tensor(paged.seq_lens, dtype=torch.int32),
                      paged.block_table, slots, torch.ones(R, dtype=torch.bool), P, H,
                      paged.k_cache.shape[2], device=paged.k_cache.device, head_dim=paged.k_cache.shape[3])


def pool_all_blocks(cfg: MobaConfig, paged: Paged, summary: torch.Tensor, H: int, triton_impl: bool) -> None:
    """Summaries of every complete block (what earlier steps wrote before a decode step): the
    pooling work of a plan that prefills the whole cache."""
    if triton_impl:
        update_block_summaries_fwd(paged.k_cache, summary, prefill_plan(cfg, paged, H), cfg.moba_gate)
    else:
        z = torch.zeros(len(paged.seq_lens), dtype=torch.int32)
        pooling_naive.update_block_summaries(paged.k_cache, summary, paged.block_table, z,
                                             torch.tensor(paged.seq_lens), cfg.moba_block_size, cfg.moba_gate)


def logical_kv(paged: Paged, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request r's K/V in position order: [L, HK, D] each."""
    L = paged.seq_lens[r]
    P = paged.k_cache.shape[1]
    pages = paged.block_table[r, : triton.cdiv(L, P)].long()
    return (paged.k_cache[pages].flatten(0, 1)[:L], paged.v_cache[pages].flatten(0, 1)[:L])


# ----------------------------------------------------------------------------------------------
# What a selection costs: causal pairs (prefill), KV tokens read (decode)
# ----------------------------------------------------------------------------------------------
def selection_work(sel: Selection, plan: MobaPlan, H: int) -> tuple[int, int, int]:
    """(selected pairs, union pairs, union KV tokens), summed over tokens and heads.

    selected: sum over (token t, query head h) of the keys <= t in the blocks h attends;
    union: the same over the blocks of the token's kernel-tile list (what the kernel loops over:
    for `token` decode this includes the blocks a member masks out; `token` prefill, organised
    by KV block, computes the selected pairs only: in a step of `token` prefills, union = selected,
    so mixed prefill + decode steps are not reported right); KV tokens: union pairs counted
    once per KV head (what a decode token's program reads)."""
    T = plan.num_tokens
    B = plan.block_size
    HK, LW = sel.tile_blocks.shape[1:]
    G = H // HK
    pos_all = plan.token_pos.long()
    chunk = max(1, (128 << 20) // (8 * HK * LW))
    sel_pairs = uni_kv = 0
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        pos = pos_all[lo:hi]
        tiles = plan.token_tile[lo:hi]
        lists = sel.tile_blocks[tiles].long()                                    # [t, HK, LW]
        valid = torch.arange(LW, device=lists.device) < sel.tile_nblocks[tiles][..., None]
        cnt = ((pos[:, None, None] - lists * B + 1).clamp(0, B) * valid).sum()
        uni_kv += int(cnt)
        if sel.member_blocks is not None:
            mem = sel.member_blocks[lo:hi].long()                                 # [t, H, W]
            sel_pairs += int((pos[:, None, None] - mem * B + 1).clamp(0, B).sum())
    uni_pairs = uni_kv * G
    if sel.member_blocks is None:
        sel_pairs = uni_pairs
    elif plan.prefill.num:
        # `token` prefill runs organised by KV block over the members' own picks
        uni_pairs = sel_pairs
    return sel_pairs, uni_pairs, uni_kv


# ----------------------------------------------------------------------------------------------
# Dense baseline: SDPA with the fastest backend that runs
# ----------------------------------------------------------------------------------------------
def _sdpa_backends(dev: torch.device, allow_math: bool):
    from torch.nn.attention import SDPBackend
    order = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
             ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    if allow_math:
        order.append(("math", SDPBackend.MATH))
    return order


def pick_sdpa(variants, dev: torch.device, allow_math: bool):
    """variants: [(label, make)], make() -> (q, k, v, kwargs), built only when tried. Returns
    (name, fn) of the first variant x backend that runs; the reasons the others did not are
    printed. An OOM everywhere is raised as OOM."""
    from torch.nn.attention import sdpa_kernel
    reasons, oom = [], False
    for label, make in variants:
        try:
            q, k, v, kw = make()
        except OOM:
            oom = True
            reasons.append(f"{label}: OOM building the inputs")
            continue
        for name, backend in _sdpa_backends(dev, allow_math):
            def fn(q=q, k=k, v=v, kw=kw, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, **kw)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fn()
                    sync(dev)
                    if reasons:
                        print(f"    sdpa: {name}{label} ran; skipped: {'; '.join(reasons)}")
                    return f"{name}{label}", fn
                except OOM:  # keep no reference to the traceback: its frames hold the inputs
                    oom = True
                    reasons.append(f"{name}{label}: OOM")
                except RuntimeError as e:
                    # torch says why a backend cannot run in a warning; the error only says "no kernel"
                    why = [str(w.message).splitlines()[0] for w in caught] or [str(e).splitlines()[0]]
                    reasons.append(f"{name}{label}: {' / '.join(why)[:200]}")
            gc.collect()
        del q, k, v
        gc.collect()
    if oom:
        raise OOM(f"every SDPA backend failed ({'; '.join(reasons)})")
    raise RuntimeError(f"no SDPA backend ran: {'; '.join(reasons)}")


def dense_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: int):
    """Causal SDPA inputs: q [L, H, D], k/v [L, HK, D] -> contiguous [1, H, L, D] each."""
    return (q.transpose(0, 1)[None].contiguous(),
            k.transpose(0, 1).repeat_interleave(G, 0)[None].contiguous(),
            v.transpose(0, 1).repeat_interleave(G, 0)[None].contiguous(), dict(is_causal=True))


# ----------------------------------------------------------------------------------------------
# FlexAttention peer: the same selection as a BlockMask
# ----------------------------------------------------------------------------------------------
_FLEX = {}


def flex_callable(dev: torch.device):
    """(compiled flex_attention, label); eager on CPU when compiling fails there."""
    if dev.type in _FLEX:
        return _FLEX[dev.type]
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(64, getattr(torch._dynamo.config, key)))
    _FLEX[dev.type] = (torch.compile(flex_attention, dynamic=False), "compiled")
    return _FLEX[dev.type]


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _from_kv_blocks(kv_num, kv_idx, full_num, full_idx, block_size, mask_mod, L, compute_q_blocks):
    from torch.nn.attention.flex_attention import BlockMask
    kw = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kw["compute_q_blocks"] = compute_q_blocks  # the forward pass reads only the kv-major lists
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(L, L), **kw)


def _ordered(mask: torch.Tensor, lists: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask, lists: [..., LW] -> (counts [...] int32, ascending chosen entries [..., width] int32)."""
    idx = torch.sort(torch.where(mask, lists, SENTINEL), dim=-1).values
    idx = torch.where(idx == SENTINEL, 0, idx).to(torch.int32)[..., :width]
    out = torch.zeros(*mask.shape[:-1], width, dtype=torch.int32, device=mask.device)
    out[..., :idx.shape[-1]] = idx
    return mask.sum(-1, dtype=torch.int32), out


def flex_mask_shared(sel: Selection, plan: MobaPlan, H: int, L: int, q_block: int, compute_q_blocks: bool):
    """BlockMask [1, H, L/q_block, NKB] of a `shared` selection of one prefill request at ctx 0.

    Every query tile (q_block tokens = one selection group) x KV head has one block list; its
    blocks wholly before the tile's first query are "full" (no mask_mod), the others (the tile's
    own blocks) partial with a causal mask_mod. Lists are per KV head, repeated for its G heads
    (Flex's BlockMask is per query head)."""
    B = plan.block_size
    HK, LW = sel.tile_blocks.shape[1:]
    G = H // HK
    dev = sel.tile_blocks.device
    NQB, NKB = L // q_block, triton.cdiv(L, B)
    NG = plan.num_groups
    assert NG == NQB, f"{NG} selection groups for {NQB} query blocks"
    n_pt = plan.prefill.num
    first = torch.zeros(NG, dtype=torch.long, device=dev)
    first.scatter_(0, plan.tile_group[:n_pt], torch.arange(n_pt, device=dev))   # any tile of the group
    lists = sel.tile_blocks[first].long()                                          # [NQB, HK, LW]
    valid = torch.arange(LW, device=dev) < sel.tile_nblocks[first][..., None]
    q_start = (torch.arange(NQB, device=dev) * q_block)[:, None, None]
    full = valid & ((lists + 1) * B - 1 <= q_start)

    def per_head(x: torch.Tensor) -> torch.Tensor:   # [NQB, HK, ...] -> [1, H, NQB, ...]
        return x.transpose(0, 1).repeat_interleave(G, 0)[None].contiguous()

    kv_num, kv_idx = (per_head(x) for x in _ordered(valid & ~full, lists, NKB))
    full_num, full_idx = (per_head(x) for x in _ordered(full, lists, NKB))
    return _from_kv_blocks(kv_num, kv_idx, full_num, full_idx, (q_block, B), _causal, L, compute_q_blocks)


def flex_mask_token(sel: Selection, plan: MobaPlan, H: int, L: int, q_block: int, compute_q_blocks: bool):
    """BlockMask of a `token` selection: a mask_mod reading a per (head, token) block bitmap
    [H, L, NKB] (and causal); each (head, query block) lists the union of its tokens' blocks."""
    B = plan.block_size
    NQB, NKB = L // q_block, triton.cdiv(L, B)
    dev = sel.member_blocks.device
    bitmap = torch.zeros(H, L, NKB + 1, dtype=torch.bool, device=dev)
    step = 64 * K
    for lo in range(0, L, step):
        mem = sel.member_blocks[lo:lo + step].long().clamp(max=NKB).transpose(0, 1)  # [H, t, W]
        bitmap[:, lo:lo + step].scatter_(2, mem, True)
    bitmap = bitmap[..., :NKB].contiguous()
    union = bitmap.view(H, NQB, q_block, NKB).any(2)                                # [H, NQB, NKB]
    lists = torch.arange(NKB, device=dev, dtype=torch.int32).expand(H, NQB, NKB)
    kv_num, kv_idx = _ordered(union, lists, NKB)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & bitmap[h, q_idx, kv_idx // B]

    return _from_kv_blocks(kv_num[None], kv_idx[None], None, None, (q_block, B), mask_mod, L,
                           compute_q_blocks)


FLEX_MASKS = {"shared": flex_mask_shared, "token": flex_mask_token}


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    kind: str            # prefill | decode
    L: int
    batch: int
    page: int
    mode: str            # shared | token | union | flex(shared) | flex(token)
    ms: float | None = None
    pool_ms: float | None = None
    sel_ms: float | None = None
    attn_ms: float | None = None
    dense_ms: float | None = None
    backend: str = ""
    ideal: float | None = None       # dense work / selected work
    ideal_union: float | None = None  # dense work / what the kernel loops over (token mode)
    sel_frac: float | None = None
    union_frac: float | None = None
    rate: float | None = None        # TFLOP/s (prefill) or GB/s (decode) of MoBA
    dense_rate: float | None = None
    plan_ms: float | None = None
    peak_gb: float | None = None
    graph_ms: float | None = None        # decode: MoBA's step replayed from a CUDA graph
    dense_graph_ms: float | None = None  # decode: dense SDPA replayed from a CUDA graph
    note: str = ""

    @property
    def speedup(self) -> float | None:
        return self.dense_ms / self.ms if self.ms and self.dense_ms else None

    @property
    def gate_pct(self) -> float | None:
        return 100.0 * self.sel_ms / self.ms if self.ms and self.sel_ms else None


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = ["kind", "L", "b", "P", "mode", "ms", "pool", "select", "attn", "gate%", "dense ms",
           "dense backend", "speedup", "ideal", "ideal(union)", "sel%", "union%", "rate",
           "dense rate", "graph ms", "dense graph ms", "plan ms", "peak GB", "note"]


def row_cells(r: Row) -> list[str]:
    unit = "TF/s" if r.kind == "prefill" else "GB/s"
    L = f"{r.L // K}K" if r.L % K == 0 else str(r.L)
    return [r.kind, L, str(r.batch), str(r.page), r.mode, _fmt(r.ms, ".3f"), _fmt(r.pool_ms, ".3f"),
            _fmt(r.sel_ms, ".3f"), _fmt(r.attn_ms, ".3f"), _fmt(r.gate_pct, ".0f"), _fmt(r.dense_ms, ".3f"),
            r.backend or "-", _fmt(r.speedup), _fmt(r.ideal), _fmt(r.ideal_union),
            _fmt(None if r.sel_frac is None else 100 * r.sel_frac, ".1f"),
            _fmt(None if r.union_frac is None else 100 * r.union_frac, ".1f"),
            "-" if r.rate is None else f"{r.rate:.4g} {unit}",
            "-" if r.dense_rate is None else f"{r.dense_rate:.4g} {unit}",
            _fmt(r.graph_ms, ".3f"), _fmt(r.dense_graph_ms, ".3f"), _fmt(r.plan_ms, ".1f"), _fmt(r.peak_gb, ".1f"), r.note]


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def guarded(what: str, fn, row: Row | None = None, dev: torch.device | None = None):
    """Run fn(); an OOM or another error becomes a note on the row (printed), never a crash."""
    err = None
    try:
        return fn()
    except OOM:
        err = f"{what}: OOM"
    except Exception as e:  # noqa: BLE001 - a benchmark row must not stop the run
        err = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    print(f"    !! {err}")
    if row is not None:
        row.note = (row.note + "; " if row.note else "") + err
    if dev is not None:
        free(dev)
    return None


@dataclass
class Ctx:
    args: argparse.Namespace
    shapes: Shapes
    dev: torch.device
    dtype: torch.dtype
    timer: Timer
    rows: list = field(default_factory=list)


def summary_cache(attn: MobaAttention, paged: Paged) -> torch.Tensor:
    N, P = paged.k_cache.shape[:2]
    return torch.zeros(attn.summary_shape(N, P), dtype=torch.float32, device=paged.k_cache.device)


def first_forward(row, attn: MobaAttention, make_plan, q, paged, summ, out, dev):
    """Build the step's plan (row.plan_ms: the median of 5 builds, host arrays to device tensors;
    once per step, not per layer), then run one forward, which also compiles the kernels.
    Returns (plan, the forward's Selection)."""
    times = []
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        plan = make_plan()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    row.plan_ms = statistics.median(times)
    sel_out: list = []
    attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ, plan, out=out, selection_out=sel_out)
    return plan, sel_out[0]


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def bench_prefill(c: Ctx, L: int, P: int) -> None:
    s, dev, args = c.shapes, c.dev, c.args
    G = s.H // s.HK
    print(f"\n== prefill L={L} P={P} ({'structured' if args.structured else 'random'} q/k)")
    data = DataGen(s, c.dtype, dev, args.structured, seed=args.seed + L)
    cen = data.centres(L)
    k_log, v_log = data.keys_values(L, cen)                                  # [L, HK, D]
    q = data.queries(torch.arange(L, device=dev), cen)                       # [L, H, D]
    del cen
    dense_pairs = L * (L + 1) // 2 * s.H
    flops = lambda pairs: 4 * s.D * pairs  # noqa: E731

    # dense causal SDPA on contiguous [1, H, L, D] (K/V repeated over the GQA group)
    dense = {}

    def run_dense():
        name, fn = pick_sdpa([("", lambda: dense_inputs(q, k_log, v_log, G))], dev,
                             allow_math=dev.type != "cuda" or L <= 16 * K)
        dense["backend"] = name
        dense["ms"] = c.timer(fn, warm=False)
        print(f"    dense sdpa[{name}] {dense['ms']:.3f} ms  "
              f"{flops(dense_pairs) / dense['ms'] / 1e9:.1f} TFLOP/s")

    if not args.no_dense:
        guarded("dense", run_dense, dev=dev)
        free(dev)
    d_ms, d_backend = dense.get("ms"), dense.get("backend", "OOM/err" if not args.no_dense else "")
    d_rate = flops(dense_pairs) / d_ms / 1e9 if d_ms else None

    paged = paged_cache(data, [L], P, lambda r: (k_log, v_log))
    if not args.flex:
        del k_log, v_log
    out = torch.empty_like(q)
    for impl, mode, label in impl_runs(args):
        row = Row("prefill", L, 1, P, label, dense_ms=d_ms, backend=d_backend, dense_rate=d_rate)
        c.rows.append(row)
        reset_peak(dev)
        cfg = moba_config(s, mode, args.gate)
        attn = MobaAttention(cfg, s.H, s.HK, s.D, impl=impl)
        state = {}

        def run_moba():
            summ = summary_cache(attn, paged)
            plan, sel = first_forward(row, attn, lambda: prefill_plan(cfg, paged, s.H), q, paged, summ,
                                      out, dev)
            sel_pairs, uni_pairs, _ = selection_work(sel, plan, s.H)
            row.ideal, row.ideal_union = dense_pairs / sel_pairs, dense_pairs / uni_pairs
            row.sel_frac, row.union_frac = sel_pairs / dense_pairs, uni_pairs / dense_pairs
            state.update(plan=plan, sel=sel, summ=summ, sel_pairs=sel_pairs)
            state["moba_fn"] = lambda: attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ, plan,
                                                    out=out)
            row.ms = c.timer(state["moba_fn"], warm=False)
            row.rate = flops(sel_pairs) / row.ms / 1e9
            print(f"    moba[{label}] {row.ms:.3f} ms  {row.rate:.1f} TFLOP/s  ideal x{row.ideal:.2f} "
                  f"(union x{row.ideal_union:.2f}, union {100 * row.union_frac:.1f}% of dense pairs)  "
                  f"plan {row.plan_ms:.1f} ms")

        def run_parts():
            plan, sel, summ = state["plan"], state["sel"], state["summ"]
            row.pool_ms = c.timer(lambda: layer_pool(attn, paged.k_cache, summ, plan), warm=False)
            row.sel_ms = c.timer(lambda: layer_select(attn, q, summ, plan), warm=False)
            row.attn_ms = c.timer(lambda: layer_attend(attn, q, paged, plan, sel, out), warm=False)
            print(f"    parts: pool {row.pool_ms:.3f}  select {row.sel_ms:.3f}  attn {row.attn_ms:.3f} ms"
                  f"  (gate share {row.gate_pct:.0f}%)")

        guarded(f"moba[{label}]", run_moba, row, dev)
        if row.ms is not None:
            guarded(f"moba[{label}] parts", run_parts, row, dev)
        row.peak_gb = peak_gb(dev)
        flex_bytes = s.H * L * triton.cdiv(L, s.block)  # token mode's bitmap
        if args.flex and impl == args.impls[0] and "sel" in state and mode in FLEX_MASKS:
            frow = Row("prefill", L, 1, P, f"flex({mode})", dense_ms=d_ms, backend=d_backend,
                       dense_rate=d_rate, ideal=row.ideal, sel_frac=row.sel_frac)
            c.rows.append(frow)
            if mode == "token" and flex_bytes > args.flex_bitmap_gb * 2**30:
                frow.note = (f"skipped: the per-token block bitmap takes {flex_bytes / 2**30:.1f} GB "
                             f"(> --flex-bitmap-gb {args.flex_bitmap_gb})")
                print(f"    flex[token] {frow.note}")
            else:
                reset_peak(dev)
                state["flex_fn"] = guarded(f"flex[{mode}]", lambda: bench_flex(
                    c, frow, mode, q, k_log, v_log, state["sel"], state["plan"], out, attn.scale,
                    flops(state["sel_pairs"])), frow, dev)
                frow.peak_gb = peak_gb(dev)
                if args.rounds > 1 and row.ms is not None and state["flex_fn"] is not None:
                    guarded(f"moba[{label}] / flex[{mode}] rounds",
                            lambda: alternate_rounds(c, row, frow, state, flops(state["sel_pairs"])), frow, dev)
        state.clear()
        free(dev)
    del paged, q, out
    free(dev)


def alternate_rounds(c: Ctx, row: Row, frow: Row, state: dict, flop: float) -> None:
    """Time MoBA's forward and FlexAttention's call again, alternating, args.rounds - 1 more
    times each, and report each one's median over all its rounds. Timed once each, one after
    the other, the first runs on a GPU still warm from the dense baseline while the second
    follows FlexAttention's compilation (seconds of an idle GPU); alternating gives both the
    same conditions."""
    moba, flex = [row.ms], [frow.ms]
    for _ in range(c.args.rounds - 1):
        moba.append(c.timer(state["moba_fn"], warm=False))
        flex.append(c.timer(state["flex_fn"], warm=False))
    row.ms, frow.ms = statistics.median(moba), statistics.median(flex)
    row.rate, frow.rate = flop / row.ms / 1e9, flop / frow.ms / 1e9
    row.note = (row.note + "; " if row.note else "") + f"median of {len(moba)} rounds alternating with FlexAttention"
    frow.note += f"; median of {len(flex)} rounds alternating with MoBA"
    print(f"    rounds (ms), MoBA: {' '.join(f'{t:.3f}' for t in moba)}; "
          f"FlexAttention: {' '.join(f'{t:.3f}' for t in flex)}; medians {row.ms:.3f} / {frow.ms:.3f}")


def bench_flex(c: Ctx, row: Row, mode: str, q, k_log, v_log, sel, plan, moba_out, scale, flop):
    """Time compiled flex_attention holding MoBA's selection; its output must equal MoBA's.
    Returns the timed call."""
    s, dev = c.shapes, c.dev
    L = q.shape[0]
    flex, label = flex_callable(dev)
    t0 = time.perf_counter()
    qf = q.transpose(0, 1)[None].contiguous()                    # [1, H, L, D]
    kf = k_log.transpose(0, 1)[None].contiguous()                # [1, HK, L, D]
    vf = v_log.transpose(0, 1)[None].contiguous()
    masks = {"bm": FLEX_MASKS[mode](sel, plan, s.H, L, s.query_tile, compute_q_blocks=False)}
    sync(dev)
    build_ms = (time.perf_counter() - t0) * 1e3

    def call(f):
        return f(qf, kf, vf, block_mask=masks["bm"], scale=scale, enable_gqa=True)

    t0 = time.perf_counter()
    try:
        o = call(flex)
    except OOM:
        raise
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        print(f"    flex: first call failed ({first}); retrying with the q-major lists built")
        masks["bm"] = FLEX_MASKS[mode](sel, plan, s.H, L, s.query_tile, compute_q_blocks=True)
        try:
            o = call(flex)
        except OOM:
            raise
        except Exception:
            if dev.type != "cpu":
                raise
            from torch.nn.attention.flex_attention import flex_attention
            print("    flex: compiled flex failed on CPU; eager flex instead")
            flex, label = flex_attention, "eager"
            _FLEX[dev.type] = (flex, label)
            o = call(flex)
    sync(dev)
    compile_s = time.perf_counter() - t0
    err = rel_err(o[0].transpose(0, 1), moba_out)
    del o
    flex_fn = lambda: call(flex)  # noqa: E731
    row.ms = c.timer(flex_fn, warm=False)
    row.rate = flop / row.ms / 1e9
    row.note = f"flex {label}; vs moba rel err {err:.1e}; mask {build_ms:.0f} ms; 1st call {compile_s:.1f} s"
    print(f"    flex[{mode}, {label}] {row.ms:.3f} ms  {row.rate:.1f} TFLOP/s  rel err vs moba {err:.2e}  "
          f"(block mask {build_ms:.0f} ms, first call {compile_s:.1f} s)")
    if err > 2e-2:
        print(f"    !! flex and moba disagree (rel err {err:.2e}): the BlockMask does not hold the selection")
        row.note += " MISMATCH"
    return flex_fn


def bench_decode(c: Ctx, L: int, b: int, P: int) -> None:
    s, dev, args = c.shapes, c.dev, c.args
    G = s.H // s.HK
    print(f"\n== decode L={L} batch={b} P={P} ({'structured' if args.structured else 'random'} q/k)")
    data = DataGen(s, c.dtype, dev, args.structured, seed=args.seed + 7 * L + b)
    qs = []

    def kv_of(r):
        cen = data.centres(L)
        k, v = data.keys_values(L, cen)
        qs.append(data.queries(torch.tensor([L - 1], device=dev), cen))
        return k, v

    paged = paged_cache(data, [L] * b, P, kv_of)
    q = torch.cat(qs)                                                         # [b, H, D]
    del qs
    elt = paged.k_cache.element_size()
    dense_bytes = b * L * s.HK * s.D * 2 * elt
    dense = {}

    def run_dense():
        def kv(i: int) -> torch.Tensor:                                   # [b, HK, L, D]
            return torch.stack([logical_kv(paged, r)[i] for r in range(b)]).transpose(1, 2).contiguous()

        qd = q[:, :, None]                                                 # [b, H, 1, D]
        variants = [("", lambda: (qd, kv(0), kv(1), dict(enable_gqa=True)))]
        if dev.type == "cuda":
            # NOTE: repeating K/V over the group reads G x the bytes; only if no GQA kernel runs
            variants.append(("+repeat", lambda: (qd, kv(0).repeat_interleave(G, 1),
                                                 kv(1).repeat_interleave(G, 1), {})))
            name, fn = _pick_decode(variants, dev)
        else:
            name, fn = pick_sdpa(variants, dev, allow_math=True)
        dense["backend"] = name
        dense["ms"] = c.timer(fn, warm=False)
        print(f"    dense sdpa[{name}] {dense['ms']:.3f} ms  {dense_bytes / dense['ms'] / 1e6:.1f} GB/s")
        if dev.type == "cuda" and args.graphs:
            dense["graph_ms"] = guarded("dense graph", lambda: c.timer(graph_of(fn), warm=False))

    if not args.no_dense:
        guarded("dense", run_dense, dev=dev)
        free(dev)
    d_ms = dense.get("ms")
    d_rate = dense_bytes / d_ms / 1e6 if d_ms else None
    out = torch.empty_like(q)
    pooled = {}

    def summaries(attn: MobaAttention, cfg: MobaConfig) -> torch.Tensor:
        """The context's block summaries, pooled once per row (the same for every mode)."""
        if "summ" not in pooled:
            pooled["summ"] = summary_cache(attn, paged)
            pool_all_blocks(cfg, paged, pooled["summ"], s.H, triton_impl=True)
        return pooled["summ"]

    for impl, mode, label in impl_runs(args):
        row = Row("decode", L, b, P, label, dense_ms=d_ms, backend=dense.get("backend", "OOM/err"),
                  dense_rate=d_rate, dense_graph_ms=dense.get("graph_ms"))
        c.rows.append(row)
        reset_peak(dev)
        cfg = moba_config(s, mode, args.gate)
        attn = MobaAttention(cfg, s.H, s.HK, s.D, impl=impl)

        def run_moba():
            summ = summaries(attn, cfg)
            plan, sel = first_forward(row, attn, lambda: decode_plan(cfg, paged, s.H), q, paged, summ,
                                      out, dev)
            _, _, kv_tokens = selection_work(sel, plan, s.H)
            read = kv_tokens * s.D * 2 * elt
            row.ideal = row.ideal_union = dense_bytes / read
            row.sel_frac = row.union_frac = read / dense_bytes
            row.ms = c.timer(lambda: attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ,
                                                  plan, out=out), warm=False)
            row.rate = read / row.ms / 1e6
            row.sel_ms = c.timer(lambda: layer_select(attn, q, summ, plan), warm=False)
            row.attn_ms = c.timer(lambda: layer_attend(attn, q, paged, plan, sel, out), warm=False)
            print(f"    moba[{label}] {row.ms:.3f} ms (select {row.sel_ms:.3f}, attn {row.attn_ms:.3f})  "
                  f"{row.rate:.1f} GB/s  ideal x{row.ideal:.2f} ({100 * row.union_frac:.1f}% of the KV)")
            if dev.type == "cuda" and args.graphs:
                # the step as vLLM replays it: planned into static buffers, captured once
                bufs = DecodePlanBuffers(cfg, b, L, P, s.H, s.HK, dev, head_dim=s.D)
                gplan = bufs.plan(torch.tensor(paged.seq_lens, dtype=torch.int32, device=dev),
                                  paged.block_table, torch.full((b,), -1, dtype=torch.int64, device=dev))
                gout = torch.empty_like(out)
                step = lambda: attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ,  # noqa: E731
                                            gplan, out=gout)
                row.graph_ms = c.timer(graph_of(step), warm=False)
                err = rel_err(gout, out)
                check(err < 1e-3, f"graph replay differs from the eager step: rel err {err:.2e}")
                print(f"    moba[{label}] CUDA graph {row.graph_ms:.3f} ms (rel err vs eager {err:.1e})")

        guarded(f"moba[{label}]", run_moba, row, dev)
        row.peak_gb = peak_gb(dev)
        free(dev)
    del paged, q, out, pooled
    free(dev)


def graph_of(fn):
    """`fn` captured in a CUDA graph (after a warm-up call on a side stream): its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _pick_decode(variants, dev):
    """GQA-native SDPA first (any backend), then repeated K/V."""
    try:
        return pick_sdpa(variants[:1], dev, allow_math=False)
    except OOM:
        raise
    except RuntimeError as e:
        print(f"    sdpa: no GQA-native backend ({str(e)[:160]}); repeating K/V")
        return pick_sdpa(variants[1:], dev, allow_math=False)


# ----------------------------------------------------------------------------------------------
# Correctness spot check (before any timing)
# ----------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run_checks(c: Ctx) -> list[str]:
    """MoBA Triton vs MobaAttention(impl="torch") on the same inputs, at a size where
    the selection is sparse; the attention kernel alone vs the reference given the same
    selection; MoBA with every block selected vs dense SDPA. Returns summary lines."""
    s, dev, args = c.shapes, c.dev, c.args
    L = s.check_len
    P = args.page_sizes[0]
    lines = []
    tol_attn, tol_e2e = (1e-2, 2e-2) if c.dtype != torch.float32 else (1e-4, 1e-3)
    print(f"\n== correctness spot check: prefill L={L}, decode 2 x {L}, P={P}, "
          f"windows {s.check_cfg or 'SPEC defaults'}")
    data = DataGen(s, c.dtype, dev, args.structured, seed=args.seed + 1)

    def verdict(name, err, tol, extra=""):
        ok = err < tol
        line = f"check {name}: rel err {err:.2e} (tol {tol:.0e}) {'PASS' if ok else 'FAIL'}{extra}"
        print("    " + line)
        lines.append(line)

    def compare(name, cfg, paged, plan, q, decode):
        t_attn = MobaAttention(cfg, s.H, s.HK, s.D, impl="triton")
        r_attn = MobaAttention(cfg, s.H, s.HK, s.D, impl="torch")
        summ_t, summ_r = summary_cache(t_attn, paged), summary_cache(r_attn, paged)
        k32, v32 = paged.k_cache.float(), paged.v_cache.float()
        if decode:
            pool_all_blocks(cfg, paged, summ_t, s.H, triton_impl=True)
            pool_all_blocks(cfg, Paged(k32, v32, paged.block_table, paged.seq_lens), summ_r, s.H,
                            triton_impl=False)
        sel_t, sel_r = [], []
        out_t = t_attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ_t, plan, selection_out=sel_t)
        # the torch impl on the same 16-bit q (its gate rounds summaries to q's dtype, as the
        # kernels do); it computes attention in float32
        out_r = r_attn.forward(q, None, None, paged.k_cache, paged.v_cache, summ_r, plan, selection_out=sel_r)
        m_t, m_r = selection_mask(sel_t[0], plan, s.H), selection_mask(sel_r[0], plan, s.H)
        rows_differ = (m_t != m_r).any(-1).float().mean().item()
        sparse = m_t.float().mean().item()
        ref = attn_naive.sparse_attention(q.float(), k32, v32, plan.block_table, plan.token_req,
                                          plan.token_pos, m_t, s.block, t_attn.scale)
        verdict(f"{name} attention given the selection", rel_err(out_t, ref), tol_attn)
        verdict(f"{name} end to end vs torch impl", rel_err(out_t, out_r), tol_e2e,
                f"  [selection: {100 * rows_differ:.2f}% of (token, head) rows differ from torch; "
                f"{100 * sparse:.1f}% of visible blocks selected]")

    def prefill_checks():
        cen = data.centres(L)
        k, v = data.keys_values(L, cen)
        q = data.queries(torch.arange(L, device=dev), cen)
        paged = paged_cache(data, [L], P, lambda r: (k, v))
        for mode in args.modes:
            cfg = moba_config(s, mode, args.gate, s.check_cfg)
            compare(f"prefill[{mode}]", cfg, paged, prefill_plan(cfg, paged, s.H), q, decode=False)
        # every block selected (dense fallback for all tiles) == dense causal SDPA
        cfg = moba_config(s, "shared", args.gate, {**s.check_cfg, "moba_use_encoder_seq_limit": 1 << 30})
        attn = MobaAttention(cfg, s.H, s.HK, s.D, impl="triton")
        plan = prefill_plan(cfg, paged, s.H)
        out = attn.forward(q, None, None, paged.k_cache, paged.v_cache, summary_cache(attn, paged), plan)
        G = s.H // s.HK
        name, fn = pick_sdpa([("", lambda: dense_inputs(q, k, v, G))], dev, allow_math=True)
        with torch.no_grad():
            dense = fn()[0].transpose(0, 1)
        verdict(f"prefill all blocks vs dense sdpa[{name}]", rel_err(out, dense), tol_attn)

    def decode_checks():
        qs = []

        lens = [L, L - 37]

        def kv_of(r):
            cen = data.centres(lens[r])
            kv = data.keys_values(lens[r], cen)
            qs.append(data.queries(torch.tensor([lens[r] - 1], device=dev), cen))
            return kv

        paged = paged_cache(data, lens, P, kv_of)
        q = torch.cat(qs)
        for mode in args.modes:
            cfg = moba_config(s, mode, args.gate, s.check_cfg)
            compare(f"decode[{mode}]", cfg, paged, decode_plan(cfg, paged, s.H), q, decode=True)

    for name, fn in (("prefill", prefill_checks), ("decode", decode_checks)):
        if guarded(f"check {name}", lambda fn=fn: fn() or True, dev=dev) is None:
            lines.append(f"check {name}: ERROR (see above)")
        free(dev)
    return lines


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def environment(dev: torch.device) -> list[str]:
    lines = [f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        lines.append(f"GPU {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), CUDA "
                     f"{torch.version.cuda}, cuDNN {cudnn}")
    else:
        lines.append(f"device cpu (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    return lines


def table_lines(rows: list[Row], markdown: bool) -> list[str]:
    cells = [COLUMNS] + [row_cells(r) for r in rows]
    if markdown:
        out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return out + ["| " + " | ".join(r) + " |" for r in cells[1:]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS) - 1)]
    return ["  ".join(v.rjust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in cells]


def parse_lens(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip().upper()
        if t:
            out.append(int(float(t[:-1]) * K) if t.endswith("K") else int(t))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="prefill,decode", help="prefill,decode")
    ap.add_argument("--lens", default=None, help="prefill lengths, e.g. 8K,32K,128K,512K")
    ap.add_argument("--decode-lens", default=None, help="decode context lengths, e.g. 32K,128K")
    ap.add_argument("--batch", default=None, help="decode batch sizes, e.g. 1,16")
    ap.add_argument("--modes", default="shared,token", help="moba_tile_select values to run")
    ap.add_argument("--impls", default="triton",
                    help="kernel implementations to run, e.g. triton,cuda (cuda rows read cuda(mode))")
    ap.add_argument("--page-size", default="16", help="KV page size(s), e.g. 16 or 16,64")
    ap.add_argument("--gate", default=None, help="moba_gate (default: the config default)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="moba_block_size (default: 128, or 32 with --tiny)")
    ap.add_argument("--config", default=None,
                    help="further config keys as JSON, e.g. '{\"moba_encoder_top_k_right\": 480}'")
    ap.add_argument("--structured", action="store_true",
                    help="q/k with locality (per-token selections overlap as in a model)")
    ap.add_argument("--no-flex", dest="flex", action="store_false", help="skip the FlexAttention peer")
    ap.add_argument("--rounds", type=int, default=1,
                    help="prefill: time MoBA and FlexAttention this many times each, alternating, and report "
                         "the medians (1: once each, one after the other)")
    ap.add_argument("--rep-ms", type=float, default=100.0,
                    help="milliseconds of timed calls per do_bench measurement (calls under --slow-ms)")
    ap.add_argument("--flex-bitmap-gb", type=float, default=2.0,
                    help="token-mode Flex peer only where its [H, L, L/block] bool bitmap fits this")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA baseline")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="skip the decode rows' CUDA-graph replays (MoBA and dense)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16; float16 on CPU, where the Triton interpreter's bf16 "
                         "tl.dot is broken (Triton 3.9) while the kernels' fp16 path is the same code")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-ms", type=float, default=150.0,
                    help="calls slower than this are timed by a few CUDA-event samples, not do_bench")
    ap.add_argument("--out", default=None, help="also write the results as a Markdown table here")
    args = ap.parse_args(argv)
    shapes = TINY if args.tiny else FULL
    try:
        extra = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as e:
        ap.error(f"--config: not JSON ({e})")
    if not isinstance(extra, dict):
        ap.error(f"--config: expected a JSON object of config keys, got {args.config!r}")
    for key in ("moba_block_size", "moba_query_tile", "moba_tile_select", "moba_gate"):
        if key in extra:
            ap.error(f"--config: set {key} with its own option, not --config")
    shapes = replace(shapes, block=args.block_size or shapes.block, cfg={**shapes.cfg, **extra},
                     check_cfg={**shapes.check_cfg, **extra})
    try:
        moba_config(shapes, "shared", args.gate or MobaConfig().moba_gate)
    except ValueError as e:
        ap.error(f"--block-size/--config: {e}")
    args.shapes = shapes
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.impls = [m.strip() for m in args.impls.split(",") if m.strip()]
    for impl in args.impls:
        if impl not in ("triton", "cuda"):
            ap.error(f"--impls: {impl!r} is not triton or cuda")
    args.page_sizes = parse_lens(args.page_size)
    args.lens = parse_lens(args.lens) if args.lens else shapes.prefill_lens
    args.decode_lens = parse_lens(args.decode_lens) if args.decode_lens else shapes.decode_lens
    args.batch = parse_lens(args.batch) if args.batch else shapes.batches
    args.gate = args.gate or MobaConfig().moba_gate
    args.dtype = args.dtype or ("float16" if args.device.startswith("cpu") else "bfloat16")
    for m in args.modes:
        if m not in ("shared", "token", "union"):
            ap.error(f"--modes: {m!r} is not one of shared, token, union")
    for r in args.rows:
        if r not in ("prefill", "decode"):
            ap.error(f"--rows: {r!r} is not one of prefill, decode")
    bad = [L for L in args.lens if L % shapes.query_tile]
    if bad:
        ap.error(f"--lens {bad}: prefill lengths must be multiples of the query tile {shapes.query_tile}")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be at least 1")
    if args.rep_ms <= 0:
        ap.error(f"--rep-ms {args.rep_ms}: must be positive")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny (Triton interpreter)")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--device cpu needs TRITON_INTERPRET=1 (set it before Python starts)")
    shapes = args.shapes
    c = Ctx(args, shapes, dev, getattr(torch, args.dtype), Timer(dev, slow_ms=args.slow_ms, rep_ms=args.rep_ms))
    env = environment(dev)
    for line in env:
        print(line)
    cfg0 = moba_config(shapes, "shared", args.gate)
    setting = (f"H={shapes.H} HK={shapes.HK} D={shapes.D} {args.dtype}; MoBA block {shapes.block}, "
               f"query tile {shapes.query_tile}, gate {args.gate}, encoder top-k "
               f"{cfg0.moba_encoder_top_k_left}..{cfg0.moba_encoder_top_k_right}, decoder top-k "
               f"{cfg0.moba_decoder_top_k_left}..{cfg0.moba_decoder_top_k_right} (the right end is "
               f"what gets selected); {'structured' if args.structured else 'random normal'} q/k; "
               f"rows {','.join(args.rows)}, prefill {args.lens}, decode {args.decode_lens} x batch "
               f"{args.batch}, modes {','.join(args.modes)}, page size {args.page_sizes}")
    print(setting)
    t_start = time.perf_counter()
    with torch.no_grad():
        checks = run_checks(c) if args.check else []
        for P in args.page_sizes:
            if "prefill" in args.rows:
                for L in args.lens:
                    guarded(f"prefill L={L}", lambda: bench_prefill(c, L, P), dev=dev)
            if "decode" in args.rows:
                for L in args.decode_lens:
                    for b in args.batch:
                        guarded(f"decode L={L} b={b}", lambda: bench_decode(c, L, b, P), dev=dev)
    total = time.perf_counter() - t_start
    legend = ("ms: MoBA forward (pool + select + attend) or the peer; gate% = select / forward; "
              "speedup = dense ms / ms; ideal = dense causal pairs / selected pairs (prefill) or "
              "dense KV bytes / KV bytes read (decode); ideal(union) and union%: the work the "
              "kernel loops over (token mode: the tile's union list, masked members included); "
              "rate: TFLOP/s of 4*D*selected pairs or GB/s of selected K+V bytes")
    if args.out:
        with open(args.out, "w") as f:
            f.write("# MoBA attention benchmark\n\n" + "\n".join(f"- {x}" for x in env + [setting] + checks))
            f.write(f"\n\n{legend}\n\n" + "\n".join(table_lines(c.rows, markdown=True)) + "\n")
        print(f"\nwrote {args.out}")
    print(f"\n==== summary ({total:.0f} s) ====")
    for line in env + [setting] + checks:
        print(line)
    print(legend)
    for line in table_lines(c.rows, markdown=False):
        print(line)


if __name__ == "__main__":
    main()
