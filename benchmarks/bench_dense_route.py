"""Dense steps of fresh prompts: torch SDPA (the layer's dense route) against MoBA's kernel with
every block selected, one layer's `MobaAttention.forward`, in the same process.

    python benchmarks/bench_dense_route.py            # H100: Llama-3-8B attention shapes
    python benchmarks/bench_dense_route.py --steps 1x1024,1x4096,8x1024

Each step is `count x tokens` fresh prompts (no cached context) below the encoder seq limit, so
every group runs dense. Prints the median ms of the forward with the route and without it
(`DENSE_ROUTE_MAX_REQS = 0`), and their ratio; `DENSE_ROUTE_MAX_REQS` in
moba_backend/attention.py comes from this table.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing

import moba_backend.attention as attention_mod
from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig
from moba_backend.plan import build_plan


def step(count: int, n: int, H: int, HK: int, D: int, P: int, dtype, cfg: MobaConfig):
    pages = -(-n // P)
    N = pages * count + 1
    bt = (torch.randperm(N - 1)[: pages * count] + 1).view(count, pages).int()
    qsl = torch.arange(count + 1, dtype=torch.int32) * n
    sl = torch.full((count,), n, dtype=torch.int32)
    pos = torch.arange(n)
    slots = torch.cat([bt[r, pos // P].long() * P + pos % P for r in range(count)])
    plan = build_plan(cfg, qsl, sl, bt, slots, torch.zeros(count, dtype=torch.bool), P, H, HK, device="cuda",
                      head_dim=D)
    assert plan.fresh_dense is not None, "the step must run dense"
    kc = torch.zeros(N, P, HK, D, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    q = torch.randn(count * n, H, D, dtype=dtype, device="cuda")
    k = torch.randn(count * n, HK, D, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    return q, k, v, kc, vc, plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="1x512,1x1024,1x2048,1x4096,1x6144,2x4096,4x1024,8x1024,8x512,16x512")
    ap.add_argument("--heads", default="32,8,128", help="H,HK,D")
    args = ap.parse_args()
    H, HK, D = (int(x) for x in args.heads.split(","))
    P, dtype = 16, torch.bfloat16
    cfg = MobaConfig()
    layer = MobaAttention(cfg, H, HK, D)
    print(torch.cuda.get_device_name(), f"H={H} HK={HK} D={D} bf16, page {P}")
    print(f"{'step':>8} {'route ms':>9} {'kernel ms':>10} {'kernel/route':>13} {'rel diff':>9}")
    max_reqs = attention_mod.DENSE_ROUTE_MAX_REQS
    for spec in args.steps.split(","):
        count, n = (int(x) for x in spec.split("x"))
        q, k, v, kc, vc, plan = step(count, n, H, HK, D, P, dtype, cfg)
        sc = torch.zeros(layer.summary_shape(kc.shape[0], P), device="cuda")
        outs, times = [], []
        for on in (True, False):
            attention_mod.DENSE_ROUTE_MAX_REQS = 1 << 30 if on else 0
            out = torch.empty_like(q)
            fn = lambda: layer.forward(q, k, v, kc, vc, sc, plan, out=out)  # noqa: E731
            times.append(triton.testing.do_bench(fn, return_mode="median"))
            outs.append(out.float().clone())
        attention_mod.DENSE_ROUTE_MAX_REQS = max_reqs
        diff = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
        print(f"{spec:>8} {times[0]:9.3f} {times[1]:10.3f} {times[1] / times[0]:13.2f} {diff:9.1e}")


if __name__ == "__main__":
    main()
