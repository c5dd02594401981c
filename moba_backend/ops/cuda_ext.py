"""The CUDA extension (`csrc/`): its ops live in `torch.ops.moba_cuda` once loaded.

Loaded once per process: the build made at install (`moba_backend/_moba_cuda*.so`, compiled
when pip found a CUDA build of torch and nvcc), else, on a CUDA device with nvcc present, a
build of `csrc/` made on first use into a cache directory (`MOBA_CUDA_BUILD_DIR`, default
`~/.cache/moba_backend/cuda`). When neither works the Triton path runs instead, and the reason is
logged once.
"""

from __future__ import annotations

import functools
import glob
import logging
import os

import torch

log = logging.getLogger(__name__)

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
# Torch launchers and the torch-free kernel instantiations they call.
SOURCES = ("pooling.cpp", "attention.cpp", "kernels_pool.cu", "kernels_decode.cu",
           "kernels_prefill_bf16.cu", "kernels_prefill_fp16.cu")
# NOTE: no -std here: the launchers include torch's headers and must use torch's own standard.
NVCC_FLAGS = ("-O3", "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__",
              "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__")

# What the kernels take (csrc/attention.cpp checks the same and names what is wrong).
HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 16


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc targets for a device: sm_90a on Hopper (its own instructions), else the device's own."""
    major, minor = capability
    arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _load_installed() -> bool:
    found = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_moba_cuda*.so")))
    if not found:
        return False
    torch.ops.load_library(found[0])
    return True


def _build() -> None:
    from torch.utils.cpp_extension import CUDA_HOME, load

    missing = [s for s in SOURCES if not os.path.exists(os.path.join(CSRC_DIR, s))]
    if missing:
        raise RuntimeError(f"csrc/ sources not found ({', '.join(missing)}): install with a CUDA build")
    if CUDA_HOME is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    build_dir = os.environ.get("MOBA_CUDA_BUILD_DIR",
                               os.path.join(os.path.expanduser("~"), ".cache", "moba_backend", "cuda"))
    os.makedirs(build_dir, exist_ok=True)
    cap = torch.cuda.get_device_capability()
    load(name="moba_cuda_ext", sources=[os.path.join(CSRC_DIR, s) for s in SOURCES],
         extra_cflags=["-O3"], extra_cuda_cflags=[*NVCC_FLAGS, *arch_flags(cap)],
         extra_include_paths=[CSRC_DIR], build_directory=build_dir, is_python_module=False,
         verbose=os.environ.get("MOBA_CUDA_VERBOSE") == "1")


def _unavailable(e: Exception) -> str:
    reason = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    log.warning("moba_backend: CUDA kernels unavailable (%s); using the Triton kernels", reason)
    return reason


def _no_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    return None


@functools.cache
def _load_installed_only() -> str | None:
    """None once the install-time build is loaded, else why not (nothing is compiled)."""
    reason = _no_cuda()
    if reason is not None:
        return reason
    try:
        return None if _load_installed() else "no installed build"
    except Exception as e:  # noqa: BLE001 - a build that does not load means: use Triton
        return _unavailable(e)


@functools.cache
def _load() -> str | None:
    """None once the ops are registered (the installed build, else one compiled here), else why
    they are not."""
    reason = _no_cuda()
    if reason is not None:
        return reason
    if _load_installed_only() is None:
        return None
    try:
        _build()
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use Triton
        return _unavailable(e)
    return None


def available() -> bool:
    """True when the CUDA ops are loaded (builds them on first call where needed)."""
    return _load() is None


def available_without_build() -> bool:
    """True when the CUDA ops are loaded or the install-time build loads; never compiles (what
    `moba_impl: auto` asks: a first forward must not wait minutes for nvcc)."""
    if _load.cache_info().currsize:
        return _load() is None
    return _load_installed_only() is None


def ops():
    """`torch.ops.moba_cuda`; a clear error when the extension cannot be had."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CUDA implementation is unavailable: {reason}")
    return torch.ops.moba_cuda


def supports_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the CUDA attention kernels take these shapes and dtypes."""
    D, H, HK, P = q.shape[-1], q.shape[1], k_cache.shape[2], k_cache.shape[1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and D in HEAD_DIMS
            and H // HK <= MAX_GROUP and P % 16 == 0)


# Per device index: whether its prefill calls can run the Hopper kernel (asked of the extension).
_HOPPER_READY: dict[int, bool] = {}


def hopper_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the CUDA prefill runs these shapes on its Hopper kernel (wgmma + TMA,
    csrc/prefill_sm90.cuh) rather than the `mma.sync` one: an SM90 device and a build holding the
    Hopper code (asked of the extension, which must be loaded), head dim 64/128/256, power-of-two
    pages, 16-byte aligned strides and bases. False during a CUDA graph capture until asked once
    outside one."""
    if not supports_attention(q, k_cache) or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    P = k_cache.shape[1]
    if P & (P - 1) or k_cache.shape[0] * P >= 2 ** 31 - 1:
        return False
    for t in (k_cache, v_cache):
        if t.stride(3) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:3]):
            return False
    if (k_cache.stride(2) < k_cache.stride(1)) != (v_cache.stride(2) < v_cache.stride(1)):
        return False
    idx = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if idx not in _HOPPER_READY:
        if torch.cuda.is_current_stream_capturing():
            return False
        with torch.cuda.device(idx):
            _HOPPER_READY[idx] = bool(ops().hopper_prefill_ready())
    return _HOPPER_READY[idx]
