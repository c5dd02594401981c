"""Engine-free driving of the vLLM plugin: requests with fixed random Q/K/V, steps of mixed
decodes / chunked prefills / prefills, run through MobaMetadataBuilder + MobaAttentionImpl over a
cache laid out exactly as vLLM lays it out, and through the core `MobaAttention` (torch) over
plain contiguous caches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from vllm.config import set_current_vllm_config
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheLayout, KVCacheTensor,
                                        create_kv_cache_views)

from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig
from moba_backend.integrations.vllm.backend import (MobaAttentionBackend, MobaAttentionImpl,
                                                    MobaMetadataBuilder, moba_config_from_vllm)
from moba_backend.plan import build_plan

LAYER = "model.layers.3.self_attn.attn"


def stub_vllm_config(cfg: dict, num_heads: int, max_model_len: int = 1 << 16,
                     dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The few fields of VllmConfig the builders (MoBA's and vLLM's CPU attention) read."""
    return SimpleNamespace(
        additional_config={"moba_attention_config": cfg},
        model_config=SimpleNamespace(max_model_len=max_model_len, dtype=dtype,
                                     get_num_attention_heads=lambda pc: num_heads),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        device_config=SimpleNamespace(device_type=device),
        scheduler_config=SimpleNamespace(max_num_seqs=32),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1),
        speculative_config=None,
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


@dataclass
class Shape:
    H: int
    HK: int
    D: int
    P: int


@dataclass
class Work:
    """One request's part of a step: new positions [start, stop); `prompt` = prompt length."""

    req: int
    start: int
    stop: int
    prompt: int


@dataclass
class Harness:
    shape: Shape
    cfg_json: dict
    lengths: list[int]                  # final length of each request
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"                 # where the plugin side runs (the reference stays on CPU)
    num_pages: int = 0
    host_seq_lens: bool = True          # pass vLLM's host copy of seq_lens (else only the device one)
    q: list = field(default_factory=list)
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def __post_init__(self):
        s = self.shape
        g = torch.Generator().manual_seed(self.seed)
        rnd = lambda *d: torch.randn(*d, generator=g).to(self.dtype)  # noqa: E731
        for L in self.lengths:
            self.q.append(rnd(L, s.H, s.D))
            self.k.append(rnd(L, s.HK, s.D))
            self.v.append(rnd(L, s.HK, s.D))
        pages = [math.ceil(L / s.P) for L in self.lengths]
        self.num_pages = sum(pages) + 3                     # page 0 stays the unused null page
        perm = (torch.randperm(self.num_pages - 1, generator=g) + 1).tolist()
        self.block_table = torch.zeros(len(self.lengths), max(pages), dtype=torch.int32)
        for r, n in enumerate(pages):
            self.block_table[r, :n] = torch.tensor(perm[:n])
            perm = perm[n:]
        # plugin side
        self.vllm_config = stub_vllm_config(self.cfg_json, s.H, dtype=self.dtype, device=self.device)
        self.cfg: MobaConfig = moba_config_from_vllm(self.vllm_config)
        self.spec = MobaAttentionBackend.customize_spec(
            FullAttentionSpec(block_size=s.P, num_kv_heads=s.HK, head_size=s.D, dtype=self.dtype))
        page = self.spec.page_size_bytes
        self.raw = torch.zeros(self.num_pages * page, dtype=torch.int8, device=self.device)
        tensor = KVCacheTensor(size=self.raw.numel(), layers=[LAYER], layer_stride=self.num_pages * page,
                               block_stride=page)
        self.kv_cache = create_kv_cache_views(self.raw, self.spec, self.num_pages, KVCacheLayout.LBNHC,
                                              tensor)[0]
        self.builder = MobaMetadataBuilder(self.spec, [LAYER], self.vllm_config, torch.device(self.device))
        with set_current_vllm_config(self.vllm_config):
            self.impl = MobaAttentionImpl(s.H, s.D, 1.0 / math.sqrt(s.D), s.HK, None, None, "auto")
        self.layer = SimpleNamespace(layer_name=LAYER, _k_scale_float=1.0, _v_scale_float=1.0)
        # reference side: contiguous caches
        weight = None
        if self.cfg.moba_gate == "learned":
            from moba_backend.gate import load_gate_weights

            weight = load_gate_weights(self.cfg.moba_gate_weights)[3]
        self.ref = MobaAttention(self.cfg, s.H, s.HK, s.D, layer_idx=3, impl="torch", gate_weight=weight)
        self.k_ref = torch.zeros(self.num_pages, s.P, s.HK, s.D, dtype=self.dtype)
        self.v_ref = torch.zeros_like(self.k_ref)
        self.s_ref = torch.zeros(self.ref.summary_shape(self.num_pages, s.P), dtype=torch.float32)

    def _inputs(self, work: list[Work], pad: int):
        s = self.shape
        qs, ks, vs, slots, qsl, seq, prefilling = [], [], [], [], [0], [], []
        for w in work:
            pos = torch.arange(w.start, w.stop)
            qs.append(self.q[w.req][w.start:w.stop])
            ks.append(self.k[w.req][w.start:w.stop])
            vs.append(self.v[w.req][w.start:w.stop])
            slots.append(self.block_table[w.req, pos // s.P].long() * s.P + pos % s.P)
            qsl.append(qsl[-1] + w.stop - w.start)
            seq.append(w.stop)
            prefilling.append(w.start < w.prompt)
        T = qsl[-1]
        q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
        # vLLM pads the token dimension; K/V may run past the slot mapping, which ends in -1s.
        q = torch.cat([q, torch.randn(pad, s.H, s.D).to(self.dtype)])
        k = torch.cat([k, torch.randn(pad + 2, s.HK, s.D).to(self.dtype)])
        v = torch.cat([v, torch.randn(pad + 2, s.HK, s.D).to(self.dtype)])
        slot = torch.cat([torch.cat(slots), torch.full((pad,), -1)])
        rows = self.block_table[[w.req for w in work]]
        return T, q, k, v, slot, torch.tensor(qsl, dtype=torch.int32), \
            torch.tensor(seq, dtype=torch.int32), rows, torch.tensor(prefilling)

    def step_plugin(self, work: list[Work], pad: int = 3, pad_reqs: int = 0) -> torch.Tensor:
        """The step through MobaMetadataBuilder + MobaAttentionImpl on `device`; output on CPU.
        `pad_reqs`: padding requests after the real ones, as vLLM pads a CUDA graph's batch (no
        query token, sequence length 0, a null block table row; `pad` tokens of padding rows)."""
        T, q, k, v, slot, qsl, seq, bt, prefilling = self._inputs(work, pad)
        if pad_reqs:
            qsl = torch.cat([qsl, qsl[-1:].expand(pad_reqs)])
            seq = torch.cat([seq, torch.zeros(pad_reqs, dtype=torch.int32)])
            bt = torch.cat([bt, torch.zeros(pad_reqs, bt.shape[1], dtype=torch.int32)])
            prefilling = torch.cat([prefilling, torch.zeros(pad_reqs, dtype=torch.bool)])
        dev = self.device
        seq_host = seq.clone() if self.host_seq_lens else None
        q, k, v, slot, seq, bt = (x.to(dev) for x in (q, k, v, slot, seq, bt))
        cm = CommonAttentionMetadata(
            query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(work) + pad_reqs,
            num_actual_tokens=T + pad, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
            max_seq_len=int(seq.max()), block_table_tensor=bt, slot_mapping=slot,
            is_prefilling=prefilling, seq_lens_cpu_upper_bound=seq_host)
        md = self.builder.build(0, cm)
        self.last_metadata = md
        out = torch.full((T + pad, self.shape.H, self.shape.D), float("nan"), dtype=self.dtype, device=dev)
        self.impl.do_kv_cache_update(self.layer, k, v, self.kv_cache, slot)
        self.impl.forward(self.layer, q, k, v, self.kv_cache, md, out)
        return out[:T].cpu()

    def step_reference(self, work: list[Work]) -> torch.Tensor:
        T, q, k, v, slot, qsl, seq, bt, prefilling = self._inputs(work, 0)
        is_decode = ((qsl[1:] - qsl[:-1]) == 1) & ~prefilling
        plan = build_plan(self.cfg, qsl, seq, bt, slot, is_decode, self.shape.P, self.shape.H,
                          self.shape.HK)
        return self.ref.forward(q, k, v, self.k_ref, self.v_ref, self.s_ref, plan)

    def dense_reference(self, work: list[Work]) -> torch.Tensor:
        """Plain causal softmax attention, from the requests' own K/V sequences."""
        G = self.shape.H // self.shape.HK
        outs = []
        for w in work:
            k = self.k[w.req][: w.stop].double().repeat_interleave(G, 1)   # [L, H, D]
            v = self.v[w.req][: w.stop].double().repeat_interleave(G, 1)
            q = self.q[w.req][w.start: w.stop].double()                     # [t, H, D]
            s = torch.einsum("thd,lhd->thl", q, k) / math.sqrt(self.shape.D)
            pos = torch.arange(w.start, w.stop)
            s = s.masked_fill(torch.arange(w.stop)[None, None, :] > pos[:, None, None], float("-inf"))
            outs.append(torch.einsum("thl,lhd->thd", torch.softmax(s, -1), v))
        return torch.cat(outs)
