"""Sweep the sparse attention kernel's launch parameters on the GPU with a fixed selection.

    python benchmarks/tune_attention.py            # Llama-3-8B shapes, 32K and 128K
    python benchmarks/tune_attention.py --only gate,prefill --lens 131072 --block-m 128,256
    python benchmarks/tune_attention.py --only token --lens 131072   # `token` prefill kernels

Prints the median time of each configuration (triton.testing.do_bench) for prefill (`shared`
selection, 60 blocks of 128 per tile) and decode (batch 16, 120 blocks), beside dense SDPA.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import triton

import moba_backend.plan as plan_mod
from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig
from moba_backend.ops.decode.triton_impl import merge_splits, num_splits_for
from moba_backend.ops.prefill.triton_impl import sparse_attn_launch
from moba_backend.ops.select.fast import select
from moba_backend.plan import build_plan


def median_ms(args, fn) -> float:
    """Median ms of fn over about args.rep ms of timed calls (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, rep=args.rep, return_mode="median")


def make_step(L, batch, decode, H=32, HK=8, D=128, P=16, mode="shared", dtype=torch.bfloat16):
    cfg = MobaConfig(moba_tile_select=mode)
    pages = (L + P - 1) // P
    N = pages * batch + 1
    perm = torch.randperm(N - 1) + 1
    bt = perm[: pages * batch].view(batch, pages).int()
    kc = torch.randn(N, P, HK, D, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    n_q = 1 if decode else L
    qsl = torch.arange(batch + 1, dtype=torch.int32) * n_q
    sl = torch.full((batch,), L, dtype=torch.int32)
    pos = torch.arange(L - n_q, L)
    slots = torch.cat([bt[r, pos // P].long() * P + pos % P for r in range(batch)])
    plan = build_plan(cfg, qsl, sl, bt, slots, torch.full((batch,), decode), P, H, HK, device="cuda",
                      head_dim=D)
    layer = MobaAttention(cfg, H, HK, D, impl="triton")
    sc = torch.randn(layer.summary_shape(N, P), device="cuda")
    q = torch.randn(batch * n_q, H, D, dtype=dtype, device="cuda")
    sel = select(q, sc, plan, layer.params, backend="triton")
    return q, kc, vc, plan, sel, layer


def tune_token(args, ints) -> None:
    """`token` prefill: the KV-block kernels (`token_prefill_fwd`) and the member top-k."""
    from moba_backend.ops.prefill import triton_impl as pre
    from moba_backend.ops.select import triton_impl as sel_impl

    for L in ints(args.lens):
        q, kc, vc, plan, sel, layer = make_step(L, 1, False, mode="token")
        sc = torch.randn(layer.summary_shape(kc.shape[0], kc.shape[1]), device="cuda")
        out = torch.empty_like(q)
        ref = None
        for cfg in args.token.split(","):
            bm, w, st, sp, span = (int(x) for x in cfg.split(":"))
            pre.TOKEN_BLOCK_M, pre.TOKEN_NUM_WARPS, pre.TOKEN_NUM_STAGES = bm, w, st
            pre.BUCKET_SPLITS, pre.SPAN_TOKENS = sp, span

            def fn():
                pre.token_prefill_fwd(q, kc, vc, plan.block_table, plan.token_pos, plan.prefill, sel, out,
                                      block_size=128, scale=128 ** -0.5,
                                      num_visible_blocks=plan.num_visible_blocks)
            try:
                t = median_ms(args, fn)
                fn()
                ref = out.clone() if ref is None else ref
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                print(f"token prefill L={L} block_m={bm} warps={w} stages={st} splits={sp} span={span}: "
                      f"{t:.3f} ms (rel diff to first {err:.1e})")
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"token prefill {cfg}: {type(e).__name__}: {str(e)[:200]}")
        for cfg in args.topk.split(","):
            el, w = (int(x) for x in cfg.split(":"))
            sel_impl.TOPK_ELEMS, sel_impl.TOPK_NUM_WARPS = el, w
            t = median_ms(args, lambda: select(q, sc, plan, layer.params, backend="triton"))
            print(f"token select L={L} topk elems={el} warps={w} (x2 past 1024 blocks): {t:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--decode-len", type=int, default=131072)
    ap.add_argument("--rep", type=int, default=100, help="milliseconds of timed calls per configuration")
    ap.add_argument("--only", default="gate,prefill,decode")
    ap.add_argument("--pages", default="16")
    ap.add_argument("--block-m", default="128", help="prefill rows per program (tokens x GQA group)")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--prefetch", default="1", help="steps ahead the kernel loads list entries and pages, "
                                                    "e.g. 0,1")
    ap.add_argument("--rescale-at", default="8", help="log2 growth of a row's max before the unmasked steps "
                                                     "rescale (0: every step); repeat values to alternate, e.g. 0,8,0,8")
    ap.add_argument("--cuda", default="", help="prefill: also time the CUDA kernels, e.g. wgmma,mma "
                                               "(repeat names to alternate)")
    ap.add_argument("--decode-splits", default="4,8,16,32")
    ap.add_argument("--gate-block-m", default="64,128")
    ap.add_argument("--gate-block-j", default="32,64,128")
    ap.add_argument("--gate-stages", default="2,3")
    ap.add_argument("--gate-compact", default="0,1", help="group kernels reading the 16-bit compact copy")
    ap.add_argument("--gate-fused", default="1,0", help="group scores in one launch (1) or two (0)")
    ap.add_argument("--gate-modes", default="shared", help="moba_tile_select values of the gate rows")
    ap.add_argument("--token", default="64:4:2:4:512,128:8:2:4:512,64:4:3:4:512,64:4:2:2:512,64:4:2:4:1024",
                    help="token prefill configs block_m:warps:stages:splits:span_tokens")
    ap.add_argument("--topk", default="4096:4,4096:2,2048:2,8192:8", help="member top-k configs elems:warps")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    if "token" in args.only:
        tune_token(args, ints)
    if "gate" in args.only:
        from moba_backend.ops.select import triton_impl
        for L, mode in itertools.product(ints(args.lens), args.gate_modes.split(",")):
            q, kc, vc, plan, sel, layer = make_step(L, 1, False, mode=mode)
            sc = torch.randn(layer.summary_shape(kc.shape[0], kc.shape[1]), device="cuda")
            t_all = median_ms(args, lambda: select(q, sc, plan, layer.params, backend="triton"))
            print(f"gate L={L}: full {mode} select {t_all:.3f} ms")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    select(q, sc, plan, layer.params, backend="triton")
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            if mode != "shared":
                continue
            ref = triton_impl.group_scores_fwd(q, sc, plan, "mean", 1, 128 ** -0.5)
            for fu, bm, bj, w, st, cp in itertools.product(
                    ints(args.gate_fused), ints(args.gate_block_m), ints(args.gate_block_j), ints(args.warps),
                    ints(args.gate_stages), ints(args.gate_compact)):
                name = f"fused={fu} block_m={bm} block_j={bj} warps={w} stages={st} compact={cp}"
                try:
                    fn = lambda: triton_impl.group_scores_fwd(  # noqa: E731
                        q, sc, plan, "mean", 1, 128 ** -0.5, block_m=bm, block_j=bj, num_warps=w,
                        num_stages=st, compact=bool(cp), fused=bool(fu))
                    t = median_ms(args, fn)
                    g = fn()
                    k = max(plan.max_select, 1)
                    same = (g.topk(k, -1).indices.sort(-1).values == ref.topk(k, -1).indices.sort(-1).values)
                    print(f"  group kernels {name}: {t:.3f} ms; lists equal to default: "
                          f"{same.all(-1).float().mean().item():.4f}")
                except Exception as e:  # a config that does not fit (shared memory) is skipped
                    print(f"  group kernels {name}: {type(e).__name__}")
    pages = [int(x) for x in args.pages.split(",")]
    tiles_for = plan_mod.tokens_per_tile_for
    prefill_lens = ints(args.lens) if "prefill" in args.only else []
    for L, P, bm in itertools.product(prefill_lens, pages, ints(args.block_m)):
        # plan kernel tiles of bm rows (bm / group tokens each)
        plan_mod.tokens_per_tile_for = lambda h, hk, mode, t, d: (bm // (h // hk), bm)  # noqa: B023
        q, kc, vc, plan, sel, layer = make_step(L, 1, False, P=P)
        plan_mod.tokens_per_tile_for = tiles_for
        out = torch.empty_like(q)
        print(f"page size {P}, block_m {bm}")
        dense_q = q.view(1, L, 32, 128).transpose(1, 2)
        dk = torch.randn(1, 8, L, 128, dtype=q.dtype, device="cuda").repeat_interleave(4, 1)
        t_dense = median_ms(args, lambda: torch.nn.functional.scaled_dot_product_attention(
            dense_q, dk, dk, is_causal=True))
        print(f"prefill L={L}: dense sdpa {t_dense:.3f} ms; lists {tuple(sel.tile_blocks.shape)}")
        ref = None
        for bn, w, st, pf, ra in itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages),
                                                   ints(args.prefetch), floats(args.rescale_at)):
            try:
                fn = lambda: sparse_attn_launch(q, kc, vc, plan.block_table, plan.prefill, sel, out, None,  # noqa: E731
                                                block_size=128, scale=128 ** -0.5, softcap=0.0, window=-1,
                                                block_m=plan.block_m, num_splits=1, block_n=bn,
                                                num_warps=w, num_stages=st, prefetch=pf, rescale_at=ra)
                t = median_ms(args, fn)
                out.fill_(float("nan"))
                fn()
                ref = out.float().clone() if ref is None else ref
                err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"  block_m={plan.block_m} block_n={bn} warps={w} stages={st} prefetch={pf} rescale_at={ra}: "
                      f"{t:.3f} ms  "
                      f"x{t_dense / t:.2f} vs dense (rel diff to first {err:.1e})")
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"  block_n={bn} warps={w} stages={st} prefetch={pf} rescale_at={ra}: {type(e).__name__}: "
                      f"{str(e)[:200]}")
        for kernel in [k for k in args.cuda.split(",") if k]:
            # The CUDA prefill on the same step: the Hopper kernel (wgmma + TMA) or the mma.sync one.
            from moba_backend.ops.prefill import cuda_impl
            os.environ["MOBA_CUDA_WGMMA"] = {"wgmma": "1", "mma": "0"}[kernel]
            fn = lambda: cuda_impl.sparse_prefill_fwd(q, kc, vc, plan.block_table, plan.prefill, sel, out,  # noqa: E731
                                                      block_size=128, scale=128 ** -0.5,
                                                      tokens_per_tile=plan.tokens_per_tile)
            t = median_ms(args, fn)
            out.fill_(float("nan"))
            fn()
            err = ((out.float() - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
            print(f"  cuda {kernel}: {t:.3f} ms  x{t_dense / t:.2f} vs dense (rel diff to first {err:.1e})")
    if "decode" not in args.only:
        return
    q, kc, vc, plan, sel, layer = make_step(args.decode_len, 16, True)
    out = torch.empty_like(q)
    T = q.shape[0]
    for S in ints(args.decode_splits):
        for bn, w, st, pf, ra in itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages),
                                                   ints(args.prefetch), floats(args.rescale_at)):
            o_part = torch.empty(T, 32, S, 128, device="cuda")
            lse = torch.empty(T, 32, S, device="cuda")

            def fn():
                sparse_attn_launch(q, kc, vc, plan.block_table, plan.decode, sel, o_part, lse, block_size=128,
                                   scale=128 ** -0.5, softcap=0.0, window=-1, block_m=16, num_splits=S,
                                   block_n=bn, num_warps=w, num_stages=st, prefetch=pf, rescale_at=ra)
                out[plan.decode.q0.long()] = merge_splits(o_part, lse).to(out.dtype)
            try:
                t = median_ms(args, fn)
                print(f"  decode b16 L={args.decode_len} splits={S} block_n={bn} warps={w} stages={st} prefetch={pf} "
                      f"rescale_at={ra}: {t:.3f} ms")
            except Exception as e:
                print(f"  decode splits={S} block_n={bn}: {type(e).__name__}")
    print("auto splits:", num_splits_for(T, 8, sel.tile_blocks.shape[-1]))
    sc = torch.randn(layer.summary_shape(kc.shape[0], kc.shape[1]), device="cuda")
    t_sel = median_ms(args, lambda: select(q, sc, plan, layer.params, backend="triton"))
    k = torch.randn(16, 8, args.decode_len, 128, dtype=q.dtype, device="cuda")
    t_dense = median_ms(args, lambda: torch.nn.functional.scaled_dot_product_attention(
        q.view(16, 1, 32, 128).transpose(1, 2), k, k, enable_gqa=True))
    print(f"decode b16: fused select {t_sel:.3f} ms; dense sdpa {t_dense:.3f} ms")
    for mode in ("token", "union"):
        q2, kc2, vc2, plan2, sel2, layer2 = make_step(args.decode_len, 16, True, mode=mode)
        sc2 = torch.randn(layer2.summary_shape(kc2.shape[0], kc2.shape[1]), device="cuda")
        t = median_ms(args, lambda: select(q2, sc2, plan2, layer2.params, backend="triton"))
        print(f"decode b16 {mode}: fused select {t:.3f} ms")


if __name__ == "__main__":
    main()
