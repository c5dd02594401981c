"""Distill a learned (Lite MoBA) gate from a frozen causal LM.

For every layer, the gate scores each candidate block of each query token and head as
`q . summary_j / sqrt(D)`, `summary_j = sum_t W[h, t, :] * k[j*B + t, h, :]`, with post-RoPE q and
k captured from the model's own forward. The target is the model's dense attention probability
max-pooled over each key block, renormalized over the same candidates (SPEC.md "Selection":
complete blocks before the query's own block, minus the sink and local blocks). Loss:
KL(target || softmax(gate scores)), averaged over query rows with >= 2 candidates and over
layers. Only W trains; it starts at 1/B, which is the `mean` gate.

    moba-distill                                  # embedded model, Paul Graham essays, minutes on CPU
    moba-distill --model DIR --data a.txt b.txt --seq-len 8192 --steps 200 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from moba_backend.gate import apply_gate, default_gate_path, mean_gate, save_gate_weights

logger = logging.getLogger("moba-distill")

DATA_ENV = "MOBA_HAYSTACK"
CAPTURE = "moba_capture"
# The harness evaluates on the tail of the haystack; the distiller reads only its head.
TRAIN_FRACTION = 0.6


def default_haystack() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "PaulGrahamEssays.json"


def read_texts(paths: list[str | os.PathLike]) -> str:
    """Plain text of .txt files, or the `text` field of .json files ({"text": ...})."""
    out = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".json":
            obj = json.loads(p.read_text())
            out.append(obj["text"] if isinstance(obj, dict) else "\n\n".join(map(str, obj)))
        else:
            out.append(p.read_text())
    return "\n\n".join(out)


# ---------------------------------------------------------------------------------------------
# capture post-RoPE q, k per layer


class QKCapture:
    """Registers an attention implementation that records (q [T, H, D], k [T, HK, D]) per layer
    of the first row, then runs SDPA: the model's forward is unchanged."""

    def __init__(self, model):
        from transformers import AttentionInterface

        self.model = model
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        AttentionInterface.register(CAPTURE, _capture_forward)
        for m in model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "o_proj"):
                m._moba_capture = self.store
        model.set_attn_implementation(CAPTURE)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.store.clear()
        self.model.base_model(input_ids=ids, use_cache=False)   # the LM head is not needed
        return [self.store[i] for i in sorted(self.store)]


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    module._moba_capture[module.layer_idx] = (query[0].transpose(0, 1).detach(),
                                              key[0].transpose(0, 1).detach())
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------
# targets and loss


def candidate_mask(T: int, block_size: int, sink_blocks: int, local_blocks: int,
                   device=None) -> torch.Tensor:
    """[T, NB] bool: block j is a candidate of the query at position t (SPEC.md Selection, step 2)."""
    nb = T // block_size
    c = torch.arange(T, device=device)[:, None] // block_size
    j = torch.arange(nb, device=device)[None, :]
    return (j < c - local_blocks) & (j >= sink_blocks)


TARGETS = ("max", "sum")
PARAMS = ("factored", "full")
DEFAULT_LR = {"factored": 1e-2, "full": 1e-3}   # Adam step of W's parameters, per parametrization
SCALE_LR = 0.05            # Adam step of the loss temperatures (log scale)
CALIBRATION_STEPS = 30     # temperature fit per gate before a held-out KL


@torch.no_grad()
def block_attention(q: torch.Tensor, k: torch.Tensor, cand: torch.Tensor, block_size: int,
                    rows: torch.Tensor | None = None, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of the query rows `rows` pooled over complete key blocks.

    q [T, H, D], k [T, HK, D], cand [T, NB], rows [R] positions (default: all T). Returns
    (max-pooled, summed) [R, H, NB] float32, both 0 off candidates and not renormalized: the
    summed one is the share of the row's whole attention that falls in each candidate block.
    Computed `chunk` rows at a time so long sequences fit.
    """
    T, H, D = q.shape
    G = H // k.shape[1]
    nb = cand.shape[1]
    rows = torch.arange(T, device=q.device) if rows is None else rows
    kf = k.float().repeat_interleave(G, dim=1).transpose(0, 1)                  # [H, T, D]
    mx = torch.zeros(rows.numel(), H, nb, dtype=torch.float32, device=q.device)
    sm = torch.zeros_like(mx)
    pos = torch.arange(T, device=q.device)
    for a in range(0, rows.numel(), chunk):
        r = rows[a: a + chunk]
        if not bool(cand[r].any()):
            continue
        b = int(r.max()) + 1                                                     # keys the chunk sees
        s = (q[r].float().transpose(0, 1) @ kf[:, :b].transpose(1, 2)) / math.sqrt(D)  # [H, t, b]
        s = s.masked_fill(pos[None, None, :b] > r[None, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1)[..., : nb * block_size]
        p = torch.nn.functional.pad(p, (0, -p.shape[-1] % block_size))
        p = p.reshape(H, r.numel(), -1, block_size)
        keep = cand[r][:, None, :]
        for out, pooled in ((mx, p.amax(-1)), (sm, p.sum(-1))):
            pooled = torch.nn.functional.pad(pooled[..., :nb], (0, nb - min(nb, pooled.shape[-1])))
            out[a: a + r.numel()] = pooled.transpose(0, 1) * keep
    return mx, sm


def _renormalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def layer_target(q: torch.Tensor, k: torch.Tensor, cand: torch.Tensor, block_size: int,
                 chunk: int = 512, reduce: str = "max", rows: torch.Tensor | None = None) -> torch.Tensor:
    """Max-pooled (or, `reduce="sum"`, summed) dense attention over complete blocks, renormalized
    over candidates: [R, H, NB] float32 (0 off candidates) for the rows `rows` (default: all T)."""
    mx, sm = block_attention(q, k, cand, block_size, rows, chunk)
    return _renormalize(mx if reduce == "max" else sm)


def gate_log_probs(weight: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cand: torch.Tensor,
                   log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax over candidates of `q . learned_summary / sqrt(D)`: [R, H, NB] for q [R, H, D]
    (any query rows), k [T, HK, D], cand [R, NB].

    `log_scale` [HK]: a per-KV-head temperature of the loss only (exp(log_scale) multiplies the
    scores). Top-k selection does not see a positive scale, so fitting it apart keeps W's training
    on the order of the blocks instead of on matching the target's sharpness.
    """
    R, H, D = q.shape
    HK = k.shape[1]
    summary = apply_gate(weight, k)                                              # [NB, HK, D]
    nb = cand.shape[1]
    s = torch.einsum("tkgd,jkd->tkgj", q.float().view(R, HK, H // HK, D), summary[:nb])
    if log_scale is not None:
        s = s * log_scale.exp()[None, :, None, None]
    s = s.reshape(R, H, nb) / math.sqrt(D)
    return torch.log_softmax(s.masked_fill(~cand[:, None, :], float("-inf")), dim=-1)


def kl_loss(logp: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || gate) averaged over query rows x heads (`rows`: a bool mask or index of the
    rows to use, default all)."""
    t = target if rows is None else target[rows]
    lp = (logp if rows is None else logp[rows]).clamp_min(-1e4)     # -inf off candidates, where target is 0
    kl = (t * (torch.log(t.clamp_min(1e-30)) - lp)).sum(-1)
    return kl.mean()


def forced_blocks(pos: torch.Tensor, cand: torch.Tensor, block_size: int) -> torch.Tensor:
    """[R] forced blocks of the query at each position `pos` [R]: every visible block (those up to
    its own) that is not a candidate (sink, local, its own). cand [R, NB]: the rows' candidates."""
    return pos // block_size + 1 - cand.sum(-1)


def slots(forced: torch.Tensor, blocks: int) -> torch.Tensor:
    """[R] candidates a selection of `blocks` blocks takes after the forced ones (SPEC.md Selection)."""
    return (blocks - forced).clamp_min(0)


def topk_mask(scores: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[R, H, NB] bool: each row's (and head's) `k[row]` highest-scoring candidates."""
    s = scores.detach().masked_fill(~cand[:, None, :], float("-inf"))
    rank = s.argsort(-1, descending=True).argsort(-1)
    return (rank < k[:, None, None]) & cand[:, None, :]


@torch.no_grad()
def block_recall(scores: torch.Tensor, mass: torch.Tensor, cand: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Share of the dense attention inside the selected blocks, per row and head [R, H]: the
    forced blocks (all the mass off candidates) plus the `k` highest-scoring candidates.
    mass [R, H, NB]: the summed attention per candidate block (`block_attention`)."""
    sel = topk_mask(scores, cand, k)
    return 1 - mass.sum(-1) + (mass * sel).sum(-1)


@dataclass
class Batch:
    qk: list[tuple[torch.Tensor, torch.Tensor]]   # per layer (q [R, H, D] of the rows, k [T, HK, D])
    targets: list[torch.Tensor]                   # per layer [R, H, NB], renormalized over candidates
    mass: list[torch.Tensor]                      # per layer [R, H, NB], summed attention (recall)
    cand: torch.Tensor                            # [R, NB]
    forced: torch.Tensor                          # [R] forced blocks of each row


def make_batch(capture: QKCapture, ids: torch.Tensor, block_size: int, sink: int, local: int,
               target: str = "max", rows: int = 0, generator: torch.Generator | None = None) -> Batch:
    """Capture one window and its targets. `rows` > 0: only that many query rows, drawn at random
    among those with >= 2 candidates (the target's cost is rows x T, not T^2 / 2)."""
    qk = capture(ids)
    T = ids.shape[1]
    cand = candidate_mask(T, block_size, sink, local, device=ids.device)
    valid = (cand.sum(1) >= 2).nonzero().flatten()
    if 0 < rows < valid.numel():
        pick = torch.randperm(valid.numel(), generator=generator)[:rows].to(valid.device)
        valid = valid[pick].sort().values
    qs, targets, mass = [], [], []
    for q, k in qk:
        mx, sm = block_attention(q, k, cand, block_size, valid)
        qs.append((q[valid], k))
        targets.append(_renormalize(mx if target == "max" else sm))
        mass.append(sm)
    return Batch(qs, targets, mass, cand[valid], forced_blocks(valid, cand[valid], block_size))


def batch_loss(weights: list[torch.Tensor], batch: Batch,
               log_scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    scales = log_scales if log_scales is not None else [None] * len(weights)
    losses = [kl_loss(gate_log_probs(w, q, k, batch.cand, ls), tgt)
              for w, ls, (q, k), tgt in zip(weights, scales, batch.qk, batch.targets)]
    return torch.stack(losses).mean()


@torch.no_grad()
def batch_recall(weights: list[torch.Tensor], batch: Batch, blocks: int = 8) -> float:
    """Mean block recall over layers, rows and heads of `blocks` blocks selected by the gate."""
    k = slots(batch.forced, blocks)
    rec = [block_recall(gate_log_probs(w, q, kk, batch.cand), m, batch.cand, k).mean()
           for w, (q, kk), m in zip(weights, batch.qk, batch.mass)]
    return torch.stack(rec).mean().item()


class GateParams:
    """The trained parameters of every layer's W [HK, B, D], starting at the `mean` gate.

    `full`: W itself. `factored`: `W[h, t, d] = (1 + a[h, t]) * (1 + c[h, d]) / B`, a weight per
    position in the block times a weight per channel (B + D numbers per KV head instead of B x D).
    Trained on the same six 8K windows (10 Adam steps each, 512 sampled rows), the held-out block
    recall at 8 blocks went 0.8663 (`mean`) -> 0.8625 with the full W, which fits the windows' own
    blocks, and -> 0.8676 with the factored one. Either way the file holds the full W.
    """

    def __init__(self, kind: str, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int,
                 device=None):
        if kind not in PARAMS:
            raise ValueError(f"param={kind!r}: expected one of {PARAMS}")
        self.kind, self.block_size = kind, block_size
        if kind == "full":
            self.tensors = [w.to(device).requires_grad_(True)
                            for w in mean_gate(num_layers, num_kv_heads, block_size, head_dim)]
        else:
            self.tensors = [torch.zeros(n, device=device, requires_grad=True)
                            for _ in range(num_layers)
                            for n in ((num_kv_heads, block_size), (num_kv_heads, head_dim))]

    def weights(self) -> list[torch.Tensor]:
        """Per layer W [HK, B, D] (differentiable)."""
        if self.kind == "full":
            return list(self.tensors)
        return [(1 + a)[:, :, None] * (1 + c)[:, None, :] / self.block_size
                for a, c in zip(self.tensors[::2], self.tensors[1::2])]


# ---------------------------------------------------------------------------------------------


def load_model(model_dir: str | os.PathLike, device: str, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_dims(model) -> tuple[int, int, int]:
    c = model.config
    H = c.num_attention_heads
    HK = getattr(c, "num_key_value_heads", None) or H
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    return c.num_hidden_layers, HK, D


def distill(model, token_ids: torch.Tensor, out: str | os.PathLike, *, block_size: int = 128,
            seq_len: int = 2048, steps: int = 12, inner_steps: int = 5, lr: float | None = None,
            sink_blocks: int = 1, local_blocks: int = 1, checkpoint: str | os.PathLike | None = None,
            resume: bool = False, save_every: int = 1, seed: int = 0, progress: bool = True,
            log_every: int = 1, target: str = "max", heldout: int = 0, learn_scale: bool = True,
            param: str = "factored", blocks: int = 8, rows: int = 0) -> dict:
    """Train the gate weights of `model` on windows of `token_ids` [N]; writes `out` (safetensors).

    Each step captures q/k for one window of `seq_len` tokens, computes the targets once, and
    takes `inner_steps` Adam steps on all layers' W. Returns {"history": [(step, loss before,
    loss after)], "heldout": (KL of the mean gate, KL of the result) or None, "recall": (block
    recall of the mean gate, of the result) on the held-out windows or None, "path": out}.
    "loss before" is measured on a window the gate has not yet seen (held out at that moment).
    `heldout` windows are cut from the end of `token_ids`, which training windows never touch;
    both KLs are measured on the same windows, so they compare directly.
    `learn_scale`: fit a per-layer, per-KV-head temperature of the loss beside W (not saved: top-k
    selection does not see it), so W learns the order of the blocks rather than the target's
    sharpness; the held-out KLs are then each taken at a temperature fitted on those windows.
    `target`: `max` (max-pooled attention, the oracle's order) or `sum` (attention mass per block).
    `param`: how W is trained (`GateParams`); `lr` defaults to DEFAULT_LR[param]. Block recall: share of the dense attention inside
    the `blocks` blocks the gate selects (forced included), as the quality harness measures it.
    `rows` > 0: that many random query rows per window (targets cost rows x seq_len).
    """
    from tqdm.auto import tqdm

    dev = next(model.parameters()).device
    L, HK, D = model_dims(model)
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {TARGETS}")
    if param not in PARAMS:
        raise ValueError(f"param={param!r}: expected one of {PARAMS}")
    lr = DEFAULT_LR[param] if lr is None else lr
    if token_ids.numel() < (1 + heldout) * seq_len:
        raise ValueError(f"need at least (1 + heldout) x seq_len={(1 + heldout) * seq_len} tokens of text, "
                         f"got {token_ids.numel()}")
    train_ids = token_ids[: token_ids.numel() - heldout * seq_len]
    if seq_len < (sink_blocks + local_blocks + 3) * block_size:
        raise ValueError(f"seq_len={seq_len} too short for block_size={block_size}: no query has 2 candidates")
    params = GateParams(param, L, HK, block_size, D, dev)
    scales = [torch.zeros(HK, device=dev, requires_grad=True) for _ in range(L)] if learn_scale else None
    groups = [{"params": params.tensors}] + ([{"params": scales, "lr": SCALE_LR}] if scales else [])
    opt = torch.optim.Adam(groups, lr=lr)
    start, history = 0, []
    ckpt = Path(checkpoint) if checkpoint else Path(str(out) + ".ckpt")
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=dev)
        if state.get("param") != param:
            raise ValueError(f"{ckpt} was trained with param={state.get('param')!r}, not {param!r}: "
                             f"pass that --param or start without --resume")
        with torch.no_grad():
            for w, s in zip(params.tensors, state["params"]):
                w.copy_(s)
            for w, s in zip(scales or [], state.get("log_scales") or []):
                w.copy_(s)
        opt.load_state_dict(state["opt"])
        start, history = state["step"], state["history"]
        logger.info("resumed from %s at step %d", ckpt, start)
    rng = random.Random(seed)
    offsets = [rng.randrange(0, train_ids.numel() - seq_len + 1) for _ in range(steps)]
    capture = QKCapture(model)
    gen = torch.Generator().manual_seed(seed)
    held = [make_batch(capture, token_ids[token_ids.numel() - (i + 1) * seq_len:][:seq_len][None].to(dev),
                       block_size, sink_blocks, local_blocks, target, rows, gen) for i in range(heldout)]

    def held_kl(ws) -> float | None:
        if not held:
            return None
        if not learn_scale:
            with torch.no_grad():
                return sum(batch_loss(ws, b).item() for b in held) / len(held)
        # each gate at the temperature that suits it best on these windows (the lowest KL seen
        # while fitting, starting from the fixed temperature)
        ls = [torch.zeros(HK, device=dev, requires_grad=True) for _ in range(L)]
        fit = torch.optim.Adam(ls, lr=SCALE_LR)
        best = float("inf")
        for i in range(CALIBRATION_STEPS + 1):
            fit.zero_grad()
            loss = sum(batch_loss(ws, b, ls) for b in held) / len(held)
            best = min(best, loss.item())
            if i < CALIBRATION_STEPS:
                loss.backward()
                fit.step()
        return best

    def held_recall(ws) -> float | None:
        return sum(batch_recall(ws, b, blocks) for b in held) / len(held) if held else None

    mean_ws = [w.to(dev) for w in mean_gate(L, HK, block_size, D)]
    kl_mean, recall_mean = held_kl(mean_ws), held_recall(mean_ws)
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="distill")
    for step in bar:
        ids = train_ids[offsets[step]: offsets[step] + seq_len][None].to(dev)
        batch = make_batch(capture, ids, block_size, sink_blocks, local_blocks, target, rows, gen)
        before = after = None
        for i in range(inner_steps):
            opt.zero_grad()
            value = batch_loss(params.weights(), batch, scales)
            value.backward()
            opt.step()
            before = value.item() if i == 0 else before
        with torch.no_grad():
            after = batch_loss(params.weights(), batch, scales).item()
        history.append((step, before, after))
        bar.set_postfix(before=f"{before:.4f}", after=f"{after:.4f}")
        if (step + 1) % log_every == 0:
            logger.info("step %d: KL %.4f (unseen window) -> %.4f", step, before, after)
        if save_every and ((step + 1) % save_every == 0 or step + 1 == steps):
            torch.save({"step": step + 1, "param": param, "params": [w.detach().cpu() for w in params.tensors],
                        "log_scales": [w.detach().cpu() for w in scales] if scales else None,
                        "opt": opt.state_dict(), "history": history}, ckpt)
    with torch.no_grad():
        weights = [w.detach() for w in params.weights()]
    heldout_kl = (kl_mean, held_kl(weights)) if held else None
    recall = (recall_mean, held_recall(weights)) if held else None
    if heldout_kl:
        logger.info("held-out KL (%d windows): mean gate %.4f -> learned %.4f", heldout, *heldout_kl)
        logger.info("held-out block recall at %d blocks: mean gate %.4f -> learned %.4f", blocks, *recall)
    meta = {"block_size": block_size, "seq_len": seq_len, "steps": steps, "inner_steps": inner_steps,
            "lr": lr, "learn_scale": learn_scale, "sink_blocks": sink_blocks, "local_blocks": local_blocks,
            "target": target, "param": param, "blocks": blocks, "rows": rows,
            "kl_history": json.dumps(history), "heldout_kl": json.dumps(heldout_kl),
            "heldout_recall": json.dumps(recall)}
    path = save_gate_weights(out, weights, metadata=meta)
    return {"history": history, "heldout": heldout_kl, "recall": recall, "path": str(path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser("moba-distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--data", nargs="*", help=f".txt or .json files (default: ${DATA_ENV} or "
                    "../shared/data/PaulGrahamEssays.json beside the repo; its first 60%%)")
    ap.add_argument("--out", help="output safetensors (default: <model dir>/moba_mlp_weight.safetensors)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12, help="windows of seq-len tokens")
    ap.add_argument("--inner-steps", type=int, default=5, help="Adam steps per window")
    ap.add_argument("--lr", type=float, default=None, help=f"Adam step (default: {DEFAULT_LR})")
    ap.add_argument("--sink-blocks", type=int, default=1)
    ap.add_argument("--local-blocks", type=int, default=1)
    ap.add_argument("--target", choices=TARGETS, default="max",
                    help="per-block target: max-pooled attention (the oracle's order) or its sum")
    ap.add_argument("--heldout", type=int, default=1,
                    help="windows cut from the end of the text, never trained on, for the KL before/after")
    ap.add_argument("--param", choices=PARAMS, default="factored",
                    help="factored: a weight per block position times one per channel; full: every W entry")
    ap.add_argument("--blocks", type=int, default=8,
                    help="blocks selected per query (forced included) for the held-out block recall")
    ap.add_argument("--rows", type=int, default=0,
                    help="random query rows per window for the targets and the loss (0: all)")
    ap.add_argument("--no-scale", action="store_true",
                    help="train W against the loss at the fixed 1/sqrt(D) temperature (W then also "
                         "learns the target's sharpness)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="the frozen model's dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    ap.add_argument("--checkpoint", help="resume checkpoint (default: <out>.ckpt)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from transformers import AutoTokenizer

    if args.model is None:
        from moba_backend.models import embedded_model_dir
        model_dir = embedded_model_dir()
    else:
        model_dir = Path(args.model)
    out = Path(args.out) if args.out else default_gate_path(model_dir)
    if args.data:
        text = read_texts(args.data)
    else:
        text = read_texts([default_haystack()])
        text = text[: int(len(text) * TRAIN_FRACTION)]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor(tok(text).input_ids)
    model = load_model(model_dir, args.device, getattr(torch, args.dtype) if args.dtype else None)
    res = distill(model, ids, out, block_size=args.block_size, seq_len=args.seq_len, steps=args.steps,
                  inner_steps=args.inner_steps, lr=args.lr, sink_blocks=args.sink_blocks,
                  local_blocks=args.local_blocks, checkpoint=args.checkpoint, resume=args.resume,
                  seed=args.seed, target=args.target, heldout=args.heldout, learn_scale=not args.no_scale,
                  param=args.param, blocks=args.blocks, rows=args.rows)
    h = res["history"]
    print(f"wrote {res['path']}: KL on unseen windows {h[0][1]:.4f} (mean gate) -> "
          f"{h[-1][1]:.4f}; last window after training {h[-1][2]:.4f}")
    if res["heldout"]:
        print(f"held-out KL ({args.heldout} x {args.seq_len} tokens): mean gate {res['heldout'][0]:.4f} "
              f"-> learned {res['heldout'][1]:.4f}")
        print(f"held-out block recall at {args.blocks} blocks: mean gate {res['recall'][0]:.4f} "
              f"-> learned {res['recall'][1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
