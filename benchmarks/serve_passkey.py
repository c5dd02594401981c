"""Passkey retrieval and speed through the OpenAI server: vLLM's CPU attention (dense) vs moba-serve.

For each mode a server is started (its own process group, stopped afterwards) and, for each
filler and depth, one streamed greedy completion of a passkey prompt of about `--tokens` tokens is
sent. Each row gives the answer, time to first token (the prefill), decode tokens/s and, for MoBA,
the share of (token, head, causally visible MoBA block) triples the gate skipped, prefill and
decode apart (the plugin's `MOBA_STATS_FILE` hook).

The prompt is the classic passkey test (Mohtashami & Jaggi, 2023, as their landmark-attention
code writes it): an instruction line, the haystack with the needle line "The pass key is K.
Remember it. K is the pass key." at a relative depth, then "What is the pass key? The pass key
is". Haystacks (`--fillers`): `repeat`, the test's own repeated filler
sentences; `essay`, Paul Graham's essays. `--format chat` wraps the text in the model's chat
template and starts the answer in the assistant turn.

    python benchmarks/serve_passkey.py --tokens 7900 --depths 0.1 0.5 0.9 --fillers repeat essay \
        --modes dense sparse-shared-mean sparse-token-mean sparse-shared-minmax sparse-token-minmax
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# 8..16 of up to 62 blocks (block 128 at 7.9K tokens): dense below 1024 tokens
SPARSE = {"moba_encoder_top_k_left": 8, "moba_encoder_top_k_right": 16,
          "moba_decoder_top_k_left": 8, "moba_decoder_top_k_right": 16}
MODES = {
    "dense": None,                                           # vLLM's own CPU attention
    "moba": {},                                              # SPEC defaults: block 128, window 50/60
    **{f"sparse-{tile}-{gate}": {**SPARSE, "moba_tile_select": tile, "moba_gate": gate}
       for tile in ("shared", "token") for gate in ("mean", "minmax")},
}
MODES["moba_sparse"] = MODES["sparse-shared-mean"]           # the name earlier runs used
# The test's own wording (landmark-attention's passkey test): lines joined by newlines.
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "them. I will quiz you about the important information there.")
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key?"
ANSWER = "The pass key is"


@functools.lru_cache(maxsize=1)
def essays() -> str:
    """The haystack the quality harness and the distiller read ($MOBA_HAYSTACK or the essays)."""
    from moba_backend.trainer.distill import default_haystack, read_texts

    return read_texts([default_haystack()])


def filler_text(filler: str, n_chars: int) -> str:
    if filler == "repeat":
        text = " ".join([REPEAT] * (n_chars // len(REPEAT) + 1))
    else:
        text = essays()
    return text[:n_chars]


def passkey_prompt(tokenizer, n_tokens: int, key: int, depth: float, filler: str = "repeat",
                   fmt: str = "completion") -> str:
    """About `n_tokens` tokens with the needle line at `depth` of the haystack (0 = start,
    1 = end); the haystack is cut by characters, its length found by a few tokenizer passes."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def build(n_chars: int) -> str:
        hay = filler_text(filler, n_chars)
        cut = int(len(hay) * depth)
        body = "\n".join([INTRO, hay[:cut], needle, hay[cut:]])
        if fmt == "chat":
            head = tokenizer.apply_chat_template([{"role": "user", "content": body + "\n" + QUESTION}],
                                                 tokenize=False, add_generation_prompt=True)
            return head + ANSWER
        return body + "\n" + QUESTION + " " + ANSWER

    n_chars = n_tokens * 4
    for _ in range(4):
        have = len(tokenizer(build(n_chars), add_special_tokens=False)["input_ids"])
        if abs(have - n_tokens) <= 8:
            break
        n_chars = int(n_chars * n_tokens / have)
    return build(n_chars)


def start_server(mode: str, model: str, port: int, max_len: int, stats: Path, log: Path,
                 pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("FD_ATTENTION_BACKEND", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    # NOTE: no prefix caching: prompts at different depths share their haystack up to the needle,
    # which would make later prefills look faster than they are.
    common = ["--model", model, "--port", str(port), "--max-model-len", str(max_len),
              "--dtype", "float32", "--enforce-eager", "--served-model-name", "m",
              "--no-enable-prefix-caching"]
    if MODES[mode] is None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *common]
    else:
        env["MOBA_STATS_FILE"] = str(stats)
        cmd = [sys.executable, "-m", "moba_backend.integrations.vllm.serve", *common,
               "--moba-attention-config", json.dumps(MODES[mode])]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=REPO)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError("server not ready")


def run_request(port: int, prompt: str, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=3600)
    t0 = time.time()
    first, n, text = None, 0, ""
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = time.time()
            n += 1
            text += chunk.choices[0].text
    end = time.time()
    return {"ttft_s": round(first - t0, 2),
            "decode_tok_s": round((n - 1) / (end - first), 2) if n > 1 else 0.0,
            "text": text, "chunks": n}


def skipped(lines: list[str]) -> dict:
    """Share of (token, head, visible block) triples not attended, from the stats rows of one
    request; `vllm_cpu_calls`: layer calls that ran dense on vLLM's CPU attention."""
    tot = {"prefill_selected": 0, "prefill_visible": 0, "decode_selected": 0, "decode_visible": 0}
    routed = 0
    for line in lines:
        row = json.loads(line)
        routed += row.get("route") == "vllm_cpu"
        for k in tot:
            tot[k] += row[k]
    out = {"vllm_cpu_calls": routed}
    for side in ("prefill", "decode"):
        vis = tot[f"{side}_visible"]
        out[f"{side}_skipped"] = round(1 - tot[f"{side}_selected"] / vis, 4) if vis else None
    return out


def new_lines(path: Path, start: int) -> tuple[list[str], int]:
    if not path.exists():
        return [], start
    data = path.read_bytes()
    return data[start:].decode().splitlines(), len(data)


def markdown(results: list[dict]) -> str:
    head = ("| mode | filler | format | depth | prompt | passkey | answer | prefill tok/s | "
            "decode tok/s | skipped prefill / decode |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for r in results:
        skip = "-" if r["config"] is None else (
            f"{r['prefill_skipped']:.0%} / {r['decode_skipped']:.0%}"
            if r.get("decode_skipped") is not None else f"{r['prefill_skipped'] or 0:.0%} / -")
        answer = r["text"].strip().split("\n")[0][:24].replace("|", "/")
        rows.append(f"| {r['mode']} | {r['filler']} | {r['format']} | {r['depth']:g} | "
                    f"{r['prompt_tokens']} | {'right' if r['correct'] else 'wrong'} | `{answer}` | "
                    f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {skip} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=7900)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--fillers", nargs="+", default=["repeat"], choices=["repeat", "essay"])
    ap.add_argument("--format", default="completion", choices=["completion", "chat"])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--modes", nargs="+", default=["dense", "sparse-shared-mean"], choices=list(MODES))
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--workdir", default="/tmp/moba-bench")
    ap.add_argument("--pythonpath", default=None, help="PYTHONPATH for the servers")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from moba_backend.models import embedded_model_dir

    model = args.model or str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(args.seed)
    cases = []
    for filler in args.fillers:
        for depth in args.depths:
            key = rng.randint(10000, 99999)
            prompt = passkey_prompt(tok, args.tokens, key, depth, filler, args.format)
            cases.append(dict(filler=filler, depth=depth, passkey=key, prompt=prompt,
                              prompt_tokens=len(tok(prompt, add_special_tokens=False)["input_ids"])))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes:
        stats, log = work / f"{mode}.stats.jsonl", work / f"{mode}.log"
        stats.unlink(missing_ok=True)
        proc = start_server(mode, model, args.port, args.max_model_len, stats, log, args.pythonpath)
        try:
            wait_ready(args.port, proc)
            offset = 0
            for c in cases:
                r = run_request(args.port, c["prompt"], args.max_tokens)
                lines, offset = new_lines(stats, offset)
                r.update(mode=mode, config=MODES[mode], format=args.format,
                         **{k: v for k, v in c.items() if k != "prompt"},
                         correct=str(c["passkey"]) in r["text"],
                         **(skipped(lines) if MODES[mode] is not None else {}))
                r["prefill_tok_s"] = round(c["prompt_tokens"] / r["ttft_s"], 1)
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            stop(proc)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
