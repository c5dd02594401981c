"""The attention alone on the Triton, CUDA and `auto` kernels, alternating rounds in one process.

    python -m benchmarks.compare_impls prefill:128:1:32:8:128:16 prefill:128:1:32:8:128:16:vllm \
        decode:128:16:32:8:128:16

Each argument is kind:L (K tokens):batch:H:HK:D:page[:vllm] (`vllm`: the caches as vLLM's padded
[N, HK, P, 2 D] pages). `make_step`'s inputs (`shared` lists, random summaries); prints a Markdown
row a shape: each round's `triton.testing.do_bench` median (ms, decode us) for Triton, CUDA and
`auto`, Triton's median over CUDA's, the ops `auto` gave CUDA, and CUDA's difference from Triton.
ROUNDS and REP (ms of timed calls a round) come from the environment.
"""
import os
import sys
import time

import torch
import triton

from benchmarks.tune_attention import make_step
from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig


def vllm_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, pad: int = 64):
    """The same caches as strided views of vLLM's pages: `[N, HK, P, 2 D]` (K then V in each row),
    each page followed by `pad` spare elements (where the summaries live), as `split_kv_cache`
    hands them to the kernels."""
    N, P, HK, D = k_cache.shape
    raw = torch.empty(N, HK * P * 2 * D + pad, dtype=k_cache.dtype, device=k_cache.device)
    kv = raw[:, :HK * P * 2 * D].view(N, HK, P, 2 * D)
    kv[..., :D] = k_cache.transpose(1, 2)
    kv[..., D:] = v_cache.transpose(1, 2)
    kv = kv.transpose(1, 2)
    return kv[..., :D], kv[..., D:]


def main() -> None:
    ROUNDS = int(os.environ.get("ROUNDS", "3"))
    REP = int(os.environ.get("REP", "200"))
    K = 1024
    cases = []
    for spec in sys.argv[1:]:
        # kind:L:batch:H:HK:D:P[:vllm]
        kind, L, b, H, HK, D, P, *lay = spec.split(":")
        cases.append((kind, int(L) * K, int(b), int(H), int(HK), int(D), int(P), lay[0] if lay else "dense"))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for kind, L, b, H, HK, D, P, lay in cases:
        t0 = time.time()
        torch.manual_seed(0)
        dec = kind == "decode"
        q, kc, vc, plan, sel, _ = make_step(L, b, dec, H=H, HK=HK, D=D, P=P)
        if lay == "vllm":
            kc, vc = vllm_pages(kc, vc)
        lt = MobaAttention(MobaConfig(), H, HK, D, impl="triton")
        lc = MobaAttention(MobaConfig(), H, HK, D, impl="cuda")
        la = MobaAttention(MobaConfig(), H, HK, D, impl="auto")
        ops_c = lc._cuda_ops(q, kc, vc)
        ops_a = la._cuda_ops(q, kc, vc)
        outs = {n: torch.empty_like(q) for n in "tca"}
        fns = {
            "t": lambda: lt._attend_triton(q, kc, vc, plan, sel, outs["t"]),
            "c": lambda: lc._attend_triton(q, kc, vc, plan, sel, outs["c"], ops_c),
            "a": lambda: la._attend_triton(q, kc, vc, plan, sel, outs["a"], ops_a),
        }
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        err = ((outs["c"].float() - outs["t"].float()).norm() / outs["t"].float().norm()).item()
        res = {n: [] for n in fns}
        for r in range(ROUNDS):
            for n, f in fns.items():
                res[n].append(triton.testing.do_bench(f, rep=REP, return_mode="median"))
        med = {n: sorted(v)[len(v) // 2] for n, v in res.items()}
        unit, mul = ("us", 1000.0) if dec else ("ms", 1.0)
        fmt = lambda v: "/".join(f"{x * mul:.3f}" if unit == "ms" else f"{x * mul:.1f}" for x in v)
        print(f"| {kind}{' vllm' if lay == 'vllm' else ''} | {L // K}K | {b} | {H}/{HK} | {D} | {P} | {fmt(res['t'])} | {fmt(res['c'])} | "
              f"{fmt(res['a'])} | {med['t'] / med['c']:.3f} | {','.join(sorted(ops_a)) or '-'} | {err:.1e} | "
              f"{time.time() - t0:.0f}s", flush=True)
        del q, kc, vc, plan, sel, outs, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
