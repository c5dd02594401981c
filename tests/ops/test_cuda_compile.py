"""csrc/ compiles with nvcc for SM80 and SM90a (CI has nvcc but no GPU).

Each torch-free translation unit that instantiates the kernel templates is compiled to an object
file for both targets, in parallel; ptxas may spill at most a few registers (a large spill means
a tile shape no longer fits the register file).
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
UNITS = ("kernels_pool.cu", "kernels_decode.cu", "kernels_prefill_bf16.cu", "kernels_prefill_fp16.cu")
TARGETS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")
MAX_SPILL_BYTES = 128
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
