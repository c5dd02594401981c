"""The gate distiller on a tiny random Llama: targets, one step lowering the loss, the file, resume."""

from __future__ import annotations

import pytest
import torch

from moba_backend.gate import load_gate_weights, mean_gate
from moba_backend.trainer.distill import (GateParams, QKCapture, batch_loss, block_attention,
                                          block_recall, candidate_mask, distill, forced_blocks,
                                          layer_target, make_batch, slots)
from tests.helpers import requires_gpu
from tests.tiny_llama import tiny_llama

B = 16


def test_candidates_follow_spec():
    cand = candidate_mask(6 * B, B, sink_blocks=1, local_blocks=1)
    assert cand.shape == (6 * B, 6)
    t = 5 * B + 3                      # own block 5, local 4, sink 0: candidates 1..3
    assert cand[t].nonzero().flatten().tolist() == [1, 2, 3]
    assert not cand[: 3 * B].any()


def test_target_is_renormalized_max_pool():
    torch.manual_seed(0)
    T, H, HK, D = 5 * B, 4, 2, 8
    q, k = torch.randn(T, H, D), torch.randn(T, HK, D)
    cand = candidate_mask(T, B, 1, 1)
    tgt = layer_target(q, k, cand, B, chunk=7)     # odd chunk: chunking must not matter
    t, h = T - 1, 3
    s = (q[t, h] @ k[: t + 1, h // 2].T) / D ** 0.5
    p = torch.softmax(s, -1)[: 5 * B].view(5, B).amax(-1) * cand[t]
    assert torch.allclose(tgt[t, h], p / p.sum(), atol=1e-6)
    rows = cand.sum(1) > 0
    assert torch.allclose(tgt[rows].sum(-1), torch.ones(int(rows.sum()), H))


def test_capture_is_post_rope_and_model_unchanged():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    cap = QKCapture(model)
    qk = cap(ids)
    assert len(qk) == 2 and qk[0][0].shape == (40, 4, 16) and qk[0][1].shape == (40, 2, 16)
    with torch.no_grad():
        out = model(ids, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5)
    # post-RoPE: the same token at two positions gives different keys
    ids2 = torch.full((1, 8), 7)
    k = cap(ids2)[0][1]
    assert not torch.allclose(k[1], k[5])


def test_one_step_lowers_loss(tmp_path):
    model = tiny_llama()
    capture = QKCapture(model)
    ids = torch.randint(0, 256, (1, 8 * B))
    batch = make_batch(capture, ids, B, 1, 1)
    weights = [w.requires_grad_(True) for w in mean_gate(2, 2, B, 16)]
    opt = torch.optim.Adam(weights, lr=1e-2)
    before = batch_loss(weights, batch)
    before.backward()
    opt.step()
    after = batch_loss(weights, batch)
    print(f"KL {before.item():.6f} -> {after.item():.6f}")
    assert after.item() < before.item()


def test_distill_writes_file_and_resumes(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2000,))
    out = tmp_path / "new" / "dir" / "moba_mlp_weight.safetensors"      # made on the way
    res = distill(model, ids, out, block_size=B, seq_len=8 * B, steps=2, inner_steps=2, lr=1e-2,
                  progress=False)
    assert len(res["history"]) == 2
    w = load_gate_weights(out, 2, 2, B, 16)
    assert not torch.allclose(w[0], torch.full_like(w[0], 1 / B))
    res2 = distill(model, ids, out, block_size=B, seq_len=8 * B, steps=3, inner_steps=2, lr=1e-2,
                   resume=True, progress=False)
    assert [h[0] for h in res2["history"]] == [0, 1, 2]    # steps 0-1 from the checkpoint


def test_heldout_kl_and_sum_target(tmp_path):
    """Held-out windows come from the end of the text and are scored for the mean gate and the
    result alike; the `sum` target is the renormalized attention mass per block."""
    torch.manual_seed(0)
    T, H, HK, D = 5 * B, 4, 2, 8
    q, k = torch.randn(T, H, D), torch.randn(T, HK, D)
    cand = candidate_mask(T, B, 1, 1)
    tgt = layer_target(q, k, cand, B, reduce="sum")
    t, h = T - 1, 1
    p = torch.softmax((q[t, h] @ k[:, h // 2].T) / D ** 0.5, -1).view(5, B).sum(-1) * cand[t]
    assert torch.allclose(tgt[t, h], p / p.sum(), atol=1e-6)
    model = tiny_llama()
    res = distill(model, torch.randint(0, 256, (600,)), tmp_path / "g.safetensors", block_size=B,
                  seq_len=8 * B, steps=2, inner_steps=3, lr=1e-2, progress=False, heldout=1,
                  target="sum")
    kl_mean, kl_learned = res["heldout"]
    print(f"held-out KL {kl_mean:.5f} -> {kl_learned:.5f}")
    assert kl_mean > 0 and kl_learned > 0


def test_sampled_rows_match_the_full_target():
    """Targets for a subset of query rows are those rows of the full computation."""
    torch.manual_seed(0)
    T, H, HK, D = 6 * B + 5, 4, 2, 8
    q, k = torch.randn(T, H, D), torch.randn(T, HK, D)
    cand = candidate_mask(T, B, 1, 1)
    rows = torch.tensor([3 * B, 4 * B + 7, T - 1])
    mx, sm = block_attention(q, k, cand, B, rows, chunk=2)
    fmx, fsm = block_attention(q, k, cand, B)
    assert torch.allclose(mx, fmx[rows], atol=1e-6) and torch.allclose(sm, fsm[rows], atol=1e-6)
    assert torch.allclose(layer_target(q, k, cand, B, rows=rows, reduce="sum"),
                          layer_target(q, k, cand, B, reduce="sum")[rows], atol=1e-6)


def test_slots_and_recall():
    """A query in block 6 (sink 1, local 1): forced 0, 5, 6; candidates 1..4. Selecting 5 blocks
    takes the 2 best candidates; recall is the forced mass plus theirs."""
    cand = candidate_mask(7 * B, B, 1, 1)[[6 * B + 1]]
    forced = forced_blocks(torch.tensor([6 * B + 1]), cand, B)
    assert forced.tolist() == [3] and slots(forced, 5).tolist() == [2] and slots(forced, 2).tolist() == [0]
    mass = torch.zeros(1, 1, 7)
    mass[0, 0, 1:5] = torch.tensor([0.1, 0.3, 0.05, 0.15])      # 0.4 on the forced blocks
    scores = torch.tensor([[[9.0, 1.0, 2.0, 4.0, 3.0, 9.0, 9.0]]])   # the gate picks 3 and 4
    rec = block_recall(scores, mass, cand, slots(forced, 5))
    assert torch.allclose(rec, torch.tensor([[0.4 + 0.05 + 0.15]]))
    best = block_recall(mass.clone(), mass, cand, slots(forced, 5))
    assert torch.allclose(best, torch.tensor([[0.4 + 0.3 + 0.15]]))


def test_factored_gate_starts_at_mean_and_trains(tmp_path):
    """The factored W starts at the mean gate; distilled on sampled rows it moves off it, is
    written as a full [HK, B, D] W, reports the held-out recall, and resumes only as itself."""
    p = GateParams("factored", 2, 2, B, 16)
    assert torch.equal(p.weights()[1], mean_gate(2, 2, B, 16)[1])
    model = tiny_llama()
    ids = torch.randint(0, 256, (800,))
    out = tmp_path / "g.safetensors"
    res = distill(model, ids, out, block_size=B, seq_len=10 * B, steps=2, inner_steps=2, lr=1e-2,
                  progress=False, heldout=1, param="factored", blocks=5, rows=40)
    rec_mean, rec_learned = res["recall"]
    print(f"held-out recall at 5 blocks {rec_mean:.4f} -> {rec_learned:.4f}")
    assert 0 < rec_mean <= 1 and 0 < rec_learned <= 1
    w = load_gate_weights(out, 2, 2, B, 16)[0]
    assert not torch.allclose(w, torch.full_like(w, 1 / B))
    with pytest.raises(ValueError, match="param='factored'"):
        distill(model, ids, out, block_size=B, seq_len=10 * B, steps=3, inner_steps=1, progress=False,
                resume=True, param="full")


@requires_gpu
def test_distill_on_cuda_with_heldout(tmp_path):
    """The whole loop on a CUDA device: model, targets, weights and the held-out KL of the mean
    gate all on the GPU, the file and the checkpoint written into a directory made on the way."""
    model = tiny_llama().cuda()
    out = tmp_path / "gpu" / "g.safetensors"
    res = distill(model, torch.randint(0, 256, (600,)), out, block_size=B, seq_len=8 * B, steps=2,
                  inner_steps=2, lr=1e-2, progress=False, heldout=1)
    assert res["heldout"][0] > 0
    assert load_gate_weights(out, 2, 2, B, 16)[0].device.type == "cpu"


def test_fitted_temperature_only_lowers_the_heldout_kl(tmp_path):
    """With `learn_scale`, each gate's held-out KL is taken at a temperature fitted on those
    windows: never above the KL at the fixed 1/sqrt(D) temperature, where the fit starts."""
    model = tiny_llama()
    ids = torch.randint(0, 256, (600,))
    kw = dict(block_size=B, seq_len=8 * B, steps=1, inner_steps=1, lr=1e-2, progress=False, heldout=1)
    fixed = distill(model, ids, tmp_path / "a.safetensors", learn_scale=False, **kw)["heldout"]
    fitted = distill(model, ids, tmp_path / "b.safetensors", **kw)["heldout"]
    print(f"mean gate held-out KL: fixed temperature {fixed[0]:.5f}, fitted {fitted[0]:.5f}")
    assert fitted[0] <= fixed[0] + 1e-6
