"""moba-serve through the official `openai` client: completions, chat, streaming, concurrent
requests, and a bad MoBA config rejected before any engine starts. The server runs in its own
process group and is stopped after the module, on failure too."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tests.integrations.procs import REPO, child_env, read_stats, start, stop, tail  # noqa: E402

SERVE = [sys.executable, "-m", "moba_backend.integrations.vllm.serve"]
# Sparse enough that the short prompts below already skip blocks.
CONFIG = {"moba_block_size": 16, "moba_query_tile": 16, "moba_encoder_top_k_left": 2,
          "moba_encoder_top_k_right": 4, "moba_decoder_top_k_left": 2, "moba_decoder_top_k_right": 4}
MODEL = "smollm2-135m-instruct"                 # served name of the embedded default model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(plugin_path, model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    stats = work / "stats.jsonl"
    log = work / "serve.log"
    # The embedded model as moba-serve finds it (MOBA_CACHE_DIR), minus stray gate weights.
    cache = work / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(model_dir)
    # no --model: the embedded model; --plas-attention-config: the FastDeploy alias
    proc = start(SERVE + ["--port", str(port), "--max-model-len", "2048", "--enforce-eager",
                          "--dtype", "float32", "--plas-attention-config", json.dumps(CONFIG)],
                 child_env(plugin_path, MOBA_STATS_FILE=str(stats), FD_ATTENTION_BACKEND=None,
                           MOBA_CACHE_DIR=str(cache)), log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"moba-serve exited ({proc.returncode}):\n{tail(log)}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() - t0 > 400:
                    raise AssertionError(f"moba-serve not ready after 400s:\n{tail(log)}")
                time.sleep(2)
        yield client, stats, log
    finally:
        stop(proc)


def test_models_and_completion(server):
    client, stats, log = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                  temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens > 0
    assert "MoBA attention backend registered" in log.read_text()
    assert read_stats(stats)["calls"] > 0


def test_chat(server):
    client, _, _ = server
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_streaming(server):
    client, _, _ = server
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=32, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces).strip()


def test_concurrent_requests_skip_blocks(server):
    client, stats, _ = server
    before = read_stats(stats)
    prompts = [f"Essay {i}: " + "The history of the printing press is long. " * (20 + 15 * i)
               for i in range(4)]

    def one(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one, prompts))
    assert all(o.usage.completion_tokens == 24 for o in outs)
    after = read_stats(stats)
    picked = after["prefill_selected"] - before["prefill_selected"]
    visible = after["prefill_visible"] - before["prefill_visible"]
    assert 0 < picked < visible, (picked, visible)


@pytest.mark.parametrize("flag,cfg,key", [
    ("--moba-attention-config", '{"moba_blok_size": 64}', "moba_blok_size"),
    ("--plas-attention-config", '{"plas_encoder_top_k_left": 0}', "moba_encoder_top_k_left"),
], ids=["unknown-key", "out-of-range-alias"])
def test_bad_config_rejected_before_start(plugin_path, flag, cfg, key):
    r = subprocess.run(SERVE + ["--port", str(free_port()), flag, cfg], env=child_env(plugin_path),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert key in r.stderr
    assert "Initializing a V1 LLM engine" not in r.stdout + r.stderr
