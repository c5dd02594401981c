"""The transformers integration against eager attention, and the quality harness end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moba_backend.config import MobaConfig
from moba_backend.integrations.transformers import configure, unconfigure
from moba_backend.ops.select.naive import gate_scores
from tests.helpers import requires_gpu
from tests.tiny_llama import tiny_llama

ALL = dict(moba_block_size=16, moba_query_tile=16, moba_encoder_top_k_left=1,
           moba_encoder_top_k_right=64, moba_use_encoder_seq_limit=16)
SPARSE = dict(moba_block_size=16, moba_query_tile=16, moba_encoder_top_k_left=2,
              moba_encoder_top_k_right=6, moba_use_encoder_seq_limit=32)


@pytest.fixture(scope="module")
def model_and_ref():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 333))
    with torch.no_grad():
        ref = {impl: (model.set_attn_implementation(impl), model(ids, use_cache=False).logits)[1]
               for impl in ("eager", "sdpa")}
    return model, ids, ref


@pytest.mark.parametrize("attend", ["moba", "gather"])
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
def test_every_block_selected_equals_dense(model_and_ref, attend, mode):
    model, ids, ref = model_and_ref
    state = configure(model, MobaConfig(moba_tile_select=mode, **ALL), impl="torch", attend=attend,
                      count=True)
    with torch.no_grad():
        out = model(ids, use_cache=False).logits
    unconfigure(model)
    for impl, r in ref.items():
        err = (out - r).abs().max().item()
        print(f"{attend}/{mode} vs {impl}: max |diff| {err:.2e}")
        assert err < 1e-4
    assert state.stats.sparsity == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("mode", ["token", "union", "shared"])
def test_gather_and_custom_scorer_match_the_layer(model_and_ref, mode):
    """attend='gather' (harness path) and a scorer that reproduces the mean gate equal
    MobaAttention.forward when the selection is sparse."""
    model, ids, ref = model_and_ref
    cfg = MobaConfig(moba_tile_select=mode, **SPARSE)

    def mean_scorer(layer_idx, q, k, plan, p):
        T, H, D = q.shape
        nb = k.shape[0] // p.block_size
        summ = k[: nb * p.block_size].float().view(nb, p.block_size, -1, D).mean(1)
        s = torch.stack([gate_scores(q[:, h], summ[:, h // (H // k.shape[1])][:, None], "mean")
                         for h in range(H)], 1)
        return torch.nn.functional.pad(s, (0, plan.num_visible_blocks - nb))

    outs = {}
    for name, kw in {"moba": dict(attend="moba"), "gather": dict(attend="gather", count=True),
                     "scorer": dict(attend="gather", scorer=mean_scorer)}.items():
        state = configure(model, cfg, impl="torch", **kw)
        with torch.no_grad():
            outs[name] = model(ids, use_cache=False).logits
        if name == "gather" and mode != "union":   # union of 16 tokens x 2 heads covers ~all
            assert 0.2 < state.stats.sparsity < 1.0
    unconfigure(model)
    assert (outs["moba"] - ref["eager"]).abs().max() > 1e-3      # really sparse
    assert (outs["gather"] - outs["moba"]).abs().max() < 1e-4
    assert (outs["scorer"] - outs["moba"]).abs().max() < 1e-4


def test_generate_with_cache_runs(model_and_ref):
    model, ids, _ = model_and_ref
    configure(model, MobaConfig(**ALL), impl="torch")
    with torch.no_grad():
        out = model.generate(ids[:, :40], max_new_tokens=3, do_sample=False)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model.generate(ids[:, :40], max_new_tokens=3, do_sample=False)
    unconfigure(model)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_gpu)])
def test_harness_quick(tmp_path, device):
    from moba_backend.quality import main
    from moba_backend.trainer.distill import distill

    model = tiny_llama(max_positions=1024)
    model.save_pretrained(tmp_path / "tiny")
    distill(model, torch.randint(0, 256, (3000,)), tmp_path / "tiny" / "moba_mlp_weight.safetensors",
            block_size=32, seq_len=256, steps=1, inner_steps=1, progress=False)
    data = tmp_path / "hay.json"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 400}))
    out = tmp_path / "q"
    assert main(["--quick", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(out),
                 "--threads", "1", "--device", device]) == 0
    res = json.loads((out / "quality.json").read_text())
    rows = res["rows"]
    assert {r["gate"] for r in rows} == {"mean", "max", "minmax", "learned", "oracle"}
    assert {r["mode"] for r in rows} == {"token", "union", "shared"}
    assert all(0.0 <= r["sparsity"] < 1.0 for r in rows) and any(r["sparsity"] > 0.3 for r in rows)
    assert all(0.0 <= r["recall"] <= 1.0 + 1e-6 for r in rows)
    assert (out / "quality.md").is_file()


def test_harness_oracle_sum(tmp_path):
    """`oracle-sum` ranks blocks by their dense attention mass: a row at the same budget (and so
    the same sparsity) as the max-pooled `oracle`; in `token` mode it takes, per query head and
    token, the blocks of the most mass, so no gate has more recall at that budget."""
    from moba_backend.quality import main

    model = tiny_llama(max_positions=1024)
    model.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "hay.json"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 400}))
    out = tmp_path / "q"
    assert main(["--quick", "--model", str(tmp_path / "tiny"), "--data", str(data), "--out", str(out),
                 "--threads", "1", "--gates", "mean", "oracle", "oracle-sum", "--modes", "token",
                 "--no-ruler"]) == 0
    rows = {r["gate"]: r for r in json.loads((out / "quality.json").read_text())["rows"]}
    assert rows["oracle-sum"]["sparsity"] == pytest.approx(rows["oracle"]["sparsity"])
    assert rows["oracle-sum"]["sparsity"] > 0.3
    assert rows["oracle-sum"]["recall"] >= max(rows["mean"]["recall"], rows["oracle"]["recall"]) - 1e-6
