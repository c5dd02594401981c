"""Shared test helpers: random paged batches and the relative-error check."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from moba_backend.config import MobaConfig
from moba_backend.plan import MobaPlan, build_plan

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def kernel_device() -> str | None:
    """Where Triton kernels can run: the GPU, the CPU under TRITON_INTERPRET=1, else nowhere."""
    if HAS_CUDA:
        return "cuda"
    if INTERPRET:
        return "cpu"
    return None


requires_triton = pytest.mark.skipif(kernel_device() is None,
                                     reason="needs a CUDA device or TRITON_INTERPRET=1")


def rel_err(out: torch.Tensor, ref: torch.Tensor, name: str = "") -> float:
    """||out - ref|| / ||ref||, printed so failing runs show the figure."""
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    print(f"rel_err[{name}] = {err:.3e}")
    return err


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "") -> None:
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output"
    err = rel_err(out, ref, name)
    assert err < tol, f"{name}: rel err {err:.3e} >= {tol:.1e}"


@dataclass
class Batch:
    """A random step over a paged cache: requests given as (context, new tokens, decode?)."""

    q: torch.Tensor             # [T, H, D]
    k: torch.Tensor             # [T, HK, D] new keys of the step
    v: torch.Tensor
    k_cache: torch.Tensor       # [N, P, HK, D] with the context already written
    v_cache: torch.Tensor
    block_table: torch.Tensor   # [R, max_pages] (permuted pages, page 0 never used)
    slot_mapping: torch.Tensor  # [T]
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    is_decode: torch.Tensor

    def plan(self, cfg: MobaConfig, device=None) -> MobaPlan:
        P = self.k_cache.shape[1]
        return build_plan(cfg, self.query_start_loc, self.seq_lens, self.block_table,
                          self.slot_mapping, self.is_decode, P, self.q.shape[1], self.k_cache.shape[2],
                          device=device, head_dim=self.q.shape[2])

    def write_new_kv(self) -> None:
        """Put the step's K/V into the cache (what the layer does first)."""
        P = self.k_cache.shape[1]
        s = self.slot_mapping.long()
        self.k_cache[s // P, s % P] = self.k
        self.v_cache[s // P, s % P] = self.v


def make_batch(reqs: list[tuple[int, int, bool]], H: int, HK: int, D: int, P: int,
               dtype=torch.float32, device="cpu", seed: int | None = None, spare_pages: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    pages_per = [(c + n + P - 1) // P for c, n, _ in reqs]
    max_pages = max(pages_per)
    N = sum(pages_per) + spare_pages + 1
    perm = torch.randperm(N - 1, generator=g) + 1        # page 0 stays unused
    bt = torch.zeros(len(reqs), max_pages, dtype=torch.int32)
    used = 0
    for r, n in enumerate(pages_per):
        bt[r, :n] = perm[used:used + n]
        used += n
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    k_cache = rnd(N, P, HK, D)
    v_cache = rnd(N, P, HK, D)
    T = sum(n for _, n, _ in reqs)
    slots, qsl, sl = [], [0], []
    for r, (c, n, _) in enumerate(reqs):
        pos = torch.arange(c, c + n)
        slots.append(bt[r, pos // P].long() * P + pos % P)
        qsl.append(qsl[-1] + n)
        sl.append(c + n)
    to = lambda x: x.to(device)  # noqa: E731
    return Batch(q=to(rnd(T, H, D)), k=to(rnd(T, HK, D)), v=to(rnd(T, HK, D)),
                 k_cache=to(k_cache), v_cache=to(v_cache), block_table=to(bt),
                 slot_mapping=to(torch.cat(slots)), query_start_loc=to(torch.tensor(qsl, dtype=torch.int32)),
                 seq_lens=to(torch.tensor(sl, dtype=torch.int32)),
                 is_decode=to(torch.tensor([d for _, _, d in reqs])))


def moba_cfg(**kw) -> MobaConfig:
    """A small-block config for tests: block 16, tile 32, windows that make short contexts sparse."""
    base = dict(moba_block_size=16, moba_query_tile=32, moba_encoder_top_k_left=3,
                moba_encoder_top_k_right=6, moba_decoder_top_k_left=3, moba_decoder_top_k_right=5)
    base.update(kw)
    return MobaConfig(**base)


def random_selection(plan: MobaPlan, num_heads: int, num_kv_heads: int, density: float = 0.4,
                     seed: int | None = None):
    """A random per-head selection (own block always in), as (mask [T, H, NBV], Selection)."""
    from moba_backend.ops.select.fast import selection_from_mask

    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    T, nbv = plan.num_tokens, max(plan.num_visible_blocks, 1)
    pos = plan.token_pos.cpu().long()
    j = torch.arange(nbv)
    own = (pos // plan.block_size)[:, None]
    mask = (torch.rand(T, num_heads, nbv, generator=g) < density) & (j <= own)[:, None, :]
    mask |= (j == own)[:, None, :]
    dev = plan.token_pos.device
    mask = mask.to(dev)
    return mask, selection_from_mask(mask, plan, num_kv_heads)
