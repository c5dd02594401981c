"""vLLM plugin: MoBA attention as a vLLM attention backend.

Loaded by vLLM in every process through the `vllm.general_plugins` entry point
`moba = moba_backend.integrations.vllm:register`. It does nothing unless
`FD_ATTENTION_BACKEND=MOBA_ATTN` (alias `PLAS_ATTN`) is set, so an installed plugin leaves vLLM
exactly as it was. The MoBA config travels as `--additional-config
'{"moba_attention_config": {...}}'` (what `moba-serve --moba-attention-config` writes).
"""

from __future__ import annotations

from moba_backend.config import attention_backend_from_env

BACKEND_PATH = "moba_backend.integrations.vllm.backend.MobaAttentionBackend"
CPU_BACKEND_PATH = "moba_backend.integrations.vllm.backend.MobaCPUAttentionBackend"


def register() -> None:
    """Switch vLLM's attention to MoBA when the environment asks for it (idempotent).

    - CUDA and other accelerators: MoBA becomes the `CUSTOM` backend; the engine must be started
      with `--attention-backend CUSTOM` (moba-serve adds it).
    - CPU: the CPU platform resolves `CPU_ATTN` whatever backend is requested, so that member is
      pointed at MoBA instead.
    """
    if not attention_backend_from_env():
        return
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    else:
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    # vLLM configures handlers for its own logger tree only.
    init_logger("vllm.moba_backend").info(
        "MoBA attention backend registered (%s)", current_platform.device_name)


__all__ = ["register", "BACKEND_PATH", "CPU_BACKEND_PATH"]
