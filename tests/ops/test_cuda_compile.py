"""csrc/ compiles with nvcc for SM80 and SM90a (CI has nvcc but no GPU).

Each torch-free translation unit that instantiates the kernel templates is compiled to an object
file for both targets, in parallel; ptxas may spill at most a few registers (a large spill means
a tile shape no longer fits the register file). On a CPU build of torch the launchers are built
too, against stand-ins for torch's CUDA headers, and must refuse CPU tensors by name.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
UNITS = ("kernels_pool.cu", "kernels_decode.cu", "kernels_prefill_bf16.cu", "kernels_prefill_fp16.cu")
TARGETS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")
MAX_SPILL_BYTES = 128
LAUNCHERS = ("pooling.cpp", "attention.cpp")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
def test_csrc_compiles_for_sm80_and_sm90a(tmp_path):
    def compile_unit(unit: str) -> tuple[str, int, str]:
        cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", *TARGETS, "-Xptxas", "-v", "-c",
               os.path.join(CSRC, unit), "-o", str(tmp_path / (unit + ".o"))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return unit, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(UNITS), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_unit, UNITS))
    for unit, rc, log in results:
        assert rc == 0, f"{unit} failed to compile:\n{log[-4000:]}"
        spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
        assert max(spills, default=0) <= MAX_SPILL_BYTES, f"{unit}: register spills {spills}\n{log[-4000:]}"


# Stand-ins for the three torch CUDA headers the launchers include (a CPU torch ships none).
STUB_HEADERS = {
    "ATen/cuda/CUDAContext.h": "#pragma once\n#include <cuda_runtime.h>\n"
                               "namespace at { namespace cuda { inline cudaStream_t getCurrentCUDAStream() "
                               "{ return nullptr; } } }\n",
    "c10/cuda/CUDAGuard.h": "#pragma once\n#include <c10/core/Device.h>\n"
                            "namespace c10 { namespace cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; } }\n",
    "c10/cuda/CUDAException.h": "#pragma once\n#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)\n",
}
# The kernels' launch functions, empty: only the checks before them run here.
STUB_LAUNCHES = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "params.h"
namespace moba {
template <typename T, int D> void launch_decode(const AttnParams&, cudaStream_t) {}
template <typename T, int D> bool launch_prefill(const AttnParams&, cudaStream_t) { return false; }
bool hopper_prefill_ready(cudaStream_t) { return false; }
template <typename T, typename TS> void launch_pool(const PoolParams&, cudaStream_t) {}
#define MOBA_ATTN(T, D) template void launch_decode<T, D>(const AttnParams&, cudaStream_t); \\
  template bool launch_prefill<T, D>(const AttnParams&, cudaStream_t);
#define MOBA_ATTN_ALL(T) MOBA_ATTN(T, 64) MOBA_ATTN(T, 128) MOBA_ATTN(T, 256)
MOBA_ATTN_ALL(__nv_bfloat16)
MOBA_ATTN_ALL(__half)
#define MOBA_POOL(T, TS) template void launch_pool<T, TS>(const PoolParams&, cudaStream_t);
#define MOBA_POOL_ALL(T) MOBA_POOL(T, __nv_bfloat16) MOBA_POOL(T, __half) MOBA_POOL(T, float)
MOBA_POOL_ALL(__nv_bfloat16)
MOBA_POOL_ALL(__half)
MOBA_POOL_ALL(float)
}
"""


def _cuda_include() -> str | None:
    if NVCC is None:
        return None
    inc = os.path.join(os.path.dirname(os.path.realpath(NVCC)), "..", "include")
    for d in (inc, os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")):
        if os.path.exists(os.path.join(d, "cuda_runtime.h")):
            return os.path.abspath(d)
    return None


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch builds the real extension (GPU tests)")
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and the CUDA headers")
def test_launchers_build_and_refuse_cpu_tensors(tmp_path):
    from torch.utils.cpp_extension import include_paths

    for rel, text in STUB_HEADERS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "launches.cpp").write_text(STUB_LAUNCHES)
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    so = tmp_path / "moba_launchers.so"
    cmd = ["g++", "-std=c++20", "-O0", "-fPIC", "-shared", f"-I{tmp_path}", f"-I{CSRC}", f"-I{_cuda_include()}",
           *[f"-I{p}" for p in include_paths()], *[os.path.join(CSRC, f) for f in LAUNCHERS],
           str(tmp_path / "launches.cpp"), "-o", str(so), f"-L{lib_dir}", "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{lib_dir}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"launchers failed to build:\n{r.stderr[-4000:]}"
    torch.ops.load_library(str(so))
    ops = torch.ops.moba_cuda
    i32 = torch.zeros(1, dtype=torch.int32)
    q = torch.randn(1, 8, 128, dtype=torch.bfloat16)
    kc = torch.randn(4, 16, 2, 128, dtype=torch.bfloat16)
    lists, counts = torch.zeros(1, 2, 4, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32)
    tiles = (i32, i32, i32 + 1, i32, torch.zeros(1, dtype=torch.int64))
    for op in (ops.decode, ops.prefill):
        with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
            op(q, kc, kc, torch.empty_like(q), i32[None], *tiles, lists, counts, 16, 1, 0.1, 0.0, -1)
    with pytest.raises(RuntimeError, match="k_cache must be a CUDA tensor"):
        ops.pool(kc, torch.empty(4, 1, 1, 2, 128), None, i32[None], i32, i32, 16, 0)
