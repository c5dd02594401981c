"""Passkey retrieval and speed through the OpenAI server: vLLM's CPU attention (dense) vs moba-serve.

For each mode a server is started (its own process group, stopped afterwards), one streamed greedy
completion of a passkey prompt of about `--tokens` tokens is sent, and the report gives the
answer, time to first token (the prefill), decode tokens/s and, for MoBA, the fraction of
(token, head, block) pairs the gate skipped (the plugin's `MOBA_STATS_FILE` hook).

    python benchmarks/serve_passkey.py --tokens 7900 --modes dense moba moba_sparse
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "PaulGrahamEssays.json"
MODES = {
    "dense": None,                                           # vLLM's own CPU attention
    "moba": {},                                              # SPEC defaults: block 128, window 50/60
    "moba_sparse": {"moba_encoder_top_k_left": 8, "moba_encoder_top_k_right": 16,
                    "moba_decoder_top_k_left": 8, "moba_decoder_top_k_right": 16},
}
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, n_tokens: int, key: int, depth: float) -> str:
    """About `n_tokens` tokens of essays with the needle at `depth` (0 = start, 1 = end)."""
    text = json.loads(DATA.read_text())["text"]
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    budget = n_tokens - len(tokenizer(INTRO + needle + QUESTION)["input_ids"])
    ids = tokenizer(text[: budget * 8])["input_ids"][:budget]
    cut = int(len(ids) * depth)
    hay_a, hay_b = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    return INTRO + hay_a + needle + hay_b + QUESTION


def start_server(mode: str, model: str, port: int, max_len: int, stats: Path, log: Path,
                 pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    env.pop("FD_ATTENTION_BACKEND", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    common = ["--model", model, "--port", str(port), "--max-model-len", str(max_len),
              "--dtype", "float32", "--enforce-eager", "--served-model-name", "m"]
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


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
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
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (end - first) if n > 1 else 0.0,
            "text": text, "chunks": n}


def skipped(stats: Path) -> dict:
    tot = {"prefill_selected": 0, "prefill_visible": 0, "decode_selected": 0, "decode_visible": 0}
    if stats.exists():
        for line in stats.read_text().splitlines():
            row = json.loads(line)
            for k in tot:
                tot[k] += row[k]
    out = {}
    for side in ("prefill", "decode"):
        vis = tot[f"{side}_visible"]
        out[f"{side}_skipped"] = round(1 - tot[f"{side}_selected"] / vis, 4) if vis else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=7900)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--workdir", default="/tmp/moba-bench")
    ap.add_argument("--pythonpath", default=None, help="PYTHONPATH for the servers")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from moba_backend.models import embedded_model_dir

    model = args.model or str(embedded_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    key = random.Random(args.seed).randint(10000, 99999)
    prompt = passkey_prompt(tok, args.tokens, key, args.depth)
    n_prompt = len(tok(prompt)["input_ids"])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes:
        stats, log = work / f"{mode}.stats.jsonl", work / f"{mode}.log"
        stats.unlink(missing_ok=True)
        proc = start_server(mode, model, args.port, args.max_model_len, stats, log, args.pythonpath)
        try:
            wait_ready(args.port, proc)
            r = run_request(args.port, prompt, args.max_tokens)
        finally:
            stop(proc)
        r.update(mode=mode, config=MODES[mode], prompt_tokens=n_prompt, passkey=key,
                 correct=str(key) in r["text"], **(skipped(stats) if MODES[mode] is not None else {}))
        r["prefill_tok_s"] = round(n_prompt / r["ttft_s"], 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
