"""Fixtures of the integration tests (vLLM on CPU, the embedded model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integrations.procs import plugin_pythonpath

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "PaulGrahamEssays.json"


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> str:
    """PYTHONPATH under which vLLM's processes find the plugin's entry point."""
    return plugin_pythonpath(tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The embedded model, seen through a private directory of links that leaves out learned gate
    weights: vLLM loads every `*.safetensors` of a local model directory that has no
    `model.safetensors.index.json`, so a `moba_mlp_weight.safetensors` beside the model breaks
    loading."""
    from moba_backend.models import embedded_model_dir

    try:
        src = embedded_model_dir()
    except FileNotFoundError as e:
        pytest.skip(f"embedded model unavailable: {e}")
    view = tmp_path_factory.mktemp("model")
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("moba_mlp_weight"):
            (view / f.name).symlink_to(f)
    return str(view)


@pytest.fixture(scope="session")
def haystack_ids(model_dir):
    """Token ids of the essays (the long prompts' text)."""
    if not DATA.exists():
        pytest.skip(f"{DATA} not found")
    from transformers import AutoTokenizer

    text = json.loads(DATA.read_text())["text"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(text[:200_000])["input_ids"]
