"""Where one layer's block selection spends its GPU time: the CUDA kernels of `select` on one
prefill of Llama-3-8B attention shapes (H 32, HK 8, D 128, bf16, block 128, page 16), random
q and summaries, by the torch profiler (one warm call). `--forward`: the whole layer forward
(pooling, selection, attention) over a random paged K/V cache instead.

    python benchmarks/profile_select.py --mode token --len 131072 [--forward]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig
from moba_backend.ops.select.fast import select
from moba_backend.plan import build_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="token", choices=("token", "union", "shared"))
    ap.add_argument("--len", type=int, default=131072, help="prefill tokens (one request)")
    ap.add_argument("--rows", type=int, default=14, help="kernels listed")
    ap.add_argument("--forward", action="store_true", help="profile the layer forward, not select alone")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_select.py needs a CUDA device")
    L, H, HK, D, P, B = args.len, 32, 8, 128, 16, 128
    dev = "cuda"
    cfg = MobaConfig(moba_block_size=B, moba_query_tile=128, moba_tile_select=args.mode)
    attn = MobaAttention(cfg, H, HK, D)
    N = L // P + 1
    bt = torch.arange(1, N, dtype=torch.int32, device=dev)[None]       # page 0 unused
    q = torch.randn(L, H, D, device=dev, dtype=torch.bfloat16)
    summ = torch.randn(attn.summary_shape(N, P), device=dev)
    plan = build_plan(cfg, torch.tensor([0, L], dtype=torch.int32), torch.tensor([L], dtype=torch.int32),
                      bt, torch.arange(L), torch.zeros(1, dtype=torch.bool), P, H, HK, device=dev, head_dim=D)
    if args.forward:
        k_cache = torch.randn(N, P, HK, D, device=dev, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)

        def run():
            attn.forward(q, None, None, k_cache, v_cache, summ, plan)
    else:
        def run():
            select(q, summ, plan, attn.params, backend="triton")
    run()                                                                 # compile, warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(f"{'forward' if args.forward else 'select'}[{args.mode}] L={L} on {torch.cuda.get_device_name()}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
