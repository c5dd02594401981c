"""The quality harness: a causal LM run dense and with each MoBA gate and tile mode.

For every configuration (gate x tile mode x block count) it reports, on texts and prompts built
offline from a haystack of English essays:
- sparsity: 1 - attended (query head, key) causal pairs / all causal pairs, over all layers of
  the perplexity text (`union`: the union each member attends; `token`: each member's own);
- block recall: the share of the dense attention mass (of the run's own q/k) that falls inside
  the selected blocks, over queries past the dense fallback limit;
- tail perplexity: loss on the last half of long texts;
- passkey at several depths, in two formats: `essay` (the key sentence inside essay text) and
  `repeat` (the classic prompt: the key inside "The grass is green. The sky is blue. ..." repeated,
  the question at the end); teacher-forced log-likelihood of the true 5-digit key, and whether
  every digit is the argmax (no free generation: without a KV cache that would recompute the
  prompt once per token);
- RULER-style tasks (multi-key needles with distractors, variable tracking, common words),
  scored by teacher-forced argmax accuracy over the answer tokens.
Gates: `mean`, `max`, `minmax`, `learned` (weights from `moba-distill`), `oracle` (the true
max-pooled dense attention per block: what the distiller's default target ranks by) and
`oracle-sum` (the dense attention mass per block: the selection of the highest recall).

    moba-eval --quick                 # about a minute: 512 tokens, block 32
    moba-eval                         # the default sweep (README "Choosing the defaults")
    moba-eval --length 8192 --blocks 8 16 --gates mean learned --modes token
    moba-eval ... --local-blocks 2 --dense-from out/a/quality.json --out out/b   # reuse a dense row
    moba-eval --merge out/a/quality.json out/b/quality.json --out out/all       # one table, one plot

Writes `<out>/quality.md`, `<out>/quality.json`, `<out>/quality_vs_sparsity.png` and
`<out>/selection_heatmap.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moba_backend.config import MobaConfig
from moba_backend.gate import GateWeightError, load_gate_weights, resolve_gate_path
from moba_backend.integrations import transformers as moba_tf
from moba_backend.trainer.distill import TRAIN_FRACTION, default_haystack, read_texts

logger = logging.getLogger("moba-eval")

DEFAULT_GATES = ("mean", "max", "minmax", "learned", "oracle")
GATES = DEFAULT_GATES + ("oracle-sum",)
ORACLES = {"oracle": "max", "oracle-sum": "sum"}
MODES = ("token", "union", "shared")


# ---------------------------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): for tiny test models that ship no tokenizer."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


class HFTokenizer:
    def __init__(self, path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def load_tokenizer(model_dir):
    try:
        return HFTokenizer(model_dir)
    except Exception:          # noqa: BLE001 - no tokenizer files: the byte fallback
        logger.warning("no tokenizer in %s: using UTF-8 bytes", model_dir)
        return ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# cases: token ids + which trailing positions are scored


@dataclass
class Case:
    task: str                 # ppl | passkey | multikey | vartrack | cwe
    name: str
    ids: list[int]
    target_start: int         # first scored token (its loss is predicted from position - 1)
    target_end: int           # one past the last scored token
    meta: dict = field(default_factory=dict)


class Haystack:
    """Essay text from the part of the haystack the distiller never reads (its last 40%)."""

    def __init__(self, text: str, tok, seed: int):
        self.text = text[int(len(text) * TRAIN_FRACTION):]
        self.tok = tok
        self.rng = random.Random(seed)

    def filler(self, n_tokens: int) -> list[int]:
        start = self.rng.randrange(0, max(1, len(self.text) - 8 * n_tokens))
        start = self.text.find(" ", start) + 1
        ids = self.tok.encode(self.text[start: start + 8 * n_tokens])
        if len(ids) < n_tokens:
            raise ValueError(f"haystack too short for {n_tokens} tokens")
        return ids[:n_tokens]


def _with_needles(hay: Haystack, length: int, needles: list[tuple[float, str]], question: str,
                  answer: str, task: str, name: str, meta: dict, prefix: str = "") -> Case:
    """Filler of about `length` tokens with each needle sentence at its depth, then Q and A."""
    tok = hay.tok
    pre = tok.encode(prefix) if prefix else []
    q_ids = tok.encode(question)
    a_ids = tok.encode(answer)
    needle_ids = [(d, tok.encode(" " + s + " ")) for d, s in needles]
    body = length - len(pre) - len(q_ids) - len(a_ids) - sum(len(n) for _, n in needle_ids)
    fill = hay.filler(max(body, 1))
    ids, last = list(pre), 0
    for d, n in sorted(needle_ids, key=lambda x: x[0]):
        cut = int(d * len(fill))
        ids += fill[last:cut] + n
        last = cut
    ids += fill[last:] + q_ids
    start = len(ids)
    ids += a_ids
    return Case(task, name, ids, start, len(ids), meta)


PASSKEY_FORMATS = ("essay", "repeat")
# The classic passkey prompt (Landmark Attention, LongLoRA): the key hidden in a repeated filler.
REPEAT_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n")
REPEAT_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _repeat_passkey(tok, length: int, depth: float, key: str, name: str) -> Case:
    """The repeated-filler passkey prompt of about `length` tokens, the needle after whole fillers."""
    pre = tok.encode(REPEAT_INTRO)
    fill = tok.encode(REPEAT_FILLER)
    needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    q_ids = tok.encode("\nWhat is the pass key? The pass key is")
    a_ids = tok.encode(f" {key}")
    n = max(1, length - len(pre) - len(needle) - len(q_ids) - len(a_ids))
    body = (fill * (n // len(fill) + 1))[:n]
    cut = int(depth * n) // len(fill) * len(fill)
    ids = pre + body[:cut] + needle + body[cut:] + q_ids
    start = len(ids)
    return Case("passkey", name, ids + a_ids, start, start + len(a_ids),
                {"length": length, "depth": depth, "key": key, "format": "repeat"})


def build_cases(hay: Haystack, lengths: list[int], depths: list[float], ppl_texts: int,
                ruler: bool, seed: int, passkey_formats: tuple[str, ...] = PASSKEY_FORMATS) -> list[Case]:
    rng = random.Random(seed)
    L = max(lengths)
    cases = []
    for i in range(ppl_texts):
        ids = hay.filler(L)
        cases.append(Case("ppl", f"ppl{i}@{L}", ids, L // 2, L, {"length": L}))
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it.\n")
    for n in lengths:
        for d in depths:
            key = f"{rng.randrange(10000, 100000)}"
            if "essay" in passkey_formats:
                cases.append(_with_needles(
                    hay, n, [(d, f"The pass key is {key}. Remember it. {key} is the pass key.")],
                    "\nWhat is the pass key? The pass key is", f" {key}", "passkey", f"passkey@{n}/d{d:g}",
                    {"length": n, "depth": d, "key": key, "format": "essay"}, prefix=intro))
            if "repeat" in passkey_formats:
                cases.append(_repeat_passkey(hay.tok, n, d, key, f"passkey-repeat@{n}/d{d:g}"))
    if ruler:
        words = ["apple", "river", "candle", "falcon", "marble", "violin", "copper", "meadow"]
        rng.shuffle(words)
        vals = {w: f"{rng.randrange(1000000, 10000000)}" for w in words[:4]}
        ask = words[rng.randrange(4)]
        needles = [(rng.random(), f"One of the special magic numbers for {w} is: {v}.") for w, v in vals.items()]
        cases.append(_with_needles(hay, L, needles, f"\nWhat is the special magic number for {ask}? "
                                   f"The special magic number for {ask} is:", f" {vals[ask]}",
                                   "multikey", f"multikey@{L}", {"length": L, "keys": 4}))
        v0 = f"{rng.randrange(10000, 100000)}"
        names = ["X" + "".join(rng.choice("ABCDEFGHJKMNPQRSTUVWXYZ") for _ in range(3)) for _ in range(4)]
        chain = [f"VAR {names[0]} = {v0}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
        distract = f"VAR XQQQ = {rng.randrange(10000, 100000)}."
        needles = [(0.1 + 0.2 * i, s) for i, s in enumerate(chain)] + [(0.5, distract)]
        cases.append(_with_needles(hay, L, needles, f"\nQuestion: find all variables that are assigned "
                                   f"the value {v0}. Answer: the variables are", " " + " ".join(names),
                                   "vartrack", f"vartrack@{L}", {"length": L, "hops": 3}))
        cases.append(_cwe_case(hay.tok, L, rng))
    return cases


def _cwe_case(tok, length: int, rng: random.Random) -> Case:
    """Common-word extraction: a numbered word list where three words repeat far more often."""
    vocab = ["alpha", "bronze", "cactus", "dolphin", "ember", "fjord", "granite", "harbor", "igloo",
             "jasmine", "kettle", "lantern", "mosaic", "nectar", "orchid", "pepper", "quartz",
             "saddle", "tundra", "walnut", "yonder", "zephyr", "beacon", "cobalt", "dagger"]
    rng.shuffle(vocab)
    common, rare = vocab[:3], vocab[3:]
    q = tok.encode("\nQuestion: what are the three most common words in the list above? "
                   "Answer: the three most common words are")
    a = tok.encode(" " + ", ".join(common))
    per_word = len(tok.encode(" 1. alpha"))
    n_words = max(20, (length - len(q) - len(a) - 40) // per_word)
    counts = {w: n_words // (8 + i) for i, w in enumerate(common)}
    bag = [w for w, c in counts.items() for _ in range(c)]
    bag += [rng.choice(rare) for _ in range(n_words - len(bag))]
    rng.shuffle(bag)
    head = tok.encode("Below is a numbered list of words.")
    body = tok.encode("".join(f" {i + 1}. {w}" for i, w in enumerate(bag)))
    ids = (head + body)[: length - len(q) - len(a)] + q
    start = len(ids)
    return Case("cwe", f"cwe@{length}", ids + a, start, start + len(a), {"length": length})


# ---------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score_case(model, case: Case) -> dict:
    ids = torch.tensor(case.ids, device=model.device)[None]
    keep = len(case.ids) - case.target_start + 1
    logits = model(ids, use_cache=False, logits_to_keep=keep).logits[0].float()     # [keep, V]
    pred = logits[: case.target_end - case.target_start]     # position p predicts token p + 1
    tgt = ids[0, case.target_start: case.target_end]
    logp = torch.log_softmax(pred, dim=-1)
    nll = -logp.gather(1, tgt[:, None]).squeeze(1)
    hit = pred.argmax(-1) == tgt
    return {"nll": float(nll.mean()), "nll_sum": float(nll.sum()), "acc": float(hit.float().mean()),
            "exact": bool(hit.all()), "n": int(tgt.numel())}


def oracle_scorer(reduce: str):
    """A scorer of raw scores whose order is the dense attention pooled per block (`reduce`: `max`
    or `sum`), and whose softmax at the attention scale (`shared` mode) is that pooled attention
    renormalized over candidates."""
    def score(layer_idx, q, k, plan, params):
        pos = plan.token_pos.long()
        pooled = moba_tf.block_attention_mass(q, k, pos, params.block_size, params.scale, reduce=reduce)
        nbv = max(plan.num_visible_blocks, 1)
        pooled = torch.nn.functional.pad(pooled, (0, max(0, nbv - pooled.shape[-1])))[..., :nbv]
        return torch.log(pooled.clamp_min(1e-30)) / params.scale
    return score


@dataclass
class Run:
    gate: str
    mode: str
    blocks: int | None        # encoder top-k right (None: dense)
    scores: dict = field(default_factory=dict)   # case name -> score dict
    sparsity: float = 0.0
    recall: float = 1.0
    seconds: float = 0.0


def moba_cfg(block_size: int, blocks: int, gate: str, mode: str, query_tile: int,
             local: int, sink: int, dense_layers: tuple[int, ...]) -> MobaConfig:
    return MobaConfig(moba_block_size=block_size, moba_query_tile=query_tile,
                      moba_encoder_top_k_left=1, moba_encoder_top_k_right=blocks,
                      moba_decoder_top_k_left=1, moba_decoder_top_k_right=max(blocks, sink + local + 1),
                      moba_gate="mean" if gate in ORACLES else gate, moba_tile_select=mode,
                      moba_sink_blocks=sink, moba_local_blocks=local, moba_dense_layers=dense_layers)


def evaluate(model, cases: list[Case], gate: str, mode: str, blocks: int | None, args,
             gate_weights, heat: dict) -> Run:
    run = Run(gate, mode, blocks)
    t0 = time.time()
    if blocks is None:
        model.set_attn_implementation("sdpa")
        for c in cases:
            run.scores[c.name] = score_case(model, c)
        run.seconds = time.time() - t0
        return run
    cfg = moba_cfg(args.block_size, blocks, gate, mode, args.query_tile, args.local_blocks,
                   args.sink_blocks, tuple(args.dense_layers))
    state = moba_tf.configure(model, cfg, gate_weights=gate_weights if gate == "learned" else None,
                              impl="torch", attend="gather",
                              scorer=oracle_scorer(ORACLES[gate]) if gate in ORACLES else None)
    for c in cases:
        first_ppl = c.task == "ppl" and c is next(x for x in cases if x.task == "ppl")
        heat_case = c.name == heat.get("case")
        state.count = state.recall = first_ppl
        state.record_layers = (args.heat_layer,) if heat_case else ()
        state.stats.reset()
        run.scores[c.name] = score_case(model, c)
        if first_ppl:
            run.sparsity, run.recall = state.stats.sparsity, state.stats.recall
        if heat_case and args.heat_layer in state.stats.selections:
            heat.setdefault("masks", {})[(gate, mode, blocks)] = state.stats.selections[args.heat_layer]
    run.seconds = time.time() - t0
    return run


# ---------------------------------------------------------------------------------------------
# report


def summarize(run: Run, cases: list[Case], args=None) -> dict:
    by = lambda task: [run.scores[c.name] for c in cases if c.task == task]  # noqa: E731
    ppl = by("ppl")
    out = {"gate": run.gate, "mode": run.mode, "blocks": run.blocks, "sparsity": run.sparsity,
           "recall": run.recall, "seconds": run.seconds,
           "ppl": math.exp(sum(s["nll"] for s in ppl) / len(ppl)) if ppl else float("nan")}
    if args is not None and run.blocks is not None:
        out.update(local=args.local_blocks, sink=args.sink_blocks, dense_layers=list(args.dense_layers))
    pk = by("passkey")
    out["passkey_exact"] = sum(s["exact"] for s in pk)
    out["passkey_n"] = len(pk)
    out["passkey_nll"] = sum(s["nll_sum"] for s in pk) / len(pk) if pk else float("nan")
    out["passkey_by_case"] = {c.name: run.scores[c.name]["exact"] for c in cases if c.task == "passkey"}
    out["passkey"] = {}        # format -> {"depths": "Y n Y" pattern, "exact": k, "n": n, "nll": mean}
    for fmt in PASSKEY_FORMATS:
        cs = sorted((c for c in cases if c.task == "passkey" and c.meta.get("format", "essay") == fmt),
                    key=lambda c: (c.meta["length"], c.meta["depth"]))
        if cs:
            sc = [run.scores[c.name] for c in cs]
            out["passkey"][fmt] = {"exact": sum(x["exact"] for x in sc), "n": len(sc),
                                   "pattern": "".join("Y" if x["exact"] else "n" for x in sc),
                                   "depths": [c.meta["depth"] for c in cs],
                                   "nll": sum(x["nll_sum"] for x in sc) / len(sc)}
    for task in ("multikey", "vartrack", "cwe"):
        s = by(task)
        out[task] = sum(x["acc"] for x in s) / len(s) if s else float("nan")
    return out


def _passkey_cell(r: dict, fmt: str) -> str:
    p = r.get("passkey", {}).get(fmt)
    return f"{p['exact']}/{p['n']} ({p['pattern']}), {p['nll']:.2f}" if p else "-"


def markdown(rows: list[dict], dense: dict, args, notes: list[str]) -> str:
    fmts = [f for f in PASSKEY_FORMATS if f in dense.get("passkey", {})]
    depths = next(iter(dense.get("passkey", {}).values()), {}).get("depths", [])
    lines = [f"# MoBA quality: {args.model_name}, {args.length_desc}, block {args.block_size}, "
             f"tile {args.query_tile}, sink {args.sink_blocks}", "",
             "Sparsity: share of causal (query head, key) pairs skipped on the perplexity text, all "
             "layers (dense layers count as computed). Recall: dense attention mass inside the selected "
             "blocks. Passkey: exact key digits (teacher-forced) at depths "
             f"{'/'.join(f'{d:g}' for d in depths)} (Y/n each), then the key's mean NLL; `essay`: the key "
             "in essay text, `repeat`: the key in the repeated grass/sky/sun filler. "
             "RULER: teacher-forced answer-token accuracy.", "",
             "| gate | tile | blocks | local | dense layers | sparsity | recall | tail ppl | vs dense | "
             + " | ".join(f"passkey {f}" for f in fmts) + " | multikey | vartrack | cwe | s |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(fmts) + "---|---|---|---|"]
    for r in [dense] + rows:
        rel = (r["ppl"] / dense["ppl"] - 1) * 100
        dl = r.get("dense_layers")
        lines.append(
            f"| {r['gate']} | {r['mode']} | {r['blocks'] if r['blocks'] else 'all'} | {r.get('local', '-')} | "
            f"{','.join(map(str, dl)) if dl else '-'} | {r['sparsity']:.1%} | "
            f"{r['recall']:.3f} | {r['ppl']:.3f} | {rel:+.2f}% | "
            + "".join(f"{_passkey_cell(r, f)} | " for f in fmts)
            + f"{r['multikey']:.2f} | {r['vartrack']:.2f} | {r['cwe']:.2f} | {r['seconds']:.0f} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], dense: dict, heat: dict, out: Path, args) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib not installed: no plots (pip install matplotlib)"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"token": "o", "union": "s", "shared": "^"}
    series: dict[tuple, list[dict]] = {}      # one line per gate, mode, local and dense layers
    for r in rows:
        key = (r["gate"], r["mode"], r.get("local"), tuple(r.get("dense_layers") or ()))
        series.setdefault(key, []).append(r)
    for (gate, mode, local, dl), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["sparsity"])
        label = f"{gate}/{mode}" + (f" local {local}" if local not in (None, args.local_blocks) else "") \
            + (f" dense {','.join(map(str, dl))}" if dl else "")
        xs = [r["sparsity"] for r in rs]
        axes[0].plot(xs, [(r["ppl"] / dense["ppl"] - 1) * 100 for r in rs], marker=markers[mode], label=label)
        axes[1].plot(xs, [r["recall"] for r in rs], marker=markers[mode], label=label)
    axes[0].set_xlabel("sparsity")
    axes[0].set_ylabel("tail perplexity vs dense (%)")
    axes[1].set_xlabel("sparsity")
    axes[1].set_ylabel("block recall")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_sparsity.png", dpi=110)
    plt.close(fig)
    masks = heat.get("masks", {}) if heat else {}
    if masks:
        keys = list(masks)
        fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            mask, pos = masks[key]
            ax.imshow(mask[:, args.heat_head, :].float().numpy(), aspect="auto", interpolation="nearest",
                      cmap="Greys", extent=(0, mask.shape[-1], int(pos[-1]), int(pos[0])))
            ax.set_title(f"{key[0]}/{key[1]}/{key[2]}", fontsize=8)
            ax.set_xlabel("key block")
        axes[0][0].set_ylabel("query position")
        fig.suptitle(f"selected blocks, {heat['case']}, layer {args.heat_layer}, head {args.heat_head}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "selection_heatmap.png", dpi=110)
        plt.close(fig)
    return []


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser("moba-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--data", help="haystack .json/.txt (default: $MOBA_HAYSTACK or "
                    "../shared/data/PaulGrahamEssays.json beside the repo)")
    ap.add_argument("--gate-weights", help="learned gate file (default: <model dir>/moba_mlp_weight.safetensors)")
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--quick", action="store_true", help="CI size: 512 tokens, block 32, about a minute")
    ap.add_argument("--length", type=int, nargs="+", help="prompt lengths (passkey at each; the largest "
                    "for perplexity and RULER)")
    ap.add_argument("--depths", type=float, nargs="+")
    ap.add_argument("--blocks", type=int, nargs="+", help="encoder top-k right sweep (blocks selected)")
    ap.add_argument("--main-blocks", type=int, help="block count for the full gate x mode grid")
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--query-tile", type=int, default=128)
    ap.add_argument("--gates", nargs="+", choices=GATES, default=list(DEFAULT_GATES))
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--sweep-modes", nargs="+", choices=MODES, default=["token"],
                    help="tile modes that also run the block-count sweep")
    ap.add_argument("--sink-blocks", type=int, default=1)
    ap.add_argument("--local-blocks", type=int, default=1)
    ap.add_argument("--dense-layers", type=int, nargs="*", default=[])
    ap.add_argument("--ppl-texts", type=int, default=1)
    ap.add_argument("--passkey-formats", nargs="+", choices=PASSKEY_FORMATS, default=list(PASSKEY_FORMATS),
                    help="essay: the key in essay text; repeat: the classic repeated-filler prompt")
    ap.add_argument("--dense-from", help="take the dense row from this earlier quality.json (same "
                    "model, lengths, depths, seed and formats) instead of running it again")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge the rows of these "
                    "quality.json files (the first one's dense row) into <out>/quality.md and the plot")
    ap.add_argument("--no-ruler", action="store_true")
    ap.add_argument("--heat-layer", type=int)
    ap.add_argument("--heat-head", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs (float32 either way; the MoBA path is the torch one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    args.length = args.length or ([512] if q else [4096])
    args.depths = args.depths or ([0.5] if q else [0.1, 0.5, 0.9])
    args.block_size = args.block_size or (32 if q else 128)
    args.blocks = args.blocks or ([4] if q else [4, 8, 16])
    args.main_blocks = args.main_blocks or args.blocks[0]
    if q:
        args.query_tile = min(args.query_tile, args.block_size)

    from transformers import AutoModelForCausalLM

    if args.model is None:
        from moba_backend.models import embedded_model_dir
        model_dir = embedded_model_dir()
    else:
        model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(args.device).eval()
    n_layers = model.config.num_hidden_layers
    args.heat_layer = n_layers // 2 if args.heat_layer is None else args.heat_layer
    args.model_name = model_dir.name
    args.length_desc = f"{max(args.length)} tokens"
    tok = load_tokenizer(model_dir)
    hay = Haystack(read_texts([args.data or default_haystack()]), tok, args.seed)
    cases = build_cases(hay, args.length, args.depths, args.ppl_texts, not args.no_ruler, args.seed,
                        tuple(args.passkey_formats))

    notes: list[str] = []
    gate_weights = None
    if "learned" in args.gates:
        path = resolve_gate_path(args.gate_weights, model_dir)
        try:
            if path is None:
                raise GateWeightError(f"no {model_dir}/moba_mlp_weight.safetensors")
            c = model.config
            gate_weights = load_gate_weights(path, n_layers, c.num_key_value_heads, args.block_size,
                                             getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        except GateWeightError as e:
            notes.append(f"gate `learned` skipped: {e}")
            args.gates = [g for g in args.gates if g != "learned"]

    # the grid: every gate x mode at main_blocks; the other block counts for the sweep modes
    plan = [(g, m, args.main_blocks) for g in args.gates for m in args.modes]
    plan += [(g, m, b) for b in args.blocks if b != args.main_blocks for g in args.gates
             for m in args.sweep_modes]
    passkey = [c for c in cases if c.task == "passkey"]
    repeat = [c for c in passkey if c.meta.get("format") == "repeat"] or passkey
    heat = {"case": repeat[len(repeat) // 2].name if repeat else cases[0].name}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dense_from:
        dense = json.loads(Path(args.dense_from).read_text())["dense"]
    else:
        dense = summarize(evaluate(model, cases, "dense", "-", None, args, None, heat), cases)
    logger.info("dense: ppl %.3f, %.0f s per config", dense["ppl"], dense["seconds"])
    rows = []
    from tqdm.auto import tqdm
    for gate, mode, blocks in tqdm(plan, desc="moba-eval"):
        r = summarize(evaluate(model, cases, gate, mode, blocks, args, gate_weights, heat), cases, args)
        rows.append(r)
        logger.info("%s/%s/%d: sparsity %.3f recall %.3f ppl %.3f passkey %s", gate, mode, blocks,
                    r["sparsity"], r["recall"], r["ppl"],
                    ", ".join(f"{f} {p['pattern']}" for f, p in r["passkey"].items()))
        (out / "quality.json").write_text(json.dumps({"dense": dense, "rows": rows, "args": _args_json(args)},
                                                     indent=1, default=str))
    notes += plots(rows, dense, heat, out, args)
    md = markdown(rows, dense, args, notes)
    (out / "quality.md").write_text(md)
    print(md)
    print(f"wrote {out}/quality.md, quality.json, quality_vs_sparsity.png, selection_heatmap.png")
    return 0


def _args_json(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "merge"}


def merge(paths: list[str], out: Path) -> int:
    """One table and plot from several runs (e.g. a sweep of local blocks, one run each)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    args = argparse.Namespace(**runs[0]["args"])
    args.length_desc = f"{max(args.length)} tokens"
    rows = [r for run in runs for r in run["rows"]]
    out.mkdir(parents=True, exist_ok=True)
    notes = plots(rows, runs[0]["dense"], {}, out, args)
    md = markdown(rows, runs[0]["dense"], args, notes)
    (out / "quality.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
