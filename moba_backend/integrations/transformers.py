"""MoBA as a Hugging Face transformers attention implementation.

    from moba_backend.integrations.transformers import configure
    state = configure(model, cfg, gate_weights=None)      # registers and selects "moba"
    model(input_ids, use_cache=False)

or `AutoModelForCausalLM.from_pretrained(..., attn_implementation="moba")` after `register()`,
then `configure(model, cfg)`. Each attention call builds a trivial paged cache from the call's
full K/V (pages of 64 contiguous tokens, block table `arange`) and runs `MobaAttention` over it.

What works: any batch size without padding (each row is its own request), prefill without a KV
cache (`use_cache=False`, what the quality harness runs) and with transformers' own cache
(`generate`: earlier tokens are the cached context, a one-token step is a decode step). Not
supported: padded batches (transformers passes no mask to custom implementations, so padding
cannot be seen) and dropout.

Two ways to attend, both with the same block summaries and the same selection (`fast.select`):
- `attend="moba"`: `MobaAttention.forward` (impl `torch` on CPU, Triton kernels on CUDA).
- `attend="gather"`: the selection as a dense mask [T, H, NBV], attended by the torch path
  (`ops/prefill/torch_impl.py`) whatever the device. Equal to `moba` within float rounding; it
  also accepts a custom gate scorer (the quality harness's oracle) and can measure block recall.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig, parse_moba_config
from moba_backend.ops.common import check
from moba_backend.ops.pooling import naive as pooling_naive
from moba_backend.ops.prefill import torch_impl as attn_torch
from moba_backend.ops.select.fast import select, selection_from_mask, selection_mask
from moba_backend.plan import build_plan

NAME = "moba"
PAGE_SIZE = 64
ATTENDS = ("moba", "gather")

# scorer(layer_idx, q [T, H, D], k [L, HK, D], plan, params) -> raw scores [T, H, NBV] float32.
Scorer = Callable[..., torch.Tensor]


@dataclass
class MobaStats:
    """Per-forward counters (reset with `reset()`): sparsity and block recall over layers."""

    computed_pairs: float = 0.0     # (query head, key) pairs attended, causal
    causal_pairs: float = 0.0       # all causal (query head, key) pairs
    recall_mass: float = 0.0        # dense attention mass inside the selected blocks, summed over rows
    recall_rows: int = 0            # rows (token x head x layer) that entered the recall
    selections: dict = field(default_factory=dict)   # layer -> (mask [T, H, NBV] bool, positions [T])

    def reset(self) -> None:
        self.computed_pairs = self.causal_pairs = self.recall_mass = 0.0
        self.recall_rows = 0
        self.selections = {}

    @property
    def sparsity(self) -> float:
        return 1.0 - self.computed_pairs / self.causal_pairs if self.causal_pairs else 0.0

    @property
    def recall(self) -> float:
        return self.recall_mass / self.recall_rows if self.recall_rows else float("nan")


@dataclass
class MobaState:
    """What `configure` attaches to a model: the config and how to run it."""

    cfg: MobaConfig
    gate_weights: Sequence[torch.Tensor] | None = None
    impl: str = "auto"
    attend: str = "moba"
    scorer: Scorer | None = None        # replaces the gate (attend="gather" only)
    count: bool = False                 # accumulate sparsity into stats
    recall: bool = False                # accumulate block recall (costs a dense pass per layer)
    record_layers: tuple[int, ...] = ()  # keep the selection mask of these layers
    stats: MobaStats = field(default_factory=MobaStats)
    _layers: dict = field(default_factory=dict)

    def layer(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
              scale: float, softcap: float, window: int) -> MobaAttention:
        key = (layer_idx, num_heads, num_kv_heads, head_dim, scale, softcap, window)
        if key not in self._layers:
            w = None
            if self.cfg.moba_gate == "learned":
                check(self.gate_weights is not None, "moba_gate 'learned' needs gate_weights")
                check(layer_idx < len(self.gate_weights),
                      f"gate weights have {len(self.gate_weights)} layers, layer {layer_idx} asked")
                w = self.gate_weights[layer_idx]
            self._layers[key] = MobaAttention(self.cfg, num_heads, num_kv_heads, head_dim, scale=scale,
                                              layer_idx=layer_idx, softcap=softcap, window=window,
                                              gate_weight=w, impl=self.impl)
        return self._layers[key]


def register() -> None:
    """Register `attn_implementation="moba"` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, moba_attention_forward)


def configure(model, cfg: MobaConfig | dict | str | None = None, gate_weights=None, impl: str = "auto",
              attend: str = "moba", scorer: Scorer | None = None, count: bool = False,
              recall: bool = False, record_layers: Sequence[int] = ()) -> MobaState:
    """Switch `model` to MoBA attention with `cfg`; returns the state (its `stats` fill as it runs).

    gate_weights: per-layer [HK, B, D] tensors (gate `learned`), e.g. from `gate.load_gate_weights`.
    impl: `MobaAttention` impl (`torch`, `triton`, `auto`: Triton on CUDA).
    attend: `moba` (MobaAttention.forward) or `gather` (see the module docstring).
    scorer: custom gate scores (oracle); needs attend="gather".
    """
    cfg = parse_moba_config(cfg)
    check(attend in ATTENDS, f"attend={attend!r}: expected one of {ATTENDS}")
    check(scorer is None or attend == "gather", "a custom scorer needs attend='gather'")
    check(not recall or attend == "gather", "recall needs attend='gather'")
    if gate_weights is not None:
        dev = next(model.parameters()).device
        gate_weights = [w.to(device=dev, dtype=torch.float32) for w in gate_weights]
    register()
    state = MobaState(cfg, gate_weights, impl, attend, scorer, count, recall, tuple(record_layers))
    for mod in _attention_modules(model):
        mod._moba_state = state
    model.set_attn_implementation(NAME)
    return state


def unconfigure(model, attn_implementation: str = "sdpa") -> None:
    for mod in _attention_modules(model):
        if hasattr(mod, "_moba_state"):
            del mod._moba_state
    model.set_attn_implementation(attn_implementation)


@contextlib.contextmanager
def moba_attention(model, cfg=None, restore: str = "sdpa", **kwargs):
    """`with moba_attention(model, cfg) as state: model(ids)`; restores `restore` afterwards."""
    state = configure(model, cfg, **kwargs)
    try:
        yield state
    finally:
        unconfigure(model, restore)


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim")
            and hasattr(m, "o_proj")]


def moba_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface. query [b, H, T, D]; key, value [b, HK, L, D] (L >= T,
    the last T keys are the new ones). Returns ([b, T, H, D], None)."""
    state: MobaState | None = getattr(module, "_moba_state", None)
    check(state is not None, "attn_implementation='moba' needs "
          "moba_backend.integrations.transformers.configure(model, cfg) first")
    check(dropout == 0.0 or not module.training, "MoBA attention has no dropout")
    b, H, T, D = query.shape
    HK = key.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    softcap = float(getattr(module.config, "attn_logit_softcapping", None) or 0.0)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or -1
    layer = state.layer(module.layer_idx, H, HK, D, scale, softcap, int(window))
    out = torch.empty(b, T, H, D, dtype=query.dtype, device=query.device)
    for r in range(b):
        out[r] = _run_request(state, layer, query[r].transpose(0, 1), key[r].transpose(0, 1),
                              value[r].transpose(0, 1))
    return out, None


def _run_request(state: MobaState, layer: MobaAttention, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """q [T, H, D]; k, v [L, HK, D] (context then new tokens). Returns [T, H, D]."""
    cfg = state.cfg
    T, H, D = q.shape
    L, HK, _ = k.shape
    ctx = L - T
    B = cfg.moba_block_size
    dev = q.device
    npages = (L + PAGE_SIZE - 1) // PAGE_SIZE
    k_cache = torch.zeros(npages * PAGE_SIZE, HK, D, dtype=k.dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:L], v_cache[:L] = k, v
    k_cache, v_cache = k_cache.view(npages, PAGE_SIZE, HK, D), v_cache.view(npages, PAGE_SIZE, HK, D)
    summary_cache = torch.zeros(layer.summary_shape(npages, PAGE_SIZE), dtype=torch.float32, device=dev)
    block_table = torch.arange(npages, dtype=torch.int32, device=dev)[None]
    i32 = dict(dtype=torch.int32, device=dev)
    # The context's blocks were completed in earlier steps; MobaAttention summarizes only the
    # blocks this step completes, so the earlier ones are pooled here.
    if ctx >= B:
        pooling_naive.update_block_summaries(k_cache, summary_cache, block_table, torch.tensor([0], **i32),
                                             torch.tensor([ctx], **i32), B, cfg.moba_gate, layer.gate_weight)
    plan = build_plan(cfg, torch.tensor([0, T], **i32), torch.tensor([L], **i32), block_table,
                      torch.arange(ctx, L, **i32), torch.tensor([T == 1 and ctx > 0], device=dev),
                      PAGE_SIZE, H, HK, device=dev, head_dim=D)
    pos = torch.arange(ctx, L, device=dev)
    need_mask = state.count or state.record_layers or state.recall
    if state.attend == "moba":
        sels: list = []
        out = layer.forward(q, None, None, k_cache, v_cache, summary_cache, plan, selection_out=sels)
        mask = selection_mask(sels[0], plan, H) if need_mask else None
    else:
        pooling_naive.update_block_summaries(k_cache, summary_cache, block_table, torch.tensor([ctx], **i32),
                                             torch.tensor([L], **i32), B, cfg.moba_gate, layer.gate_weight)
        if state.scorer is not None and not layer.params.dense:
            scores = state.scorer(layer.layer_idx, q, k, plan, layer.params)      # [T, H, NBV]
            mask = mask_from_scores(scores, plan, layer.params, summary_cache)
        else:
            mask = selection_mask(select(q, summary_cache, plan, layer.params), plan, H)
        out = torch.empty_like(q)
        attn_torch.sparse_attention_plan(q, k_cache, v_cache, plan, selection_from_mask(mask, plan, HK), out,
                                         B, layer.scale, layer.softcap, layer.window)
    if need_mask:
        _account(state, layer, q, k, mask, pos)
    return out


def mask_from_scores(scores: torch.Tensor, plan, p, summary_cache: torch.Tensor) -> torch.Tensor:
    """SPEC.md Selection steps 1-4 from given raw scores [T, H, NBV] (a custom gate such as the
    quality harness's oracle), as the selection mask [T, H, NBV] bool."""
    sel = select(scores.new_empty(scores.shape[0], scores.shape[1], 1), summary_cache, plan, p,
                 scorer=lambda q, sc, plan, lo, hi, nbv: scores[lo:hi, :, :nbv])
    return selection_mask(sel, plan, scores.shape[1])


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, block_size: int,
                         scale: float, reduce: str = "sum", chunk: int = 512) -> torch.Tensor:
    """Dense causal attention probabilities pooled per key block: [T, H, NB] float32.

    reduce `sum`: the attention mass of each block; `max`: the largest probability in it
    (the distillation target and the oracle gate). q [T, H, D]; k [L, HK, D]; pos [T].
    """
    T, H, D = q.shape
    L, HK, _ = k.shape
    G = H // HK
    B = block_size
    NB = (L + B - 1) // B
    kf = k.float().repeat_interleave(G, dim=1).transpose(0, 1)                  # [H, L, D]
    key_pos = torch.arange(L, device=q.device)
    out = torch.empty(T, H, NB, dtype=torch.float32, device=q.device)
    for a in range(0, T, chunk):
        qq = q[a:a + chunk].float().transpose(0, 1)                             # [H, t, D]
        s = (qq @ kf.transpose(1, 2)) * scale                                   # [H, t, L]
        s = s.masked_fill(key_pos[None, None, :] > pos[a:a + chunk, None][None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(s, dim=-1), (0, NB * B - L))
        p = p.view(H, -1, NB, B)
        out[a:a + chunk] = (p.sum(-1) if reduce == "sum" else p.amax(-1)).transpose(0, 1)
    return out


def _account(state: MobaState, layer: MobaAttention, q, k, mask: torch.Tensor, pos: torch.Tensor) -> None:
    """Sparsity (pairs attended / causal pairs), block recall and recorded selections."""
    B = layer.cfg.moba_block_size
    st = state.stats
    nbv = mask.shape[-1]
    H = q.shape[1]
    j = torch.arange(nbv, device=pos.device)
    per_block = (pos[:, None] + 1 - j[None, :] * B).clamp(0, B).float()           # [T, NBV] causal keys
    if state.count:
        st.computed_pairs += float((mask.float() * per_block[:, None, :]).sum())
        st.causal_pairs += float(H * (pos + 1).sum())
    if state.recall and not layer.params.dense:
        sparse_rows = pos + 1 >= layer.params.enc_limit
        if bool(sparse_rows.any()):
            qs, ps = q[sparse_rows], pos[sparse_rows]
            mass = block_attention_mass(qs, k[: int(ps.max()) + 1], ps, B, layer.scale)[..., :nbv]
            st.recall_mass += float((mass * mask[sparse_rows].float()).sum())
            st.recall_rows += int(qs.shape[0] * H)
    if layer.layer_idx in state.record_layers:
        st.selections[layer.layer_idx] = (mask.cpu(), pos.cpu())
